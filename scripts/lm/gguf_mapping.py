"""The GGUF <-> Hugging Face mapping for llama-family models, both directions in one place: tensor
names, llama.cpp's q/k row permutation, token types and the pre-tokenizer of a byte-level BPE vocabulary.
"""

from __future__ import annotations

import re

from pipeline.errors import PipelineError

import numpy as np
from tokenizers import Regex, pre_tokenizers

# Top-level tensors, and the per-layer parts of blk.N.<gguf> <-> model.layers.N.<hf>.weight.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_FROM_GGUF = {gguf: hf for hf, gguf in GLOBAL_TENSORS.items()}
_LAYER_FROM_GGUF = {gguf: hf for hf, gguf in LAYER_TENSORS.items()}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
COMPUTED_TENSORS = ("rope_freqs.weight",)  # GGUF tensors Hugging Face models compute themselves

# llama.cpp's token types (llama_token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TYPES = ("smollm", "llama-bpe", "gpt-2")  # the pre-tokenizers written on export, in the order they are tried


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face llama tensor; KeyError for a tensor GGUF has no name for."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part = rest.removesuffix(".weight")
    if part not in LAYER_TENSORS:
        raise KeyError(hf_name)
    return f"blk.{layer}.{LAYER_TENSORS[part]}.weight"


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor; None for tensors HF computes itself (rope_freqs)."""
    if gguf_name in _GLOBAL_FROM_GGUF:
        return _GLOBAL_FROM_GGUF[gguf_name]
    if gguf_name in COMPUTED_TENSORS:
        return None
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_FROM_GGUF:
        return f"model.layers.{match.group(1)}.{_LAYER_FROM_GGUF[match.group(2)]}.weight"
    raise PipelineError(
        f"unexpected tensor {gguf_name} in a llama GGUF",
        where="model conversion",
        fix="this GGUF variant is not supported; give an HF/MLX model folder",
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row order llama.cpp expects (its convert_hf_to_gguf.py applies the same permutation)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """Undo permute_qk (the rotary halves interleaved back); works on NumPy and MLX arrays."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def byte_level_pre_tokenizer(pre: str):
    """The HF pre-tokenizer matching llama.cpp's pre-tokenizer type `pre` for byte-level BPE."""
    if pre in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise PipelineError(
        f"GGUF tokenizer pre-type '{pre}' is not supported",
        where="model conversion",
        fix="supported: gpt-2, smollm, llama-bpe; or give an HF/MLX model folder",
    )
