"""train stage: LoRA / DoRA / full fine-tuning on mlx-lm, resumable, observable and bit-reproducible.

Reads config section `train`, runs/model.manifest.json (run_manifest), data/data_contract.json
(data_contract), data/data_catalog.json (data_catalog) and the train/valid splits. Writes under
runs/<experiment>/: adapter/ (adapters.safetensors, adapter_config.json), checkpoints/ (weights,
optimizer state, RNG state and data position: a resumed run ends with the same bytes), metrics.jsonl
(schema metrics, one line per report), loss.png, a row of runs/experiments.csv (experiment_row) and,
last, train.manifest.json (run_manifest).

With config section `distributed` set, this process launches the run's ranks with mlx.launch
(train.launch) and each rank runs `train` (below) on its share of every batch; rank 0 writes the files.

Built on mlx-lm's pieces (model loading, linear_to_lora_layers, build_schedule, its optimizers) with
its own loop, because mlx-lm's `train` cannot restore optimizer state or data order, stop early,
or train every assistant turn of a chat.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, distributed, paths, runtime, stages
from pipeline import log as plog
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_path
from pipeline.splits import removed_summary
from pipeline.staging import staging_folder

import matplotlib
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import orjson
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

from lm import fast_exp
from train import data as train_data
from train import prefix, ranks
from train import state as train_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

log = logging.getLogger("train")


def build_parser():
    return cli.stage_parser("train", __doc__)


def resumable_checkpoints(run_dir: Path) -> Path:
    """Where a run that was stopped keeps its checkpoints until it is resumed and finishes."""
    return staging_folder(run_dir, "train", run_dir.name) / "checkpoints"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("train", args, lambda cfg: run(cfg, rank_arguments(args)))


def rank_arguments(args) -> list[str]:
    """The command line every rank of a distributed run gets: this one's."""
    return [
        *args.overrides,
        *(["--override", args.override] if args.override else []),
        *(["-v"] if args.verbose else []),
    ]


def run(cfg, rank_args: list[str] | tuple = ()) -> dict:
    """Train in this process, or with `distributed` set, launch the ranks that do."""
    if distributed.configured(cfg) and not distributed.launched():
        return ranks.launch_ranks(cfg, list(rank_args), resumable_checkpoints(paths.run_dir(cfg.experiment.name)))
    group = distributed.join(cfg.distributed) if distributed.configured(cfg) else distributed.Group()
    try:
        return train(cfg, group)
    except RuntimeError as exc:
        lost = distributed.transport_error(exc, group)
        if lost is None:
            raise
        raise lost from exc
    finally:
        group.stop_watchdog()


