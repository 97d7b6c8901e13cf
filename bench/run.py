"""make bench: the pipeline measured side by side with the raw tools, on the default model and data.

Writes bench/results.json (schema bench_results) and bench/results.md. Every figure is taken
--repeats times in this one run (min and median reported: these machines are shared and noisy), and
every comparison is a ratio of two figures measured here, side by side:

- train: steady-state tokens/s (all tokens processed and trained tokens; the first --warmup steps,
  load and compile excluded) of the pipeline's `make train`, of `python -m mlx_lm lora` with the same
  model, rank, scale, layers, batch, learning rate, seed and prompt masking (with the same OpenBLAS
  loaded first, so the BLAS is not what is compared), and of a PyTorch + PEFT loop (bench/
  torch_peft_train.py, in its own environment from `make bench-setup`) on the very batches the
  pipeline trains on; and the peak resident memory of the pipeline's train process;
- exports: the wall times of fuse, the float GGUF and Q4_K_M (from the stage manifests);
- eval, on the default run: the eval stage's wall time for every default artifact (no cached scores),
  and answer tokens/s of the fused model in MLX one prompt at a time and batched as eval answers, and
  of Q4_K_M batched in llama.cpp (bench/answer_speed.py);
- prepare: records/s on a generated 100k-record JSONL;
- matmul: float32 GFLOP/s with the BLAS the pipeline loads vs MLX's bundled reference BLAS;
- a no-op `make all` in the workspace (everything up to date): wall time.

The runs happen in a scratch copy of the project (bench/work/project, sharing .venv and the model
cache); the workspace's own outputs are never touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import config, contracts, paths, runtime
from pipeline import log as plog
from pipeline.manifest import output_path

import numpy as np
import orjson

log = logging.getLogger("bench")
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
TORCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
STEP_LINE = re.compile(r"Iter (\d+): Train loss [\d.]+.*?Tokens/sec ([\d.]+), Trained Tokens (\d+)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="how many times each figure is taken")
    parser.add_argument("--steps", type=int, default=8, help="steady-state training steps measured per run")
    parser.add_argument("--warmup", type=int, default=2, help="first training steps left out (compile, caches)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="measure only these (noop, matmul, train, exports, eval, prepare)"
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for results.json and results.md")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plog.setup_logging(args.verbose)
    run(args)
    return 0


def run(args) -> Path:
    wanted = set(args.only or ("noop", "matmul", "train", "exports", "eval", "prepare"))
    settings = {"repeats": args.repeats, "steps": args.steps, "warmup": args.warmup}
    measurements: dict[str, dict] = {}
    if "noop" in wanted:  # first: the workspace as it is when the bench starts
        measurements["noop_make_all_seconds"] = measure_noop_make_all(args.repeats)
    if "matmul" in wanted:
        measurements |= measure_matmul(args.repeats)
    if wanted & {"train", "exports", "eval"}:
        project = scratch_project()
        settings |= train_settings(project)
        if "train" in wanted:
            measurements |= measure_training(project, settings)
        if "exports" in wanted:
            measurements |= measure_exports(project, settings)
        if "eval" in wanted:
            measurements |= measure_eval(project, settings["repeats"])
    if "prepare" in wanted:
        measurements["prepare_records_per_second"] = measure_prepare(args.repeats)
    results = {
        "schema_version": contracts.schema_version("bench_results"),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "measurements": measurements,
        "ratios": ratios(measurements),
    }
    out = args.out / "results.json"
    contracts.write_json(out, results, "bench_results")
    contracts.write_bytes_atomic(args.out / "results.md", results_markdown(results).encode("utf-8"))
    log.info("wrote %s and results.md", out)
    return out


# --- the scratch project -------------------------------------------------------------------------


def scratch_project(name: str = "project", prepared: bool = True) -> Path:
    """A fresh copy of the project's code and config in bench/work/<name>, prepared (`make prepare`)."""
    shutil.rmtree(WORK / name, ignore_errors=True)
    WORK.mkdir(exist_ok=True)
    project = paths.copy_project(ROOT, WORK / name)
    if not prepared:
        return project
    make(project, "prepare")
    return project


