"""search stage: the hyperparameter search of `sweep.search`, with Optuna's TPE sampler.

Opens (or creates) the study in runs/search.db (pipeline.study names it after the config it searches)
and runs trials until the study holds `sweep.search.trials` of them. Each trial is an ordinary
experiment: its settings are sampled, then `make package EXP=<trial>` trains, fuses, quantizes, scores
and packs it like any other, and its best validation loss (from its train manifest; never the test split) is told
to the study. A trial whose stage fails is told as failed and counts against the budget.

An interrupted search resumes: a trial the study still holds as running was cut off, so it runs again
(Make skips the stages it finished) before any new one is sampled. The sampler is seeded per trial from
`sweep.search.seed` and the trial's number, so a resumed search samples what an uninterrupted one would.
Writes runs/search.json (every trial: number, experiment, settings, state, value) and, last,
runs/search.manifest.json. `optuna-dashboard sqlite:///runs/search.db` shows the study.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time

import pipeline  # noqa: F401
from pipeline import cli, config, contracts, paths, stages, study
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry

log = logging.getLogger("search")
TRIAL_GOAL = "package"  # the last stage of an experiment; the summary compares the trials afterwards
TRIAL_STAGES = ("train", "fuse", "quantize", "eval", "package")  # whose failure fails a trial
SEED_STRIDE = 1_000_003  # keeps the per-trial sampler seeds of different search seeds apart


def build_parser():
    return cli.stage_parser("search", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("search", args, lambda cfg: run(cfg, args))


def run(cfg, args) -> dict:
    workspace = config.load_workspace(args.overrides, args.override)
    search = workspace.search
    if search is None:
        raise PipelineError("no search is configured", where="sweep.search", fix="set sweep.search (see README)")
    stages.read_manifest("model")
    stages.read_manifest("prepare")
    stage = StageRun("search", {"sweep": config.section(cfg, "sweep")})  # holds the search's lock from here
    optuna = study.import_optuna()
    storage = study.storage_url()
    paths.RUNS_DIR.mkdir(parents=True, exist_ok=True)
    current = optuna.create_study(
        study_name=search.study_name, storage=storage, direction=search.direction, load_if_exists=True
    )
    log.info("study %s in %s: %d of %d trials so far", search.study_name, storage, len(current.trials), search.trials)
    for trial in current.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name = _experiment_of(trial.number, search)
        if name is None:  # cut off before its settings were all sampled: nothing to run again
            log.warning("trial %d was cut off before its settings were chosen; marked failed", trial.number)
            current.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            continue
        log.info("trial %d (%s) was interrupted; running it again", trial.number, name)
        _finish_trial(current, trial.number, name, search, args)
    while len(current.trials) < search.trials:
        number = len(current.trials)
        current.sampler = optuna.samplers.TPESampler(seed=search.seed * SEED_STRIDE + number)
        trial = current.ask()
        settings = study.suggest(trial, search)
        name = _experiment_of(trial.number, search)
        log.info("trial %d (%d of %d): %s: %s", number, number + 1, search.trials, name, _settings_text(settings))
        _finish_trial(current, trial.number, name, search, args)
    return _write_outputs(stage, search, workspace)


def _experiment_of(number: int, search) -> str | None:
    return next((t.experiment for t in study.trials(search) if t.number == number), None)


def _finish_trial(current, number: int, name: str, search, args) -> None:
    """Run the trial's experiment through eval, then tell the study its value, or that it failed."""
    started = time.monotonic()
    command = _make_command(name, args)
    log.debug("running %s", shlex.join(command))
    done = subprocess.run(command, cwd=paths.ROOT, env={**os.environ, "PIPELINE_KEEP_GOING": "1"})
    if done.returncode != 0:  # not a failed stage (KEEP_GOING records those): make itself stopped
        raise PipelineError(
            f"trial {number} ({name}) stopped: `{shlex.join(command)}` exited with {done.returncode}",
            where=paths.display(study.storage_path()),
            fix="see the lines above; `make all` resumes the search at this trial",
        )
    workspace = config.load_workspace(args.overrides, args.override)
    failed = cli.first_failure(workspace.config(name), TRIAL_STAGES)
    optuna = study.import_optuna()
    seconds = time.monotonic() - started
    if failed:
        log.warning("trial %d (%s) failed in %s: %s", number, name, failed["stage"], failed["error"])
        current.tell(number, state=optuna.trial.TrialState.FAIL)
        return
    manifest = contracts.read_json(stages.get("train").manifest_path(name), "run_manifest")
    value = manifest["details"].get(study.METRIC_DETAILS[search.metric])
    if value is None:
        log.warning("trial %d (%s) recorded no %s; marked failed", number, name, search.metric)
        current.tell(number, state=optuna.trial.TrialState.FAIL)
        return
    current.tell(number, float(value))
    best = current.best_trial
    log.info(
        "trial %d (%s): %s %.4f in %.0f s; best so far: trial %d, %.4f",
        number, name, search.metric, value, seconds, best.number, best.value,
    )  # fmt: skip


def _make_command(name: str, args) -> list[str]:
    make = shlex.split(os.environ.get("PIPELINE_MAKE") or "make")
    command = [*make, "--no-print-directory", TRIAL_GOAL, f"EXP={name}", "IN_SEARCH=1", "KEEP_GOING=1"]
    if args.override:
        command.append(f"OVERRIDE={args.override}")
    if args.overrides:
        command.append("SET=" + " ".join(args.overrides))
    if args.verbose:
        command.append("VERBOSE=1")
    return command


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def _write_outputs(stage: StageRun, search, workspace) -> dict:
    trials = study.trials(search)
    table = {
        "schema_version": contracts.schema_version("search"),
        "study": search.study_name,
        "storage": paths.display(study.storage_path()),
        "metric": search.metric,
        "direction": search.direction,
        "budget": search.trials,
        "trials": [
            {"number": t.number, "experiment": t.experiment, "state": t.state, "value": t.value, "params": t.params}
            for t in trials
        ],
    }
    out = paths.RUNS_DIR / "search.json"
    contracts.write_json(stage.staged(out), table, "search")
    complete = [t for t in trials if t.value is not None]
    best = min(complete, key=lambda t: t.value) if complete else None
    inputs = [file_entry(f"{name}_manifest", stages.get(name).manifest_path()) for name in ("model", "prepare")]
    details = {
        "study": search.study_name,
        "trials": len(trials),
        "complete": len(complete),
        "best": best and {"experiment": best.experiment, "value": best.value, "params": best.params},
    }
    manifest = stage.finish(stages.get("search").manifest_path(), inputs, [stage.entry("trials", out)], details)
    log.info(
        "%d trials, %d complete; best %s",
        len(trials), len(complete), f"{best.experiment} ({search.metric} {best.value:.4f})" if best else "none",
    )  # fmt: skip
    return manifest


if __name__ == "__main__":
    sys.exit(main())