def train(cfg, group: distributed.Group) -> dict:
    """The training run; in a distributed one, this rank's part of it (rank 0 writes every file)."""
    tcfg = cfg.train
    experiment = cfg.experiment.name
    run_dir = paths.run_dir(experiment)
    stage = (
        StageRun("train", {"train": config.section(cfg, "train")}, experiment=experiment) if group.rank == 0 else None
    )
    model_manifest = stages.read_manifest("model")
    stages.read_manifest("prepare")
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    catalog = contracts.read_json(paths.DATA_CATALOG, "data_catalog")
    model_dir = output_path(model_manifest, "model")
    iters = total_iterations(tcfg, catalog)
    check_dataset_size(catalog, contracts.read_json(paths.DATA_REPORT, "data_report"), tcfg)
    ranks.check_batch_split(tcfg.batch_size, group.size)

    model, tokenizer = load_base(model_dir, tcfg)
    memory_guard(model, tcfg, contract, catalog)
    mx.random.seed(tcfg.seed)  # before the adapters exist: their initial weights come from this seed
    adapter_config = attach_adapters(model, tcfg)
    start_from = start_adapter(tcfg, adapter_config)
    if start_from is not None:
        model.load_weights(str(start_from / "adapters.safetensors"), strict=False)
        log.info("starting from the adapter of experiment '%s' (%s)", tcfg.init_from, paths.display(start_from))
    train_set = train_data.load_split("train", contract, tokenizer, tcfg.mask_prompt)
    valid_set = train_data.load_split("valid", contract, tokenizer, tcfg.mask_prompt)
    optimizer = build_optimizer(tcfg, iters)

    # Checkpoints and metrics of this run live in staging until it ends (a resumed run continues them);
    # the adapter, metrics, loss curve and checkpoints of the last finished run stay as they are till then.
    start_sha256 = file_entry("start_adapter", start_from)["sha256"] if start_from is not None else None
    fingerprint = train_state.fingerprint(
        model_manifest, catalog, adapter_config, config.section(cfg, "train"), start_sha256, group.size
    )
    ranks.check_same_everywhere(group, fingerprint, catalog)
    checkpoints, metrics, state = start_state(stage, run_dir, fingerprint, model, optimizer, tcfg.resume)
    state = ranks.share_start(group, checkpoints, model, optimizer, state)

    splits = train_data.Splits(train_set, valid_set, contract["max_seq_length"])
    loop = TrainingLoop(model, optimizer, tcfg, splits, iters, (checkpoints, metrics), state, group)
    with fast_exp.fast_activations(model):  # SiLU and the attention softmax with a vectorized exp on CPU
        loop.run()
    if group.rank != 0:
        return loop.summary()

    write_adapter(stage.staged(run_dir / "adapter"), model, adapter_config, checkpoints, state, tcfg)
    plot_losses(metrics.path, stage.staged(run_dir / "loss.png"), experiment)
    summary = loop.summary()
    inputs = [
        file_entry("model", paths.MODEL_MANIFEST),
        file_entry("data_contract", paths.DATA_CONTRACT),
        file_entry("train_split", paths.split_file("train")),
        file_entry("valid_split", paths.split_file("valid")),
        *([file_entry("start_adapter", start_from)] if start_from is not None else []),
    ]
    outputs = [
        stage.entry("adapter", run_dir / "adapter"),
        stage.entry("metrics", run_dir / "metrics.jsonl"),
        stage.entry("loss_plot", run_dir / "loss.png"),
    ]
    details = {
        **summary,
        "iterations_planned": iters,
        "adapter_config": adapter_config,
        "blas": runtime.blas_summary()["name"],
        "fingerprint": fingerprint,
        **({"distributed": ranks.run_record(cfg.distributed, group)} if group.size > 1 else {}),
    }
    stage.finish(run_dir / "train.manifest.json", inputs, outputs, details)
    log.info(
        "trained %s: %d steps, val loss %.3f -> %.3f, %.0f tok/s",
        experiment,
        summary["steps"],
        summary["first_val_loss"],
        summary["best_val_loss"],
        summary["tokens_per_second"],
    )
    return summary


# --- setup -------------------------------------------------------------------------------------


def start_state(stage: StageRun | None, run_dir: Path, fingerprint: dict, model, optimizer, resume: str) -> tuple:
    """(checkpoints, metrics log, loop state): on rank 0 (the one with a StageRun) restored from a matching
    checkpoint or fresh; on the other ranks (None, None, a fresh state), which rank 0's then replaces."""
    if stage is None:
        return None, None, train_state.LoopState()
    checkpoints = train_state.Checkpoints(stage.staged(run_dir / "checkpoints", keep=True), fingerprint)
    state = checkpoints.restore(model, optimizer, mode=resume)
    metrics = train_state.MetricsLog(stage.staged(run_dir / "metrics.jsonl", keep=True), keep_until=state.step)
    return checkpoints, metrics, state


def total_iterations(tcfg, catalog: dict) -> int:
    if tcfg.epochs is not None:
        records = catalog["splits"]["train"]["records"]
        return max(1, math.ceil(float(tcfg.epochs) * records / tcfg.batch_size))
    if tcfg.iters < 1:
        raise PipelineError(
            "train.iters must be at least 1", where="train.iters", fix="set train.iters or train.epochs"
        )
    return int(tcfg.iters)


def check_dataset_size(catalog: dict, report: dict, tcfg) -> None:
    for split in ("train", "valid"):
        records = catalog["splits"][split]["records"]
        if records < tcfg.batch_size:
            raise PipelineError(
                f"the {split} split has {records} records, fewer than one batch of {tcfg.batch_size}; "
                f"prepare: {removed_summary(report, split)}",
                where=paths.display(paths.split_file(split)),
                fix=f"lower train.batch_size to {max(1, records)} or add data",
            )


def load_base(model_dir: Path, tcfg):
    model, tokenizer = load(str(model_dir))
    dtype = runtime.resolve_dtype(tcfg.dtype)
    model.set_dtype(getattr(mx, dtype))
    model.freeze()
    return model, tokenizer


