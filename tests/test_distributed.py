"""Distributed training (config section `distributed`): two ranks on 127.0.0.1 with mlx.launch's ring
backend against one process, a rank killed mid-run, and the checks made before anything is launched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import config, distributed, paths, stages

import mlx.core as mx
import numpy as np
import pytest

import model as model_stage
import prepare
import train
from conftest import new_project
from helpers import REPO, error_line, free_port

ITERS = 30
FAST = [
    f"train.iters={ITERS}",
    "train.steps_per_eval=10",
    "train.steps_per_report=5",
    "train.save_every=5",
    "train.val_batches=2",
    "train.num_layers=2",
    "train.learning_rate=1e-3",
]
# Measured between one process and two ranks, tiny model, 30 steps: max |difference| 5.1e-6 (float32 sums in
# another order: each rank pads and sums its share of the batch).
ADAPTER_TOLERANCE = 5e-5


def two_ranks(port: int) -> list[str]:
    return ["distributed.hosts=[127.0.0.1]", "distributed.ranks_per_host=2", f"distributed.port={port}"]


def adapter(experiment: str) -> dict[str, np.ndarray]:
    weights = mx.load(str(paths.RUNS_DIR / experiment / "adapter" / "adapters.safetensors"))
    return {name: np.array(value) for name, value in weights.items()}


def processes_of(root: Path) -> list[int]:
    """Processes (other than this one) whose environment points the pipeline at `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PIPELINE_ROOT={root}".encode() in environ:
            found.append((int(entry.name), environ))
    return found


def rank_pid(root: Path, rank: int) -> int | None:
    for pid, environ in processes_of(root):
        if f"MLX_RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """A project (tiny model, builtin data) in which two ranks trained experiment `pair`, uninterrupted."""
    root = new_project(tmp_path_factory.mktemp("distributed") / "project")
    with pytest.MonkeyPatch.context() as patch:
        paths.use_root(root)
        patch.setenv("PIPELINE_ROOT", str(root))
        assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
        assert prepare.main([]) == 0
        started = time.monotonic()
        assert train.main([*FAST, *two_ranks(free_port()), "experiment.name=pair"]) == 0
        print(f"two ranks: {time.monotonic() - started:.1f} s wall")
    paths.use_root(REPO)
    return root


@pytest.fixture
def in_pair(pair, monkeypatch):
    """`pair`, with pipeline.paths pointed at it for this test."""
    paths.use_root(pair)
    monkeypatch.setenv("PIPELINE_ROOT", str(pair))
    yield pair
    paths.use_root(REPO)


@pytest.mark.slow
def test_two_ranks_train_the_adapter_one_process_trains(in_pair):
    started = time.monotonic()
    assert train.main([*FAST, "experiment.name=single"]) == 0
    print(f"one process: {time.monotonic() - started:.1f} s wall")
    single, shared = adapter("single"), adapter("pair")
    assert single.keys() == shared.keys()
    difference = max(float(np.abs(single[k] - shared[k]).max()) for k in single)
    moved = max(float(np.abs(single[k]).max()) for k in single if k.endswith("lora_b"))  # B starts at zero
    print(f"max |one process - two ranks| = {difference:.2e}; largest trained B entry {moved:.2e}")
    assert difference <= ADAPTER_TOLERANCE
    assert moved > 1000 * ADAPTER_TOLERANCE, "the adapter barely trained: the comparison would prove nothing"

    details = stages.read_manifest("train", "pair")["details"]
    assert details["distributed"] == {"world_size": 2, "backend": "ring", "hosts": ["127.0.0.1", "127.0.0.1"]}
    assert details["fingerprint"]["world_size"] == 2
    single_details = stages.read_manifest("train", "single")["details"]
    assert "distributed" not in single_details and "world_size" not in single_details["fingerprint"]
    assert details["steps"] == single_details["steps"] == ITERS
    assert details["trained_tokens"] == single_details["trained_tokens"]  # the same batches, split in two
    print(f"trained tok/s: one process {single_details['tokens_per_second']}, two ranks {details['tokens_per_second']}")


@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_the_run_and_two_ranks_resume_it(in_pair):
    pair = in_pair
    args = [*FAST, *two_ranks(free_port()), "experiment.name=killed"]
    env = {**os.environ, "PIPELINE_ROOT": str(pair), "PYTHONPATH": str(REPO / "scripts"), "CI": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    latest = train.resumable_checkpoints(paths.RUNS_DIR / "killed") / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= 10):
        time.sleep(0.02)
    victim = rank_pid(pair, 1)
    assert victim is not None, "rank 1 is not running"
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    print(f"the run ended {time.monotonic() - started:.1f} s after rank 1 was killed")

    assert process.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert "distributed training stopped: rank 1 on 127.0.0.1 was ended by signal SIGKILL" in last, last
    assert "resumes from it with the same 2 ranks" in last, last
    assert processes_of(pair) == [], "a process of the run outlived it"
    killed_at = json.loads(latest.read_text())["step"]
    assert 10 <= killed_at < ITERS, "the run was not interrupted mid-way"
    assert not (paths.RUNS_DIR / "killed" / "train.manifest.json").exists()

    one_process = [a for a in args if not a.startswith("distributed.")]
    refused = subprocess.run(
        [sys.executable, "-m", "train", *one_process, "train.resume=require"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2  # the checkpoint was made by two ranks
    assert "the number of ranks: 2 then, 1 now" in refused.stderr
    assert json.loads(latest.read_text())["step"] == killed_at

    assert train.main(args) == 0
    resumed, uninterrupted = adapter("killed"), adapter("pair")
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_within_the_timeout_and_nothing_is_left(in_pair):
    pair, timeout = in_pair, 5
    args = [*FAST, "train.iters=2000", *two_ranks(free_port()), f"distributed.timeout_seconds={timeout}"]
    env = {**os.environ, "PIPELINE_ROOT": str(pair), "PYTHONPATH": str(REPO / "scripts"), "CI": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args, "experiment.name=hung"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = train.resumable_checkpoints(paths.RUNS_DIR / "hung") / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not latest.is_file():
        time.sleep(0.02)
    victim = rank_pid(pair, 1)
    assert victim is not None, "rank 1 is not running"
    os.kill(victim, signal.SIGSTOP)  # alive, holding its sockets, doing nothing
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    waited = time.monotonic() - stopped
    print(f"the run ended {waited:.1f} s after rank 1 was stopped")

    assert process.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert f"saw no progress for {timeout} s (distributed.timeout_seconds)" in last, last
    assert "resumes from it with the same 2 ranks" in last, last
    assert waited < timeout + distributed.GRACE_SECONDS + 20
    assert processes_of(pair) == [], "a process of the run outlived it"


@pytest.mark.slow
def test_killing_make_train_ends_every_rank(in_pair):
    pair = in_pair
    args = [*FAST, "train.iters=2000", *two_ranks(free_port()), "experiment.name=orphans"]
    env = {**os.environ, "PIPELINE_ROOT": str(pair), "PYTHONPATH": str(REPO / "scripts"), "CI": "1"}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = train.resumable_checkpoints(paths.RUNS_DIR / "orphans") / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not latest.is_file():
        time.sleep(0.02)
    assert rank_pid(pair, 0) and rank_pid(pair, 1), "the ranks are not running"
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 10
    while processes_of(pair) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(pair) == [], "a rank outlived the killed `make train`"


RANK_WITH_OTHER_DATA = """
import logging, sys
import pipeline
from pipeline import distributed, log
from pipeline.errors import PipelineError
from omegaconf import OmegaConf

log.setup_logging()
group = distributed.join(OmegaConf.create({"backend": "ring", "timeout_seconds": 60}))
try:
    group.check_same({"code": "ef" * 32, "data": ("ab" if group.rank == 1 else "cd") * 32})
except PipelineError as exc:
    logging.getLogger("check").error("error: %s", exc.line())
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_rank_with_other_data_is_named(project):
    """Group.check_same over real collectives, rank 1 given another data digest (ranks on one machine share
    their files, so the data itself cannot differ here)."""
    script = project / "rank_with_other_data.py"
    script.write_text(RANK_WITH_OTHER_DATA)
    dcfg = config.load_workspace(two_ranks(free_port()), None).config("main").distributed
    outcome = distributed.launch(dcfg, [str(script)], distributed.rank_hosts(dcfg), "check")
    assert not outcome.ok and outcome.failures
    assert outcome.errors, outcome
    assert "rank 1 has another data than rank 0" in outcome.errors[0], outcome.errors


def test_a_batch_that_does_not_split_among_the_ranks_is_one_line_before_launching(project, caplog):
    assert train.main([*FAST, *two_ranks(free_port()), "train.batch_size=3", "experiment.name=odd"]) == 2
    assert "train.batch_size: train.batch_size 3 does not split evenly among 2 ranks" in error_line(caplog)
    assert not (paths.RUNS_DIR / "odd").joinpath("train.manifest.json").exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (["distributed.hosts=[mac-a.local]"], "'mac-a.local' is not an IP address"),
        (["distributed.hosts=[192.0.2.7,127.0.0.1]"], "rank 0 runs on 192.0.2.7, which is not this machine"),
        (["distributed.hostfile=missing.json"], "missing.json: the hostfile does not exist"),
    ],
)
def test_hosts_that_cannot_work_are_one_line(project, caplog, setting, expected):
    assert train.main([*FAST, *setting, "experiment.name=hosts"]) == 2
    assert expected in error_line(caplog)


def test_a_port_in_use_is_one_line(project, caplog):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert train.main([*FAST, *two_ranks(port), "experiment.name=port"]) == 2
    assert f"port {port} (rank 0) is in use on 127.0.0.1" in error_line(caplog)


def test_hosts_repeat_per_rank_and_each_rank_gets_its_share_of_the_cores(project):
    cfg = config.load_workspace(two_ranks(40000), None).config("main")
    entries = distributed.rank_hosts(cfg.distributed)
    assert entries == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    assert (
        distributed.threads_per_rank(entries) == max(1, (os.cpu_count() or 1) // 2) or "PIPELINE_THREADS" in os.environ
    )


def test_the_first_cause_is_reported_not_its_echoes(project):
    from train import ranks

    entries = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    dcfg = config.load_workspace(two_ranks(40000), None).config("main").distributed
    lost = f"rank 0: 127.0.0.1: rank 0 {distributed.LOST_PEER} ([ring] connection to a peer was lost)"
    died = distributed.Outcome(False, [(0, "exited with code 2"), (1, "was ended by signal SIGKILL")], [lost], False)
    line = ranks.failure(died, dcfg, entries, project / "none", "main").line()
    assert "rank 1 on 127.0.0.1 was ended by signal SIGKILL" in line and "starts again" in line
    own = distributed.Outcome(False, [(1, "exited with code 2")], [lost, "rank 1: the data differs"], False)
    assert (
        "distributed training stopped: rank 1: the data differs"
        in ranks.failure(own, dcfg, entries, project, "main").line()
    )
    echo_only = distributed.Outcome(False, [(0, "exited with code 2")], [lost], False)
    assert distributed.LOST_PEER in ranks.failure(echo_only, dcfg, entries, project, "main").line()


@pytest.mark.slow
def test_doctor_joins_the_hosts_and_times_an_all_sum(project, capsys):
    import doctor

    settings = [*two_ranks(free_port()), "doctor.matmul_repeats=1", "doctor.min_gflops=0"]
    assert doctor.main(settings) == 0
    table = capsys.readouterr().out
    assert "distributed ranks" in table and "2 joined over ring" in table
    assert "64 MiB in" in table and "correct" in table


def test_doctor_says_which_host_cannot_join(project, capsys):
    import doctor

    settings = ["distributed.hosts=[127.0.0.1,192.0.2.7]", f"distributed.port={free_port()}"]
    settings += ["distributed.timeout_seconds=10", "doctor.matmul_repeats=1", "doctor.min_gflops=0"]
    assert doctor.main(settings) == 1
    out = capsys.readouterr()
    table = " ".join(out.out.replace("│", " ").split())  # the table wraps long cells
    assert "FAILED: distributed: the hosts could not run together: rank" in table
    assert "cannot train together" in out.err