def make(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "PIPELINE_ROOT"))}
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=project, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"bench: `make {' '.join(args)}` failed in {project}:\n{result.stderr[-2000:]}")
    return result


def train_settings(project: Path) -> dict:
    """The train settings every contender uses: the project's defaults (no override)."""
    paths.use_root(project)
    try:
        cfg = config.load_config([])
    finally:
        paths.use_root(ROOT)
    train = cfg.train
    return {
        "model": str(cfg.model.source),
        "batch_size": int(train.batch_size),
        "rank": int(train.lora.rank),
        "scale": float(train.lora.scale),
        "num_layers": int(train.num_layers),
        "learning_rate": float(train.learning_rate),
        "weight_decay": float(train.weight_decay),
        "seed": int(train.seed),
        "mask_prompt": bool(train.mask_prompt),
    }


# --- training -------------------------------------------------------------------------------------


def measure_training(project: Path, settings: dict) -> dict[str, dict]:
    steps = settings["warmup"] + settings["steps"]
    batches = pipeline_batches(project, settings, steps)
    np.savez(WORK / "batches.npz", **{f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()})
    runs = {name: [] for name in ("pipeline", "pipeline_all", "mlx_lm", "mlx_lm_all", "torch", "torch_all", "rss")}
    for repeat in range(settings["repeats"]):
        log.info("train, run %d of %d: pipeline, mlx_lm lora, PyTorch + PEFT", repeat + 1, settings["repeats"])
        trained, all_tokens, rss = pipeline_train(project, settings, batches)
        runs["pipeline"].append(trained)
        runs["pipeline_all"].append(all_tokens)
        runs["rss"].append(rss)
        trained, all_tokens = mlx_lm_train(project, settings)
        runs["mlx_lm"].append(trained)
        runs["mlx_lm_all"].append(all_tokens)
        if TORCH_PYTHON.is_file():
            trained, all_tokens = torch_train(project, settings)
            runs["torch"].append(trained)
            runs["torch_all"].append(all_tokens)
    unit = "tokens/s"
    measured = {
        "train_pipeline_trained": figure("pipeline `make train`, trained tokens/s", unit, runs["pipeline"]),
        "train_pipeline_all": figure("pipeline `make train`, all tokens/s", unit, runs["pipeline_all"]),
        "train_mlx_lm_trained": figure("`mlx_lm lora`, trained tokens/s", unit, runs["mlx_lm"]),
        "train_mlx_lm_all": figure("`mlx_lm lora`, all tokens/s", unit, runs["mlx_lm_all"]),
        "train_peak_rss_gb": figure("pipeline train, peak resident memory", "GB", runs["rss"], higher_is_better=False),
    }
    why = None if TORCH_PYTHON.is_file() else "not run: `make bench-setup` installs PyTorch + PEFT first"
    measured["train_torch_trained"] = figure("PyTorch + PEFT, trained tokens/s", unit, runs["torch"], why=why)
    measured["train_torch_all"] = figure("PyTorch + PEFT, all tokens/s", unit, runs["torch_all"], why=why)
    return measured