def attach_adapters(model, tcfg) -> dict:
    layers = len(model.layers)
    num_layers = layers if tcfg.num_layers in (-1, None) else min(int(tcfg.num_layers), layers)
    lora_parameters = {"rank": tcfg.lora.rank, "scale": tcfg.lora.scale, "dropout": tcfg.lora.dropout}
    keys = tcfg.lora["keys"]  # not .keys: DictConfig has a keys() method
    if keys:
        lora_parameters["keys"] = list(keys)
    if tcfg.fine_tune_type == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:  # lora or dora (the config schema allows nothing else)
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=tcfg.fine_tune_type == "dora")
    return {"fine_tune_type": tcfg.fine_tune_type, "num_layers": num_layers, "lora_parameters": lora_parameters}


def start_adapter(tcfg, adapter_config: dict) -> Path | None:
    """The adapter folder of the experiment this one continues (train.init_from), checked to have the
    same shape as this one's; None when it starts from the base model."""
    parent = tcfg.init_from
    if parent is None:
        return None
    folder = output_path(stages.read_manifest("train", parent), "adapter")
    theirs = orjson.loads((folder / "adapter_config.json").read_bytes())
    mine = {"fine_tune_type": adapter_config["fine_tune_type"], "num_layers": adapter_config["num_layers"]}
    mine |= {k: adapter_config["lora_parameters"].get(k) for k in ("rank", "keys")}
    found = {k: theirs.get(k) for k in ("fine_tune_type", "num_layers")}
    found |= {k: (theirs.get("lora_parameters") or {}).get(k) for k in ("rank", "keys")}
    different = [k for k in mine if mine[k] != found[k] and not (k == "keys" and mine[k] is None)]
    if different:
        raise PipelineError(
            f"the adapter of experiment '{parent}' has another shape: "
            + ", ".join(f"{k} {found[k]} (this one: {mine[k]})" for k in different),
            where="train.init_from",
            fix="give this experiment the same fine_tune_type, num_layers, lora.rank and lora.keys as the one it "
            "continues",
        )
    return folder


OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
    "muon": optim.Muon,
}


def build_optimizer(tcfg, iters: int):
    warmup = min(int(tcfg.warmup_steps), max(iters - 1, 0))
    if tcfg.lr_schedule == "constant":
        schedule = (
            build_schedule({"name": "cosine_decay", "arguments": [tcfg.learning_rate, 10**12], "warmup": warmup})
            if warmup
            else tcfg.learning_rate
        )
    elif tcfg.lr_schedule in ("cosine", "linear"):
        name, arguments = (
            ("cosine_decay", [tcfg.learning_rate, max(iters - warmup, 1)])
            if tcfg.lr_schedule == "cosine"
            else ("linear_schedule", [tcfg.learning_rate, 0.0, max(iters - warmup, 1)])
        )
        schedule = build_schedule({"name": name, "arguments": arguments, "warmup": warmup})
    kwargs = {"learning_rate": schedule}
    if tcfg.optimizer == "adamw":
        kwargs["weight_decay"] = tcfg.weight_decay
    return OPTIMIZERS[tcfg.optimizer](**kwargs)


def memory_guard(model, tcfg, contract: dict, catalog: dict) -> None:
    """Refuse a run that cannot fit, before spending minutes on it."""
    params = tree_flatten(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in params)
    n_layers = len(model.layers) if tcfg.num_layers in (-1, None) else min(int(tcfg.num_layers), len(model.layers))
    hidden = getattr(model.args, "hidden_size", 1024)
    heads = getattr(model.args, "num_attention_heads", 16)
    report = contracts.read_json(paths.DATA_REPORT, "data_report")
    seq = min(contract["max_seq_length"], max(report["splits"][s]["tokens"]["max"] for s in ("train", "valid")) or 1)
    itemsize = 4 if runtime.resolve_dtype(tcfg.dtype) == "float32" else 2
    trainable = (
        weight_bytes * (n_layers / max(len(model.layers), 1)) if tcfg.fine_tune_type == "full" else weight_bytes * 0.02
    )
    optimizer_bytes = trainable * 3  # gradient + two moments
    per_layer = tcfg.batch_size * seq * (hidden * 24 + heads * seq * 2) * itemsize
    activations = per_layer * (1 if tcfg.grad_checkpoint else len(model.layers))
    needed = weight_bytes + optimizer_bytes + activations
    available = runtime.available_memory_bytes()
    log.info(
        "memory estimate %.2f GB (weights %.2f, optimizer %.2f, activations %.2f) of %.1f GB available",
        needed / 1e9,
        weight_bytes / 1e9,
        optimizer_bytes / 1e9,
        activations / 1e9,
        (available or 0) / 1e9,
    )
    if available and needed > 0.9 * available:
        hints = [f"train.batch_size={max(1, tcfg.batch_size // 2)}"]
        if not tcfg.grad_checkpoint:
            hints.append("train.grad_checkpoint=true")
        hints.append(f"train.num_layers={max(1, n_layers // 2)}")
        if tcfg.fine_tune_type == "full":
            hints.append("train.fine_tune_type=lora")
        raise PipelineError(
            f"this run needs about {needed / 1e9:.1f} GB but {available / 1e9:.1f} GB is available",
            where="train",
            fix="try " + " or ".join(hints) + f" (or a smaller data.max_seq_length than {contract['max_seq_length']})",
        )


