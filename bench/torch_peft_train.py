"""Reference LoRA training loop in PyTorch + PEFT, for measuring training throughput only.

This is a benchmark reference, not part of the pipeline: it runs in its own venv
(.bench-venv, from bench/requirements-torch.lock) and imports nothing from scripts/.
It trains LoRA adapters on a Hugging Face-format llama folder over token batches
saved in an .npz file (inputs_<i>, targets_<i>, mask_<i>), which are the same
batches the pipeline trains on, and writes the time, token count and loss of each step as JSON.

    .bench-venv/bin/python bench/torch_peft_train.py --model DIR --batches FILE.npz --out FILE.json
"""

import argparse
import json
import sys
import time

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format llama folder (config.json, model.safetensors)")
    p.add_argument("--batches", required=True, help=".npz with inputs_<i>, targets_<i>, mask_<i>")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=160.0)
    p.add_argument("--num-layers", type=int, default=8, help="LoRA on the last N decoder layers")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps flagged as warmup in the JSON")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_base_model(folder: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """The frozen base model; fails unless every weight in the folder maps onto the model exactly."""
    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        sys.exit(f"weights of {folder} do not match LlamaForCausalLM: {problems}")
    model.requires_grad_(False)
    return model


def add_lora(model: LlamaForCausalLM, rank: int, alpha: float, num_layers: int) -> torch.nn.Module:
    total = model.config.num_hidden_layers
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        layers_to_transform=list(range(total - num_layers, total)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_batches(path: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(inputs, targets, mask)] in index order; token ids as int64, the mask as float32."""
    with np.load(path) as npz:
        count = sum(1 for name in npz.files if name.startswith("inputs_"))
        return [
            (
                torch.from_numpy(npz[f"inputs_{i}"].astype(np.int64)),
                torch.from_numpy(npz[f"targets_{i}"].astype(np.int64)),
                torch.from_numpy(npz[f"mask_{i}"].astype(np.float32)),
            )
            for i in range(count)
        ]


def masked_loss(model, inputs, targets, mask) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose mask is 1, as the pipeline computes it."""
    logits = model(input_ids=inputs).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
    return (ce * mask).sum() / mask.sum()


def train(model, optimizer, batches, warmup_steps: int) -> tuple[list[dict], list[float]]:
    steps, losses = [], []
    model.train()
    for i, (inputs, targets, mask) in enumerate(batches):
        start = time.perf_counter()
        loss = masked_loss(model, inputs, targets, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        seconds = time.perf_counter() - start
        step = {"seconds": seconds, "tokens": inputs.numel(), "trained_tokens": int(mask.sum().item())}
        if i < warmup_steps:
            step["warmup"] = True
        steps.append(step)
        losses.append(value)
        print(
            f"step {i + 1}/{len(batches)}: loss {value:.4f}, {seconds:.3f} s, "
            f"{step['trained_tokens'] / seconds:.0f} trained tok/s",
            file=sys.stderr,
        )
    return steps, losses


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = add_lora(load_base_model(args.model, getattr(torch, args.dtype)), args.rank, args.alpha, args.num_layers)
    model.print_trainable_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    batches = load_batches(args.batches)[: args.max_steps]
    steps, losses = train(model, optimizer, batches, args.warmup_steps)
    result = {
        "steps": steps,
        "losses": losses,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