def pipeline_batches(project: Path, settings: dict, steps: int) -> list[dict[str, np.ndarray]]:
    """The first `steps` batches the pipeline's train takes (its own order and padding), as numpy."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from train import data as train_data

    paths.use_root(project)
    try:
        contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
        model_dir = output_path(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest"), "model")
        tokenizer = load_tokenizer(model_dir)
        items = train_data.load_split("train", contract, tokenizer, settings["mask_prompt"])
    finally:
        paths.use_root(ROOT)
    order = train_data.BatchOrder(items, settings["batch_size"], settings["seed"])
    batches = []
    for step in range(steps):
        inputs, targets, mask = order.batch(step, contract["max_seq_length"])
        batches.append({"inputs": np.array(inputs), "targets": np.array(targets), "mask": np.array(mask)})
    settings["model_dir"] = str(model_dir)
    settings["max_seq_length"] = int(contract["max_seq_length"])
    return batches


def pipeline_train(project: Path, settings: dict, batches) -> tuple[float, float, float]:
    """(trained tokens/s, all tokens/s, peak RSS in GB) of one fresh `make train`, steady state only."""
    steps = settings["warmup"] + settings["steps"]
    shutil.rmtree(project / "runs" / "main", ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, "make", "--no-print-directory", "train", f"SET={train_overrides(steps)}"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"bench: the pipeline's train failed in {project}:\n{result.stderr[-2000:]}")
    rss_gb = int(result.stdout.strip().splitlines()[-1]) / 2**20
    lines = [orjson.loads(line) for line in (project / "runs" / "main" / "metrics.jsonl").read_bytes().splitlines()]
    train = [line for line in lines if line["type"] == "train"]
    trained_before, seconds, trained, everything = 0, 0.0, 0, 0
    for line in train:
        step_trained = line["trained_tokens"] - trained_before
        trained_before = line["trained_tokens"]
        if line["step"] > settings["warmup"]:
            step_seconds = step_trained / line["tokens_per_second"]
            seconds += step_seconds
            trained += step_trained
            everything += batches[line["step"] - 1]["inputs"].size
    return trained / seconds, everything / seconds, rss_gb


def train_overrides(steps: int) -> str:
    return (
        f"train.iters={steps} train.steps_per_report=1 train.steps_per_eval={steps} train.save_every={steps} "
        "train.val_batches=1"
    )


def measure_exports(project: Path, settings: dict) -> dict[str, dict]:
    """fuse, float GGUF and Q4_K_M wall times: `make quantize` from a fresh fuse, each run."""
    found = {"fuse": [], "gguf-f16": [], "gguf-Q4_K_M": []}
    overrides = train_overrides(settings["warmup"] + settings["steps"])  # the trained adapter as it is
    for repeat in range(settings["repeats"]):
        log.info("exports, run %d of %d: fuse, float GGUF, Q4_K_M", repeat + 1, settings["repeats"])
        for name in ("fused", "quantized", "fuse.manifest.json", "quantize.manifest.json"):
            target = project / "runs" / "main" / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        if not (project / "runs" / "main" / "train.manifest.json").is_file():
            make(project, "train", f"SET={overrides}")
        make(project, "quantize", f"SET={overrides}")
        read = lambda stage: orjson.loads((project / "runs" / "main" / f"{stage}.manifest.json").read_bytes())  # noqa: E731
        found["fuse"].append(read("fuse")["wall_seconds"])
        seconds = read("quantize")["details"]["seconds"]
        found["gguf-f16"].append(seconds["gguf-f16"])
        found["gguf-Q4_K_M"].append(seconds["gguf-Q4_K_M"])
    return {
        "fuse_seconds": figure(
            "fuse (merge the adapter, check the logits)", "s", found["fuse"], higher_is_better=False
        ),
        "gguf_float_seconds": figure("float16 GGUF written", "s", found["gguf-f16"], higher_is_better=False),
        "gguf_q4_k_m_seconds": figure("Q4_K_M made by llama.cpp", "s", found["gguf-Q4_K_M"], higher_is_better=False),
    }


def measure_eval(project: Path, repeats: int) -> dict[str, dict]:
    """On the default run (default settings, trained once): the eval stage's wall time for every default
    artifact from an empty score cache, and answer tokens/s (bench/answer_speed.py, a fresh process):
    the fused model in MLX one prompt at a time and batched, and Q4_K_M batched in llama.cpp."""
    make(project, "quantize")
    walls, speeds = [], {}
    for repeat in range(repeats):
        log.info("eval, run %d of %d: make eval, then answer speeds", repeat + 1, repeats)
        shutil.rmtree(project / ".state" / "eval", ignore_errors=True)
        shutil.rmtree(project / "eval_out" / "main", ignore_errors=True)
        make(project, "eval")
        walls.append(orjson.loads((project / "eval_out" / "main" / "eval.manifest.json").read_bytes())["wall_seconds"])
        result = subprocess.run(
            [sys.executable, str(BENCH_DIR / "answer_speed.py"), str(project)],
            cwd=ROOT,
            env=clean_env() | {"PYTHONPATH": str(ROOT / "scripts")},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            sys.exit(f"bench: bench/answer_speed.py failed:\n{result.stderr[-2000:]}")
        for name, value in orjson.loads(result.stdout.strip().splitlines()[-1]).items():
            speeds.setdefault(name, []).append(value)
    unit = "tokens/s"
    return {
        "eval_seconds": figure(
            "eval stage, every default artifact (no cached scores)", "s", walls, higher_is_better=False
        ),
        "answers_mlx_one": figure(
            "answers, fused model in MLX, one prompt at a time", unit, speeds["mlx_one_at_a_time"]
        ),
        "answers_mlx_batched": figure("answers, fused model in MLX, batched as eval does", unit, speeds["mlx_batched"]),
        "answers_llama_batched": figure(
            "answers, Q4_K_M in llama.cpp, batched as eval does", unit, speeds["llama_cpp_batched"]
        ),
    }


def measure_prepare(repeats: int, records: int = 100_000) -> dict:
    """Records/s of the prepare stage (its manifest's wall time) on a generated JSONL of chat records."""
    project = scratch_project("prepare-project", prepared=False)
    source = WORK / "records-100k.jsonl"
    write_chat_records(source, records)
    rates = []
    for repeat in range(repeats):
        log.info("prepare, run %d of %d: %d records", repeat + 1, repeats, records)
        shutil.rmtree(project / "data")
        (project / "data").mkdir()
        make(project, "prepare", f"SET=data.source={source}")
        manifest = orjson.loads((project / "data" / "prepare.manifest.json").read_bytes())
        rates.append(records / manifest["wall_seconds"])
    return figure(
        f"prepare, {records // 1000}k chat records ({source.stat().st_size / 1e6:.0f} MB)", "records/s", rates
    )


def write_chat_records(path: Path, count: int) -> None:
    """`count` two-turn chats of ~35 random README words each way (seeded: the same file every time)."""
    rng = np.random.default_rng(0)
    words = np.array((ROOT / "README.md").read_text().split()[:400])
    with open(path, "wb") as f:
        for i in range(count):
            user, answer = (" ".join(rng.choice(words, 35)) for _ in range(2))
            messages = [{"role": "user", "content": f"{i} {user}"}, {"role": "assistant", "content": answer}]
            f.write(orjson.dumps({"messages": messages}) + b"\n")


RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB, of the largest process it waited for
sys.exit(code)
"""

MLX_LM_RECORDER = """
import json, sys
sys.path.insert(0, "scripts")
import pipeline  # the same OpenBLAS the pipeline loads; nothing else of the pipeline runs
import mlx_lm.lora as lora
from mlx_lm.tuner import trainer
from mlx_lm.tuner.callbacks import TrainingCallback

out, sys.argv = sys.argv[1], ["mlx_lm.lora", *sys.argv[2:]]
reports, train_batch_tokens = [], []

class Recorder(TrainingCallback):
    def on_train_loss_report(self, info):
        reports.append(info)

def recording_batches(*args, **kwargs):  # the tokens of each training batch, padding included
    for batch, lengths in trainer.iterate_batches(*args, **kwargs):
        if kwargs.get("loop"):
            train_batch_tokens.append(batch.size)
        yield batch, lengths

lora.get_reporting_callbacks = lambda *args, **kwargs: Recorder()
lora.train = lambda *args, **kwargs: trainer.train(*args, iterate_batches=recording_batches, **kwargs)
lora.main()
json.dump({"reports": reports, "train_batch_tokens": train_batch_tokens}, open(out, "w"))
"""


def mlx_lm_train(project: Path, settings: dict) -> tuple[float, float]:
    """(trained, all) tokens/s of `mlx_lm lora` (its own main, with a callback recording each step and its
    batches' sizes, padding included, as the pipeline's all tokens are), steady state."""
    steps = settings["warmup"] + settings["steps"]
    data_dir = WORK / "mlx_lm_data"
    data_dir.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        shutil.copy2(project / "data" / f"{split}.jsonl", data_dir / f"{split}.jsonl")
    lora_config = WORK / "mlx_lm_lora.yaml"
    lora_config.write_text(
        f"lora_parameters: {{rank: {settings['rank']}, scale: {settings['scale']}, dropout: 0.0}}\n"
        f"optimizer: adamw\noptimizer_config: {{adamw: {{weight_decay: {settings['weight_decay']}}}}}\n"
    )
    adapter_dir = WORK / "mlx_lm_adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    report = WORK / "mlx_lm_steps.json"
    command = [
        sys.executable, "-c", MLX_LM_RECORDER, str(report),
        "--model", settings["model_dir"], "--train", "--data", str(data_dir), "-c", str(lora_config),
        "--fine-tune-type", "lora", "--num-layers", str(settings["num_layers"]),
        "--batch-size", str(settings["batch_size"]), "--iters", str(steps),
        "--learning-rate", str(settings["learning_rate"]), "--steps-per-report", "1",
        "--steps-per-eval", str(steps + 1), "--val-batches", "1", "--save-every", str(steps + 1),
        "--adapter-path", str(adapter_dir), "--seed", str(settings["seed"]),
        "--max-seq-length", str(settings["max_seq_length"]),
    ] + (["--mask-prompt"] if settings["mask_prompt"] else [])  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: mlx_lm lora failed:\n{result.stderr[-2000:]}")
    recorded = orjson.loads(report.read_bytes())
    steady = [r for r in recorded["reports"] if r["iteration"] > settings["warmup"]]
    trained = [r["tokens_per_second"] for r in steady]
    seconds = [1 / r["iterations_per_second"] for r in steady]
    everything = sum(recorded["train_batch_tokens"][r["iteration"] - 1] for r in steady)
    return sum(t * s for t, s in zip(trained, seconds)) / sum(seconds), everything / sum(seconds)


def torch_train(project: Path, settings: dict) -> tuple[float, float]:
    """(trained, all) tokens/s of the PyTorch + PEFT reference on the pipeline's own batches, steady state."""
    out = WORK / "torch_steps.json"
    command = [
        str(TORCH_PYTHON), str(BENCH_DIR / "torch_peft_train.py"),
        "--model", settings["model_dir"], "--batches", str(WORK / "batches.npz"), "--out", str(out),
        "--rank", str(settings["rank"]), "--alpha", str(settings["scale"] * settings["rank"]),
        "--num-layers", str(settings["num_layers"]), "--lr", str(settings["learning_rate"]),
        "--weight-decay", str(settings["weight_decay"]), "--threads", str(runtime.cpu_threads()),
        "--warmup-steps", str(settings["warmup"]), "--seed", str(settings["seed"]),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: the PyTorch + PEFT reference failed:\n{result.stderr[-2000:]}")
    steady = [s for s in orjson.loads(out.read_bytes())["steps"] if not s.get("warmup")]
    seconds = sum(s["seconds"] for s in steady)
    return sum(s["trained_tokens"] for s in steady) / seconds, sum(s["tokens"] for s in steady) / seconds


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "PIPELINE_ROOT", "MFLAGS"))}