# --- the loop ----------------------------------------------------------------------------------


class TrainingLoop:
    """The steps, validation, reports and checkpoints of a run. In a distributed run every rank runs it on
    its share of each batch; `checkpoints` and `metrics` are None but on rank 0, which alone writes."""

    def __init__(self, model, optimizer, tcfg, splits, iters: int, written: tuple, state, group: distributed.Group):
        self.model, self.optimizer, self.tcfg, self.iters = model, optimizer, tcfg, iters
        self.train_set, self.valid_set, self.max_seq_length = splits.train, splits.valid, splits.max_seq_length
        self.checkpoints, self.metrics = written  # (Checkpoints, MetricsLog), or (None, None) but on rank 0
        self.state, self.group = state, group
        self.batches = train_data.BatchOrder(self.train_set, tcfg.batch_size, tcfg.seed)
        # The shared system prompt through the frozen layers once (train.prefix); None: the plain body.
        self.body = prefix.body(model, self.train_set + self.valid_set)
        if self.body is not None:
            log.info(
                "the %d tokens every record starts with run once through the %d frozen layers",
                prefix.shared_length(self.train_set + self.valid_set),
                prefix.frozen_layers(model),
            )
        self.started = time.monotonic()
        self.last_train_loss = float("nan")

    def run(self) -> None:
        step_fn = self.compiled_step()
        accum = int(self.tcfg.grad_accumulation_steps)
        tokens, window_seconds = 0, 0.0
        grad = None
        bar = plog.StepProgress(self.iters, self.state.step, log)
        with bar:
            for step in range(self.state.step + 1, self.iters + 1):
                if self.should_eval(step):
                    if self.evaluate(step - 1):
                        break
                tic = time.perf_counter()
                batch = self.batches.batch_for(self.model, step - 1, self.max_seq_length, ranks.share(self.group))
                loss, ntoks, grad = step_fn(batch, grad, step % accum == 0)
                mx.eval(self.model.state, self.optimizer.state, loss, ntoks, grad)
                self.group.alive()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise PipelineError(
                        f"the training loss became {loss_value} at step {step}",
                        where="train.learning_rate",
                        fix=f"lower train.learning_rate (now {self.tcfg.learning_rate}); the last good "
                        f"checkpoint (step {self.state.step}) is kept",
                    )
                seconds = time.perf_counter() - tic
                tokens += int(ntoks.item())
                window_seconds += seconds
                self.state.window_loss += loss_value
                self.state.window_steps += 1
                self.state.train_seconds += seconds
                self.state.trained_tokens += int(ntoks.item())
                self.state.step = step
                bar.advance(step, loss_value, int(ntoks.item()) / seconds)
                if step % self.tcfg.steps_per_report == 0 or step == self.iters:
                    self.report(step, self.state.window_loss / self.state.window_steps, tokens / window_seconds, bar)
                    self.state.window_loss, self.state.window_steps = 0.0, 0
                    tokens, window_seconds = 0, 0.0
                if (
                    step % accum == 0
                    and (step % self.tcfg.save_every == 0)
                    and step < self.iters
                    and self.checkpoints is not None
                ):
                    self.checkpoints.save(self.model, self.optimizer, self.state)
            else:
                if self.valid_set and not self.state.stopped_early:
                    self.evaluate(self.state.step)

    def compiled_step(self):
        model, optimizer = self.model, self.optimizer
        accum = int(self.tcfg.grad_accumulation_steps)
        if self.tcfg.grad_checkpoint:
            grad_checkpoint(model.layers[0])
        if self.group.size > 1:
            return ranks.compiled_step(model, optimizer, accum, self.group, self.body)
        value_and_grad = nn.value_and_grad(model, train_data.loss_for(model, self.body))
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, prev_grad, do_update):
            (loss, ntoks), grad = value_and_grad(model, *batch)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            if do_update:
                if accum > 1:
                    grad = tree_map(lambda g: g / accum, grad)
                optimizer.update(model, grad)
                grad = None
            return loss, ntoks, grad

        model.train()
        return step

    def should_eval(self, step: int) -> bool:
        return (
            bool(self.valid_set)
            and (step == 1 or (step - 1) % self.tcfg.steps_per_eval == 0)
            and step - 1 != self.state.last_eval_step
        )

    def evaluate(self, step: int) -> bool:
        """Validation loss at `step`; True when early stopping says stop."""
        tic = time.perf_counter()
        val_loss = train_data.validation_loss(
            self.model,
            self.valid_set,
            self.tcfg.batch_size,
            self.tcfg.val_batches,
            self.max_seq_length,
            ranks.share(self.group),
            self.group,
            self.body,
        )
        self.model.train()
        self.state.last_eval_step = step
        if self.metrics is not None:
            self.metrics.write(
                {"type": "val", "step": step, "val_loss": val_loss, "seconds": round(time.perf_counter() - tic, 3)}
            )
        log.info("step %d  val_loss %.4f", step, val_loss)
        self.state.val_losses.append(val_loss)
        patience, min_delta = int(self.tcfg.early_stopping.patience), float(self.tcfg.early_stopping.min_delta)
        if self.state.best_val_loss is None or val_loss < self.state.best_val_loss - min_delta:
            self.state.best_val_loss, self.state.best_step, self.state.evals_without_gain = val_loss, step, 0
            if step > 0 and self.checkpoints is not None:
                self.checkpoints.save_best(self.model, step)
            return False
        self.state.evals_without_gain += 1
        if patience > 0 and self.state.evals_without_gain >= patience:
            log.info(
                "early stopping at step %d: no improvement of %.4f for %d evaluations (best %.4f at step %d)",
                step,
                min_delta,
                patience,
                self.state.best_val_loss,
                self.state.best_step,
            )
            self.state.stopped_early = True
            return True
        return False

    def report(self, step: int, train_loss: float, tokens_per_second: float, bar) -> None:
        lr = (
            float(self.optimizer.learning_rate.item())
            if hasattr(self.optimizer.learning_rate, "item")
            else float(self.optimizer.learning_rate)
        )
        peak = mx.get_peak_memory() / 1e9
        self.last_train_loss = train_loss
        if self.metrics is None:
            return
        line = {
            "type": "train",
            "step": step,
            "loss": train_loss,
            "lr": lr,
            "tokens_per_second": round(tokens_per_second, 1),
            "peak_memory_gb": round(peak, 3),
            "trained_tokens": self.state.trained_tokens,
        }
        self.metrics.write(line)
        bar.report(
            f"step {step}/{self.iters}  loss {train_loss:.3f}  lr {lr:.2e}  tok/s {tokens_per_second:.0f}  "
            f"peak {peak:.2f} GB"
        )

    def summary(self) -> dict:
        val = self.state.val_losses
        return {
            "steps": self.state.step,
            "stopped_early": self.state.stopped_early,
            "first_val_loss": val[0] if val else None,
            "final_val_loss": val[-1] if val else None,
            "best_val_loss": self.state.best_val_loss,
            "best_step": self.state.best_step,
            "final_train_loss": self.last_train_loss if math.isfinite(self.last_train_loss) else None,
            "tokens_per_second": round(self.state.trained_tokens / self.state.train_seconds, 1)
            if self.state.train_seconds
            else 0.0,
            "trained_tokens": self.state.trained_tokens,
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
            "train_seconds": round(self.state.train_seconds, 2),
        }


# --- outputs -----------------------------------------------------------------------------------


def write_adapter(adapter_dir: Path, model, adapter_config: dict, checkpoints, state, tcfg) -> Path:
    """adapter/: the best checkpoint's weights when early stopping is on, else the last step's."""
    use_best = int(tcfg.early_stopping.patience) > 0 and checkpoints.best_weights().is_file()
    with contracts.atomic_dir(adapter_dir) as tmp:
        if use_best:
            (tmp / "adapters.safetensors").write_bytes(checkpoints.best_weights().read_bytes())
        else:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        config_out = {**adapter_config, "from_step": state.best_step if use_best else state.step, "seed": tcfg.seed}
        (tmp / "adapter_config.json").write_bytes(
            orjson.dumps(config_out, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        )
    return adapter_dir


def plot_losses(metrics_path: Path, out: Path, experiment: str) -> None:
    rows = [orjson.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["type"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked cross-entropy)")
    ax.set_title(f"{experiment}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with contracts.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
