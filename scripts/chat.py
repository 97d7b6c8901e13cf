"""make chat: talk to the model an experiment ships, in the terminal, as it was trained and scored.

Reads config section `chat`, eval_out/<experiment>/generation_policy.json (the shipped artifact, stop
tokens and sampling), runs/<experiment>/artifacts.json and data/data_contract.json (the chat template
prepare rendered the training data with). Writes nothing.

On a terminal: a one-line header naming the artifact, its size and its task metric, then turns with
streamed answers and multi-turn history; /reset forgets the history, /system <text> sets the system
prompt (and resets), /quit (or Ctrl-D) ends. With prompts on stdin (`make chat < prompts.txt`): each
line is a conversation of its own and its answer is one line on stdout (newlines in it written as \\n),
the header on stderr, so scripts read answers only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
from collections.abc import Iterator

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, contracts, paths, splits

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import dequantize_model

from lm import gguf_header, llama_runner, tokens
from lm.served import GGUF_KINDS, adapter_route, what_to_run

log = logging.getLogger("chat")
COMMANDS = "/reset, /system <text>, /quit"
CONTEXT_TOKENS = 8192  # the most history a GGUF chat keeps (the model's own context, if smaller)


def build_parser():
    return cli.stage_parser("chat", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("chat", args, run)


def run(cfg) -> None:
    experiment, ccfg = cfg.experiment.name, cfg.chat
    policy, artifacts, contract, artifact = what_to_run(ccfg.artifact, experiment, "chat")
    tokenizer = load_tokenizer(paths.resolve(_by_kind(artifacts, "fused", "base")["path"]))
    system = system_prompt(ccfg.system, contract)
    interactive = sys.stdin.isatty()
    show = print if interactive else (lambda text: print(text, file=sys.stderr))
    show(header(artifact, experiment, system))
    with opened_model(artifact, artifacts, ccfg.max_tokens) as generate:
        chat = Conversation(tokenizer, contract, policy["generation"], ccfg.max_tokens, generate, system)
        if interactive:
            talk(chat)
        else:
            for line in sys.stdin:
                if line.strip():
                    chat.reset()
                    answer = "".join(chat.ask(line.rstrip("\n"))).strip()
                    print(answer.replace("\\", "\\\\").replace("\n", "\\n"), flush=True)


def system_prompt(setting: str, contract: dict) -> str | None:
    """chat.system: none, a text, or auto: the system prompt most training records share (when at least
    half of them do; the model was trained to answer under it)."""
    if setting != "auto":
        return setting or None
    records = splits.read_split(contract, "train", -1)
    systems = collections.Counter(
        r["messages"][0]["content"] for r in records if r.get("messages") and r["messages"][0]["role"] == "system"
    )
    if not systems:
        return None
    text, count = systems.most_common(1)[0]
    return text if 2 * count >= len(records) else None


def header(artifact: dict, experiment: str, system: str | None) -> str:
    metrics = contracts.read_json(paths.eval_dir(experiment) / "metrics.json", "eval_metrics")
    by_id = {a["id"]: a for a in metrics["artifacts"]}
    scored, task, twin = by_id.get(artifact["id"]), metrics["task_metric"], ""
    if scored and scored.get("loss_only_reason"):  # a proven twin of the fused model: its answers are the fused one's
        fused = next((a for a in metrics["artifacts"] if a["kind"] == "fused" and a["status"] == "ok"), None)
        scored, twin = (fused, f" as {fused['id']}, proven equal") if fused else (scored, "")
    if scored is None or scored["status"] != "ok":
        quality = "not scored by eval"
    elif task == "loss" or task not in (scored.get("metrics") or {}):
        quality = f"test loss {scored['loss']:.3f}{twin}"
    else:
        quality = f"{task} {scored['metrics'][task]['value']}{twin}"
    prompt = f"system prompt of {len(system)} characters" if system else "no system prompt"
    return (
        f"chat: {artifact['id']} ({artifact['format']}, {artifact['bytes'] / 1e6:.1f} MB, {quality}); {prompt}; "
        f"{COMMANDS}"
    )


class Conversation:
    """Multi-turn history rendered with the training template; each answer streamed piece by piece."""

    def __init__(self, tokenizer, contract, generation: dict, max_tokens: int, generate, system: str | None):
        self.tokenizer, self.contract, self.generation = tokenizer, contract, generation
        self.max_tokens, self.generate, self.system = max_tokens, generate, system
        self.stop_ids = set(tokenizer.eos_token_ids) | {
            tokenizer.convert_tokens_to_ids(t) for t in generation["stop_tokens"]
        }
        self.messages: list[dict] = []

    def reset(self, system: str | None = None) -> None:
        self.system = self.system if system is None else system
        self.messages = []

    def ask(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        prompt = tokens.chat_ids(self.tokenizer, self.contract["template"], history, add_generation_prompt=True)
        pieces = []
        for piece in self.generate(prompt, self.stop_ids, self.generation):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def talk(chat: Conversation) -> None:
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            chat.reset()
            print("(history cleared)")
        elif command == "/system":
            chat.reset(rest.strip())
            print("(system prompt set; history cleared)" if rest.strip() else "(no system prompt; history cleared)")
        elif line.strip():
            for piece in chat.ask(line):
                print(piece, end="", flush=True)
            print()


@contextlib.contextmanager
def opened_model(artifact: dict, artifacts: list[dict], max_tokens: int):
    """A generate(prompt ids, stop ids, generation policy) -> text pieces function for the artifact."""
    if artifact["kind"] in GGUF_KINDS:
        path, lora = paths.resolve(artifact["path"]), None
        if artifact["kind"] == "gguf-adapter":
            path, lora = adapter_route(artifact, artifacts)
        context = min(CONTEXT_TOKENS, int(gguf_header.read_header(path)["context_length"] or CONTEXT_TOKENS))
        llm = llama_runner.open_llama(path, context, lora)
        try:
            yield lambda prompt, stop_ids, generation: _llama_pieces(llm, prompt, stop_ids, generation, max_tokens)
        finally:
            llm.close()
        return
    model, tokenizer = _load_mlx(artifact, artifacts)
    yield lambda prompt, stop_ids, generation: _mlx_pieces(model, tokenizer, prompt, stop_ids, generation, max_tokens)


def _llama_pieces(llm, prompt, stop_ids, generation, max_tokens) -> Iterator[str]:
    greedy = generation["temperature"] == 0
    if not greedy:
        llm.set_seed(generation["seed"])
    ids = []
    stream = llm.generate(
        prompt,
        temp=generation["temperature"],
        top_k=1 if greedy else 0,
        top_p=1.0 if greedy else generation["top_p"],
        min_p=0.0,
        repeat_penalty=1.0,
        reset=True,
    )
    yield from _decoded(llm.detokenize, stream, stop_ids, max_tokens, ids)


def _mlx_pieces(model, tokenizer, prompt, stop_ids, generation, max_tokens) -> Iterator[str]:
    mx.random.seed(generation["seed"])
    sampler = make_sampler(temp=generation["temperature"], top_p=generation["top_p"])
    stream = (r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler))
    yield from _decoded(lambda ids: tokenizer.decode(ids).encode("utf-8"), stream, stop_ids, max_tokens, [])


def _decoded(detokenize, stream, stop_ids: set[int], max_tokens: int, ids: list[int]) -> Iterator[str]:
    """Text pieces as tokens arrive, holding back bytes that do not decode yet (a character split across
    tokens); the first stop token (not shown) or max_tokens ends it."""
    shown = ""
    for token in stream:
        if int(token) in stop_ids:
            break
        ids.append(int(token))
        text = detokenize(ids).decode("utf-8", errors="replace").lstrip()
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
        if len(ids) >= max_tokens:
            break


def _load_mlx(artifact: dict, artifacts: list[dict]):
    if artifact["kind"] == "adapter":
        base = _by_kind(artifacts, "base")
        return load(str(paths.resolve(base["path"])), adapter_path=str(paths.resolve(artifact["path"])))
    model, tokenizer = load(str(paths.resolve(artifact["path"])))
    if artifact["kind"] == "mlx-quantized" and mx.default_device() == mx.cpu:
        model = dequantize_model(model)  # as eval scored it: the same values, through BLAS
    return model, tokenizer


def _by_kind(artifacts: list[dict], *kinds: str) -> dict:
    return next(a for kind in kinds for a in artifacts if a["kind"] == kind)


if __name__ == "__main__":
    sys.exit(main())