# --- matmul and make ------------------------------------------------------------------------------

MATMUL = """
import sys
sys.path.insert(0, "scripts")
import pipeline
from pipeline import runtime
from doctor import matmul_gflops
print(runtime.blas_summary()["name"], matmul_gflops(int(sys.argv[1]), int(sys.argv[2])))
"""


def measure_matmul(repeats: int, size: int = 1024) -> dict[str, dict]:
    """float32 GFLOP/s with the BLAS the pipeline loads and with MLX's bundled one (PIPELINE_BLAS=reference)."""
    found = {}
    for key, env in (("fast", {}), ("reference", {"PIPELINE_BLAS": "reference"})):
        values, name = [], None
        for _ in range(repeats):
            result = subprocess.run(
                [sys.executable, "-c", MATMUL, str(size), "5"],
                cwd=ROOT,
                env=clean_env() | env,
                capture_output=True,
                text=True,
                check=True,
            )
            name, value = result.stdout.split()
            values.append(float(value))
        found[f"matmul_{key}_gflops"] = figure(f"float32 matmul {size}³, {name} BLAS", "GFLOP/s", values)
    return found


def measure_noop_make_all(repeats: int) -> dict:
    """`make all` in the workspace when everything is up to date (Make only reads the config and compares).
    `make -n all` tells first whether it is: it lists a stage's command for anything out of date."""
    env = clean_env()
    dry_run = subprocess.run(["make", "-n", "all"], cwd=ROOT, env=env, capture_output=True, text=True)
    if dry_run.returncode != 0 or "PYTHONPATH=scripts" in dry_run.stdout:
        return figure("no-op `make all`", "s", [], why="not run: the workspace has work to do (run `make all` first)")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["make", "all"], cwd=ROOT, env=env, capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return figure("no-op `make all` (everything up to date)", "s", seconds, higher_is_better=False)


