"""train across several processes (config section `distributed`): launching the ranks, and what each
rank does differently from a run in one process.

Data-parallel, as mlx-lm's trainer: `train.batch_size` stays the global batch and every rank takes its
contiguous share of each batch (so the batches, and the adapter, are the ones a single process would
train on, up to float rounding). Each rank's gradient is of its summed token losses scaled by
world / (the batch's trained tokens, summed over ranks); mlx.nn.average_gradients then gives every
rank the gradient of the global token-weighted mean loss, the single-process loss. Every rank seeds
alike, so the adapters start and stay identical; rank 0 alone writes, and a resumed run's checkpoint
reaches the other ranks as bytes from rank 0 (hosts need not share a file system).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

from pipeline import distributed, hashing, paths, stages
from pipeline.errors import PipelineError

import mlx.core as mx
import mlx.nn as nn
import orjson
from mlx.utils import tree_map

from train import data as train_data
from train import state as train_state

log = logging.getLogger("train")


# --- launching -----------------------------------------------------------------------------------


def launch_ranks(cfg, rank_args: list[str], checkpoints: Path) -> dict:
    """Run the training on every rank of `distributed` with mlx.launch; the run's summary, or one line
    saying which rank failed and how, with the checkpoint a new `make train` resumes from."""
    dcfg, experiment = cfg.distributed, cfg.experiment.name
    entries = distributed.rank_hosts(dcfg)
    check_batch_split(cfg.train.batch_size, len(entries))
    if dcfg.backend == "ring":
        distributed.check_ports_free(entries, int(dcfg.port))
    manifest = paths.run_dir(experiment) / "train.manifest.json"
    started = time.time()
    outcome = distributed.launch(dcfg, ["-m", "train", *rank_args], entries, f"train-{experiment}")
    if outcome.ok and manifest.is_file() and manifest.stat().st_mtime >= started:
        return stages.read_manifest("train", experiment)["details"]
    raise failure(outcome, dcfg, entries, checkpoints, experiment)


def failure(outcome: distributed.Outcome, dcfg, entries: list[dict], checkpoints: Path, experiment: str):
    latest = checkpoints / "latest.json"
    step = orjson.loads(latest.read_bytes())["step"] if latest.is_file() else None
    resume = (
        f"the checkpoint of step {step} is kept: `{stages.make_command('train', experiment)}` resumes from it "
        f"with the same {len(entries)} ranks"
        if step
        else f"no checkpoint was saved yet: `{stages.make_command('train', experiment)}` starts again"
    )
    # The first cause, not its echoes: a rank's own error (bad data on one host, a diverging loss) with its
    # fix, else a rank that died or timed out, else a rank that only lost its peers.
    own = [error for error in outcome.errors if distributed.LOST_PEER not in error]
    if own:
        return PipelineError(f"distributed training stopped: {own[0]}")
    died = [(rank, cause) for rank, cause in outcome.failures if cause != "exited with code 2"]
    if not died and not outcome.timed_out and outcome.errors:
        return PipelineError(f"distributed training stopped: {outcome.errors[0]}", fix=resume)
    rank, cause = (died or outcome.failures or [(0, "ended without finishing the run")])[0]
    host = entries[rank]["ssh"] if rank < len(entries) else "?"
    if cause == "exited with code 255" and not distributed.is_this_machine(host):  # ssh's own failure
        cause = f"could not be reached by ssh (exit code 255; `ssh {host} true` must work without a password)"
    if outcome.timed_out:
        cause = (
            f"saw no progress for {dcfg.timeout_seconds} s (distributed.timeout_seconds): a rank hung, died "
            "or cannot reach the others"
        )
    return PipelineError(
        f"distributed training stopped: rank {rank} on {host} {cause}; every rank of the run was ended",
        where="distributed",
        fix=resume,
    )


def check_batch_split(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise PipelineError(
            f"train.batch_size {batch_size} does not split evenly among {world} ranks",
            where="train.batch_size",
            fix=f"set it to a multiple of {world}: it stays the global batch, each rank taking batch_size / {world} "
            "records of every batch",
        )


def run_record(dcfg, group: distributed.Group) -> dict:
    """What the train manifest records of a distributed run."""
    hosts = [entry["ssh"] for entry in distributed.rank_hosts(dcfg)]
    return {"world_size": group.size, "backend": str(dcfg.backend), "hosts": hosts}


# --- on each rank --------------------------------------------------------------------------------


def share(group: distributed.Group):
    """The function giving this rank its part of a global batch of indices (None in one process)."""
    if group.size == 1:
        return None

    def part(indices: list[int]) -> list[int]:
        each = len(indices) // group.size
        return indices[group.rank * each : (group.rank + 1) * each]

    return part


def check_same_everywhere(group: distributed.Group, fingerprint: dict, catalog: dict) -> None:
    """Each rank's prepared splits are the files its data catalog describes, and every rank has rank 0's
    code, environment, model, data and train settings."""
    if group.size == 1:
        return
    for split in ("train", "valid"):
        path = paths.split_file(split)
        if hashing.sha256_file(path) != catalog["splits"][split]["sha256"]:
            raise PipelineError(
                f"rank {group.rank}: {paths.display(path)} is not the file the data catalog describes (sha256 differs)",
                where=f"{group.host}:{path}",
                fix="copy data/ from rank 0's host (or run `make prepare` there with the same config)",
            )
    group.check_same({"code": distributed.code_digest(), **{k: fingerprint[k] for k in ("model", "data", "settings")}})


def share_start(group: distributed.Group, checkpoints, model, optimizer, state):
    """Every rank's loop state, weights, optimizer state and RNG: rank 0's (restored from its checkpoint,
    or fresh, which every rank already is alike)."""
    if group.size == 1:
        return state
    folder = checkpoints.resumed_from if group.rank == 0 else None
    packed = group.broadcast_bytes(train_state.pack(folder) if folder is not None else b"")
    if group.rank == 0 or not packed:
        return state
    return train_state.load_packed(packed, model, optimizer)


def compiled_step(model, optimizer, accum: int, group: distributed.Group, body=None):
    """The training step of a distributed run (see the module doc): returns the global mean loss, the
    batch's trained tokens over every rank and the accumulated gradient."""
    loss_fn = train_data.loss_for(model, body)

    def summed_loss(model, *batch):
        loss, ntoks = loss_fn(model, *batch)
        return loss * ntoks, ntoks

    value_and_grad = nn.value_and_grad(model, summed_loss)
    state = [model.state, optimizer.state, mx.random.state]
    world = group.size

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (local_sum, ntoks), grad = value_and_grad(model, *batch)
        total = group.all_sum(ntoks)
        grad = tree_map(lambda g: g * (world / total), grad)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = nn.average_gradients(grad, group=group.group)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return group.all_sum(local_sum) / total, total, grad

    model.train()
    return step
