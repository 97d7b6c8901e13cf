"""Answer tokens/s of a finished default run, three ways: the fused model in MLX one prompt at a time
(mlx-lm's stream_generate, as a chat front end answers) and batched the way eval answers
(eval.mlx_generate, every test prompt at once), both with eval's NumPy activations on CPU; and the
Q4_K_M GGUF batched in llama.cpp the way eval answers (lm.llama_runner.greedy_batch). Greedy, each
answer capped as eval caps it; prompt processing is included in every figure. Prints one JSON object;
`bench/run.py` runs it in a fresh process.

    PYTHONPATH=scripts python bench/answer_speed.py PROJECT [--one-at-a-time N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import config, contracts, paths, runtime, splits

import orjson
from mlx_lm import load
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

import eval as eval_stage
from lm import fast_exp, llama_runner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="a project where the default `make quantize` has run")
    parser.add_argument("--one-at-a-time", type=int, default=8, help="test prompts answered one at a time")
    parser.add_argument("--gguf-type", default="Q4_K_M", help="the quantized GGUF answered in llama.cpp")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    paths.use_root(args.project)
    print(orjson.dumps(measure(args.one_at_a_time, args.gguf_type)).decode())
    return 0


def measure(one_at_a_time: int, gguf_type: str) -> dict[str, float]:
    cfg = config.load_config([])
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    artifacts = eval_stage.read_artifacts(cfg.experiment.name)
    by_kind = {a["kind"]: a for a in artifacts}
    quantized = next(a for a in artifacts if a["kind"] == "gguf" and a["path"].endswith(f"-{gguf_type}.gguf"))
    tokenizer = eval_stage.load_tokenizer(artifacts)
    records = splits.read_split(contract, "test", -1)
    prompts, references = eval_stage.prompts_and_references(records, contract, tokenizer)
    caps = eval_stage.answer_caps(references, tokenizer, cfg.eval.max_tokens)
    model, _ = load(str(paths.resolve(by_kind["fused"]["path"])))
    on_cpu = runtime.device_name() == "cpu"
    with fast_exp.scoring_activations(model) if on_cpu else contextlib.nullcontext():  # as eval runs it
        start, tokens = time.perf_counter(), 0
        for prompt, cap in zip(prompts[:one_at_a_time], caps):
            for response in stream_generate(model, tokenizer, prompt, max_tokens=cap, sampler=make_sampler(temp=0.0)):
                pass
            tokens += response.generation_tokens
        one = tokens / (time.perf_counter() - start)

        start = time.perf_counter()
        answers = eval_stage.mlx_generate(model, tokenizer, prompts, cfg.eval, None, caps)
        batched = sum(map(len, answers)) / (time.perf_counter() - start)

    start = time.perf_counter()
    stops = set(tokenizer.eos_token_ids)
    answers = llama_runner.greedy_batch(paths.resolve(quantized["path"]), prompts, max(caps), stops)
    llama = sum(len(ids[:cap]) for ids, cap in zip(answers, caps)) / (time.perf_counter() - start)
    return {"mlx_one_at_a_time": one, "mlx_batched": batched, "llama_cpp_batched": llama}


if __name__ == "__main__":
    sys.exit(main())