# --- results --------------------------------------------------------------------------------------


def figure(what: str, unit: str, values: list[float], why: str | None = None, higher_is_better=True) -> dict:
    if not values:
        return {"what": what, "unit": unit, "status": "not run", "reason": why or "no values", "runs": []}
    best = max(values) if higher_is_better else min(values)
    return {
        "what": what,
        "unit": unit,
        "status": "ok",
        "runs": [round(v, 4) for v in values],
        "best": round(best, 4),
        "median": round(statistics.median(values), 4),
        "higher_is_better": higher_is_better,
    }


RATIOS = (
    ("pipeline train / mlx_lm lora (trained tokens/s)", "train_pipeline_trained", "train_mlx_lm_trained"),
    ("pipeline train / mlx_lm lora (all tokens/s)", "train_pipeline_all", "train_mlx_lm_all"),
    ("pipeline train / PyTorch + PEFT (trained tokens/s)", "train_pipeline_trained", "train_torch_trained"),
    ("pipeline train / PyTorch + PEFT (all tokens/s)", "train_pipeline_all", "train_torch_all"),
    ("loaded BLAS / MLX's bundled BLAS (GFLOP/s)", "matmul_fast_gflops", "matmul_reference_gflops"),
    ("MLX batched / MLX one prompt at a time (answer tokens/s)", "answers_mlx_batched", "answers_mlx_one"),
    ("llama.cpp Q4_K_M batched / MLX batched (answer tokens/s)", "answers_llama_batched", "answers_mlx_batched"),
)


