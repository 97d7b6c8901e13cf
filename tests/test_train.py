"""train stage on the tiny model: masks, determinism, kill -9 and resume, early stopping, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from pipeline import contracts, paths, runtime

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_tokenizer
from omegaconf import OmegaConf

import model as model_stage
import prepare
import train
from helpers import REPO, error_line, make, trained, write_override
from lm import fast_exp, heads, tokens
from train import data as train_data
from train import prefix

FAST = [
    "train.iters=12",
    "train.steps_per_eval=4",
    "train.steps_per_report=2",
    "train.save_every=3",
    "train.val_batches=2",
    "train.num_layers=2",
    "train.learning_rate=1e-3",
]


@pytest.fixture
def prepared(project, tiny_model_dir):
    """The tiny model and the builtin dataset, prepared."""
    assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
    assert prepare.main([]) == 0
    return project


def adapter_bytes(experiment="main") -> bytes:
    return (paths.RUNS_DIR / experiment / "adapter" / "adapters.safetensors").read_bytes()


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_model_dir):

    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third question"},
        {"role": "assistant", "content": "third answer"},
    ]
    template = {"id": "model", "source": tokenizer.chat_template}
    ids, mask = tokens.encode_chat(tokenizer, template, messages, None, mask_prompt=True)
    trained = tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])
    assert trained == "first answer<|im_end|>\nsecond answer<|im_end|>\nthird answer<|im_end|>\n"
    masked = tokenizer.decode([int(i) for i, m in zip(ids, mask) if not m])
    assert "question" in masked and "answer" not in masked
    _, unmasked = tokens.encode_chat(tokenizer, template, messages, None, mask_prompt=False)
    assert unmasked.all()


def test_batch_order_is_a_function_of_the_step():
    items = [(np.arange(n + 2, dtype=np.int32), np.ones(n + 2, np.float32)) for n in range(20)]
    order = train_data.BatchOrder(items, batch_size=4, seed=3)
    first = [order.indices(s) for s in range(12)]
    again = train_data.BatchOrder(items, batch_size=4, seed=3)
    assert [again.indices(s) for s in reversed(range(12))] == list(reversed(first))
    assert sorted(i for s in range(5) for i in first[s]) == list(range(20))  # one epoch covers every record
    assert [train_data.BatchOrder(items, 4, seed=4).indices(s) for s in range(12)] != first


def _lora_model(tiny_model_dir, layers: int = 2):
    """The tiny model with adapters on its last `layers` layers, whose B is not zero, so that A's gradients
    are not zero either."""
    model, _ = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    rng = np.random.default_rng(0)
    model.update(
        tree_map(lambda p: mx.array(rng.normal(0, 0.02, p.shape).astype(np.float32)), model.trainable_parameters())
    )
    return model


def _batch_items(vocab: int) -> list:
    rng = np.random.default_rng(1)
    return [
        (rng.integers(3, vocab, n).astype(np.int32), (rng.random(n) < 0.3).astype(np.float32)) for n in (40, 33, 17, 9)
    ]


def test_the_loss_at_trained_positions_is_the_full_loss_with_the_same_gradients(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    items = _batch_items(model.args.vocab_size)
    inputs, targets, mask = train_data.pad(items, 64)
    body, head = heads.split(model)
    np.testing.assert_allclose(np.array(head(body(inputs))), np.array(model(inputs)), atol=1e-5)
    (full, full_count), full_grad = nn.value_and_grad(model, train_data.masked_loss)(model, inputs, targets, mask)
    assert train_data.loss_for(model) is train_data.trained_loss
    batch = train_data.batch_arrays(model, items, 64)
    assert batch[1].shape[0] % 8 == 0 and batch[1].shape[0] < inputs.size  # only the trained positions
    (fast, fast_count), fast_grad = nn.value_and_grad(model, train_data.trained_loss)(model, *batch)
    assert fast_count.item() == full_count.item() == float(mask.sum().item())
    assert abs(fast.item() - full.item()) < 1e-5
    flat_full, flat_fast = dict(tree_flatten(full_grad)), dict(tree_flatten(fast_grad))
    assert flat_full.keys() == flat_fast.keys() and len(flat_full) == 2 * 2 * 7  # A and B of 7 modules, 2 layers
    for name, grad in flat_full.items():
        assert np.abs(np.array(grad)).max() > 0, name
        np.testing.assert_allclose(np.array(flat_fast[name]), np.array(grad), atol=1e-6, rtol=1e-4, err_msg=name)


def _prefixed_items(vocab: int, shared: int = 24) -> list:
    """_batch_items behind one shared prefix (a system prompt) whose tokens are not trained."""
    prefix = np.random.default_rng(2).integers(3, vocab, shared).astype(np.int32)
    return [
        (np.concatenate([prefix, ids]), np.concatenate([np.zeros(shared, np.float32), m]))
        for ids, m in _batch_items(vocab)
    ]


def test_the_optimized_training_step_matches_the_plain_one(tiny_model_dir):
    """Trained positions only, the fast exp (lm.fast_exp) and the shared prefix run once through the frozen
    layer (train.prefix) together, against the full loss with MLX's own SiLU and softmax: the same loss
    and gradients within float tolerance."""
    model = _lora_model(tiny_model_dir, layers=1)
    items = _prefixed_items(model.args.vocab_size)
    (plain, _), plain_grad = nn.value_and_grad(model, train_data.masked_loss)(model, *train_data.pad(items, 96))
    body = prefix.body(model, items)
    assert body is not None and prefix.frozen_layers(model) == 1 and prefix.shared_length(items) == 24
    with fast_exp.fast_activations(model):
        loss_and_grad = nn.value_and_grad(model, train_data.loss_for(model, body))
        (fast, _), fast_grad = loss_and_grad(model, *train_data.batch_arrays(model, items, 96))
    assert abs(fast.item() - plain.item()) < 1e-5
    assert len(dict(tree_flatten(plain_grad))) == 2 * 7  # A and B of the 7 modules of the adapted layer
    for name, grad in dict(tree_flatten(plain_grad)).items():
        assert np.abs(np.array(grad)).max() > 0, name
        got = np.array(dict(tree_flatten(fast_grad))[name])
        np.testing.assert_allclose(got, np.array(grad), atol=1e-5, rtol=1e-3, err_msg=name)


def test_the_prefix_path_applies_only_where_it_can(tiny_model_dir):
    items = _prefixed_items(600)
    assert prefix.body(_lora_model(tiny_model_dir, layers=2), items) is None  # no frozen layer below the adapters
    model = _lora_model(tiny_model_dir, layers=1)
    assert prefix.body(model, _batch_items(600)) is None  # nothing shared
    assert prefix.body(model, _prefixed_items(600, shared=8)) is None  # too short to pay
    model.model_type = "not-a-split-type"
    assert prefix.body(model, items) is None


def test_a_model_not_known_to_split_gets_every_positions_logits(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    model.model_type = "not-a-split-type"
    assert heads.split(model) is None and train_data.loss_for(model) is train_data.masked_loss
    items = _batch_items(model.args.vocab_size)
    inputs, targets, mask = train_data.batch_arrays(model, items, 64)
    assert inputs.shape == targets.shape == mask.shape


def test_outputs_exist_and_validate(prepared):
    assert train.main(FAST) == 0
    run_dir = paths.RUNS_DIR / "main"
    manifest = contracts.read_json(run_dir / "train.manifest.json", "run_manifest")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        contracts.validate(line, "metrics", where="metrics.jsonl")
    assert [row["step"] for row in lines if row["type"] == "val"] == [0, 4, 8, 12]
    assert [row["step"] for row in lines if row["type"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    details = manifest["details"]
    assert details["best_val_loss"] < details["first_val_loss"]
    assert manifest["environment"]["blas"] in ("openblas", "accelerate")


def test_same_seed_same_bytes_other_seed_other_bytes(prepared):
    assert train.main([*FAST, "train.resume=never"]) == 0
    first = adapter_bytes()
    assert train.main([*FAST, "train.resume=never"]) == 0
    assert adapter_bytes() == first
    assert train.main([*FAST, "train.resume=never", "train.seed=1"]) == 0
    assert adapter_bytes() != first


@pytest.mark.parametrize("layers", [2, 1])  # 1: the shared system prompt runs once through the frozen layer
def test_kill_9_then_resume_gives_the_same_adapter(prepared, layers, caplog):
    args = [*FAST, "train.iters=30", "train.save_every=5", f"train.num_layers={layers}", "experiment.name=resumed"]
    assert train.main([a.replace("experiment.name=resumed", "experiment.name=straight") for a in args]) == 0
    assert ("run once through the 1 frozen layers" in caplog.text) == (layers == 1)
    straight = adapter_bytes("straight")

    env = {**os.environ, "PIPELINE_ROOT": str(paths.ROOT), "PYTHONPATH": str(REPO / "scripts"), "CI": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    latest = train.resumable_checkpoints(paths.RUNS_DIR / "resumed") / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= 10):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 10 <= killed_at < 30, "the run was not interrupted mid-way"
    assert not (paths.RUNS_DIR / "resumed").joinpath("adapter").exists()
    assert not (paths.RUNS_DIR / "resumed").joinpath("train.manifest.json").exists()

    assert train.main(args) == 0
    assert adapter_bytes("resumed") == straight
    straight_val = [
        line for line in (paths.RUNS_DIR / "straight" / "metrics.jsonl").read_text().splitlines() if '"val"' in line
    ]
    resumed_val = [
        line for line in (paths.RUNS_DIR / "resumed" / "metrics.jsonl").read_text().splitlines() if '"val"' in line
    ]
    assert [json.loads(line)["val_loss"] for line in resumed_val] == [
        json.loads(line)["val_loss"] for line in straight_val
    ]


def metric_values(experiment: str) -> list[dict]:
    """metrics.jsonl without the fields that measure time."""
    timed = ("seconds", "tokens_per_second", "peak_memory_gb")
    lines = (paths.RUNS_DIR / experiment / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timed} for line in lines]


def test_stopping_between_a_checkpoint_and_its_validation_resumes_to_the_same_files(prepared, monkeypatch):
    # a checkpoint at step 15 falls inside a report window (every 2 steps), and step 15's validation line is
    # written after the checkpoint, so both the window's average and that line must survive the stop
    args = [*FAST, "train.iters=30", "train.save_every=5", "train.steps_per_eval=5", "experiment.name=resumed"]
    assert train.main([a.replace("=resumed", "=straight") for a in args]) == 0

    evaluate = train.TrainingLoop.evaluate

    def stop_after_step_15(loop, step):
        stop = evaluate(loop, step)
        if step == 15:
            raise KeyboardInterrupt
        return stop

    monkeypatch.setattr(train.TrainingLoop, "evaluate", stop_after_step_15)
    assert train.main(args) == 130
    monkeypatch.setattr(train.TrainingLoop, "evaluate", evaluate)
    assert train.main(args) == 0

    assert metric_values("resumed") == metric_values("straight")  # and so loss.png, drawn from them
    assert adapter_bytes("resumed") == adapter_bytes("straight")


def test_early_stopping_keeps_the_best_checkpoint(prepared, caplog):
    assert (
        train.main(
            [
                *FAST,
                "train.iters=40",
                "train.learning_rate=5e-2",
                "train.early_stopping.patience=1",
                "train.early_stopping.min_delta=0.5",
            ]
        )
        == 0
    )
    manifest = contracts.read_json(paths.RUNS_DIR / "main" / "train.manifest.json", "run_manifest")
    assert manifest["details"]["stopped_early"] and manifest["details"]["steps"] < 40
    assert "early stopping" in caplog.text
    config = json.loads((paths.RUNS_DIR / "main" / "adapter" / "adapter_config.json").read_text())
    assert config["from_step"] == manifest["details"]["best_step"]
    assert adapter_bytes() == (paths.RUNS_DIR / "main" / "checkpoints" / "best" / "adapters.safetensors").read_bytes()


def test_diverging_loss_stops_with_a_clear_message(prepared, caplog):
    assert (
        train.main(
            [
                *FAST,
                "train.learning_rate=1e30",
                "train.optimizer=sgd",
                "train.lr_schedule=constant",
                "train.warmup_steps=0",
            ]
        )
        == 2
    )
    line = error_line(caplog)
    assert "the training loss became" in line and "lower train.learning_rate" in line
    assert not (paths.RUNS_DIR / "main" / "train.manifest.json").exists()


def test_batch_larger_than_a_split_is_an_error(prepared, caplog):
    assert train.main([*FAST, "train.batch_size=64"]) == 2
    assert "the valid split has 60 records, fewer than one batch of 64" in error_line(caplog)


def test_resume_require_with_another_lora_shape_is_an_error(prepared, caplog):
    assert train.main([*FAST, "train.iters=6"]) == 0
    # a finished run's checkpoints, put back where a stopped run keeps them
    shutil.copytree(paths.RUNS_DIR / "main" / "checkpoints", train.resumable_checkpoints(paths.RUNS_DIR / "main"))
    assert train.main([*FAST, "train.iters=6", "train.lora.rank=4", "train.resume=require"]) == 2
    assert "different LoRA shape" in error_line(caplog)


def test_memory_guard_refuses_with_a_suggestion(prepared, monkeypatch, caplog):

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 10_000_000)
    assert train.main(FAST) == 2
    line = error_line(caplog)
    assert "GB is available" in line and "train.batch_size=2" in line and "train.grad_checkpoint=true" in line


def test_epochs_become_iterations_from_the_catalog(prepared):
    catalog = contracts.read_json(paths.DATA_DIR / "data_catalog.json", "data_catalog")

    tcfg = OmegaConf.create({"epochs": 0.5, "iters": 1, "batch_size": 4})
    assert train.total_iterations(tcfg, catalog) == -(-catalog["splits"]["train"]["records"] // 8)


def test_changing_a_train_key_leaves_prepare_untouched(project, tiny_model_dir):
    write_override(
        project,
        f"model:\n  source: {tiny_model_dir}\ntrain:\n  iters: 4\n  steps_per_eval: 2\n  val_batches: 1\n  "
        f"num_layers: 2\n",
    )
    make(project, "all")
    prepared_at = (project / "data" / "prepare.manifest.json").stat().st_mtime_ns
    trained_at = (project / "runs" / "main" / "train.manifest.json").stat().st_mtime_ns
    out = make(project, "all", "SET=train.learning_rate=1e-3")
    assert "-m train" in out.stdout and "-m prepare" not in out.stdout
    assert (project / "data" / "prepare.manifest.json").stat().st_mtime_ns == prepared_at
    assert (project / "runs" / "main" / "train.manifest.json").stat().st_mtime_ns != trained_at
    assert "Nothing to be done" in make(project, "all", "SET=train.learning_rate=1e-3").stdout


@pytest.mark.parametrize(
    "variant",
    [
        ["train.fine_tune_type=dora"],
        ["train.fine_tune_type=full", "train.learning_rate=1e-4"],
        ["train.grad_accumulation_steps=2", "train.save_every=4"],
        ["train.grad_checkpoint=true"],
        ["train.optimizer=adam", "train.lr_schedule=linear"],
        ["train.optimizer=adafactor", "train.lr_schedule=constant"],
        ["train.optimizer=muon"],
        ["train.lora.keys=[self_attn.q_proj,self_attn.v_proj]", "train.lora.dropout=0.1"],
    ],
    ids=[
        "dora",
        "full",
        "grad-accumulation",
        "grad-checkpoint",
        "adam-linear",
        "adafactor",
        "muon",
        "lora-keys-dropout",
    ],
)
def test_training_variants_run_and_learn(prepared, variant):
    assert train.main([*FAST, "train.iters=8", *variant]) == 0
    details = contracts.read_json(paths.RUNS_DIR / "main" / "train.manifest.json", "run_manifest")["details"]
    assert details["steps"] == 8
    assert details["final_val_loss"] < details["first_val_loss"], details


def test_each_experiment_keeps_its_own_settings(project, tiny_model_dir):
    write_override(
        project,
        f"model:\n  source: {tiny_model_dir}\ntrain:\n  iters: 4\n  steps_per_eval: 2\n  val_batches: 1\n  "
        f"num_layers: 2\n",
    )
    make(project, "train", "EXP=a", "SET=train.learning_rate=1e-3")
    make(project, "train", "EXP=b")
    assert make(project, "-q", "train", "EXP=a", "SET=train.learning_rate=1e-3", check=False).returncode == 0
    assert make(project, "-q", "train", "EXP=b", check=False).returncode == 0
    assert make(project, "-q", "train", "EXP=a", check=False).returncode != 0  # a's settings differ from the defaults
    trained = {e: contracts.read_json(project / "runs" / e / "train.manifest.json", "run_manifest") for e in "ab"}
    assert trained["a"]["config"]["train"]["learning_rate"] == 0.001 != trained["b"]["config"]["train"]["learning_rate"]


def test_a_run_too_short_to_save_a_checkpoint_still_finishes(project, tiny_model_dir):
    """No checkpoint saved (iters < save_every) and no better validation loss (no best adapter): the
    run commits an empty checkpoints folder instead of failing on a missing one."""
    trained(tiny_model_dir, "train.iters=2", "train.save_every=6", "train.learning_rate=1e-12")
    run_dir = paths.RUNS_DIR / "main"
    assert (run_dir / "train.manifest.json").is_file() and (run_dir / "checkpoints").is_dir()