def ratios(measurements: dict) -> list[dict]:
    out = []
    for name, top, bottom in RATIOS:
        a, b = measurements.get(top), measurements.get(bottom)
        if a and b and a["status"] == b["status"] == "ok":
            out.append({"name": name, "of": top, "to": bottom, "median": round(a["median"] / b["median"], 3)})
    return out


def machine() -> dict:
    return {
        "platform": f"{platform.system()}-{platform.machine()}",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "blas": runtime.blas_summary()["name"],
        "threads": runtime.cpu_threads(),
        "versions": runtime.versions(("mlx", "mlx-lm", "llama-cpp-python")),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['measured_at'][:10]} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GiB, "
        f"{m['platform']}, {m['blas']} BLAS, {m['threads']} threads); each figure taken "
        f"{results['settings']['repeats']}× side by side in one run, best and median shown.",
        "",
        "| measurement | unit | best | median | runs |",
        "|---|---|---|---|---|",
    ]
    for item in results["measurements"].values():
        if item["status"] == "ok":
            runs = ", ".join(f"{v:.4g}" for v in item["runs"])
            lines.append(f"| {item['what']} | {item['unit']} | {item['best']:.4g} | {item['median']:.4g} | {runs} |")
        else:
            lines.append(f"| {item['what']} | {item['unit']} | – | – | {item['reason']} |")
    lines += ["", "| ratio (medians) | value |", "|---|---|"]
    lines += [f"| {r['name']} | {r['median']:.2f}× |" for r in results["ratios"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
