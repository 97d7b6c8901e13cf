"""The hyperparameter search `sweep.search` describes: its settings checked against default.yaml, its
Optuna study (TPE, stored in SQLite at runs/search.db) and its trials, each an ordinary experiment.

The study is named after what its trials' validation loss depends on (the model, data, prepare and train
sections as configured, and the search itself but for its trial budget), so raising `trials` extends the
same study and changing the config starts a new one. A trial's experiment name is made from its
settings like a grid experiment's (`r8-lr3.2e-4`); a trial that repeats an earlier one's settings is
named `<name>-t<number>`. Optuna is imported only when a search is configured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

from pipeline import paths
from pipeline.errors import ConfigError
from pipeline.experiments import Experiment, flatten, settings_name, unflatten

import orjson

SEARCH_KEY = "search"
METRICS = {"val_loss": "minimize"}  # metric: direction; each read from the trial's train manifest
METRIC_DETAILS = {"val_loss": "best_val_loss"}
SETTINGS = {"trials", "metric", "seed", "space"}
RANGE_KEYS = {"low", "high", "log", "step"}
STUDY_SECTIONS = ("model", "data", "prepare", "train")  # what a trial's validation loss depends on
NOT_SEARCHED = ("experiment", "experiments", "sweep", "model", "data", "prepare")
SIGNIFICANT_DIGITS = 3  # a sampled float is rounded to this for the experiment's config and name
WHERE = "sweep.search"


@dataclasses.dataclass(frozen=True)
class Search:
    trials: int
    metric: str
    seed: int
    space: dict  # dotted key: {"choices": [...]} or {"low", "high", "log", "step", "integer"}
    study_name: str

    @property
    def direction(self) -> str:
        return METRICS[self.metric]


@dataclasses.dataclass(frozen=True)
class Trial:
    number: int
    state: str  # COMPLETE, RUNNING, FAIL, ...
    params: dict  # dotted key: value as the experiment uses it
    value: float | None
    experiment: str


def storage_path() -> Path:
    return paths.RUNS_DIR / "search.db"


def storage_url() -> str:
    return f"sqlite:///{storage_path()}"


def parse(values: dict, check_layer) -> Search | None:
    """The search of a resolved config, checked; None when `sweep.search` is not set."""
    settings = (values.get("sweep") or {}).get(SEARCH_KEY)
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"'{WHERE}' must be a mapping, got {settings!r}",
            where=WHERE,
            fix="e.g. search: {trials: 8, space: {train.learning_rate: {low: 1e-5, high: 1e-3, log: true}}}",
        )
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise ConfigError(
            f"unknown key '{WHERE}.{unknown[0]}'", where=WHERE, fix="its keys are " + ", ".join(sorted(SETTINGS))
        )
    trials, seed, metric = settings.get("trials", 10), settings.get("seed", 0), settings.get("metric", "val_loss")
    for key, value in (("trials", trials), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "trials" else 0):
            raise ConfigError(
                f"'{WHERE}.{key}' must be a {'positive' if key == 'trials' else 'non-negative'} integer, got {value!r}",
                where=WHERE,
            )
    if metric not in METRICS:
        raise ConfigError(
            f"'{WHERE}.metric' must be one of {', '.join(METRICS)}, got {metric!r}",
            where=WHERE,
            fix="the search optimizes a validation metric; the test split is kept for the final comparison",
        )
    space = settings.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"'{WHERE}.space' must map the keys to search to a range or choices",
            where=WHERE,
            fix="e.g. space: {train.lora.rank: {choices: [4, 8, 16]}, train.learning_rate: {low: 1e-5, high: 1e-3, "
            "log: true}}",
        )
    checked = {key: _dimension(key, spec, check_layer) for key, spec in flatten_space(space).items()}
    name = "search-" + _digest(values, {"metric": metric, "seed": seed, "space": checked})
    return Search(trials, metric, seed, checked, name)


def refuse_grid(values: dict) -> None:
    """A search is the whole sweep: it does not mix with listed experiments, grid keys or seeds."""
    others = [k for k in (values.get("sweep") or {}) if k != SEARCH_KEY]
    if values.get("experiments") or others:
        what = f"sweep.{others[0]}" if others else "experiments"
        raise ConfigError(
            f"'{WHERE}' cannot be combined with '{what}'",
            where=WHERE,
            fix="run the search on its own (its trials are the experiments), or remove it to run the grid or list",
        )


def flatten_space(space: dict) -> dict:
    """{train: {lora: {rank: {choices: ...}}}} or {train.lora.rank: {choices: ...}} -> {train.lora.rank: {...}}."""
    out = {}
    for key, value in space.items():
        if isinstance(value, dict) and value and not (set(value) & (RANGE_KEYS | {"choices"})):
            out.update({f"{key}.{k}": v for k, v in flatten_space(value).items()})
        else:
            out[key] = value
    return out


def _dimension(key: str, spec, check_layer) -> dict:
    where = f"{WHERE}.space.{key}"
    if key.split(".")[0] in NOT_SEARCHED:
        raise ConfigError(
            f"'{key}' cannot be searched",
            where=where,
            fix="search over train, fuse, quantize or eval keys; compare base models or datasets as listed experiments",
        )
    if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
        raise ConfigError(
            f"'{key}' needs a range or choices",
            where=where,
            fix=f"e.g. {key}: {{low: 1, high: 8}} (with log: true or step: 2 if wanted) or {key}: {{choices: [a, b]}}",
        )

    def checked(value):
        return flatten(check_layer(unflatten({key: value}), where))[key]

    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        choices = spec["choices"]
        if extra or not isinstance(choices, list) or not choices:
            raise ConfigError(
                f"'{key}': choices must be a non-empty list, with no other keys beside it",
                where=where,
                fix=f"e.g. {key}: {{choices: [4, 8, 16]}}",
            )
        if any(isinstance(c, (dict, list)) for c in choices):
            raise ConfigError(f"'{key}': each choice must be a plain value", where=where)
        return {"choices": [checked(c) for c in choices]}
    extra = sorted(set(spec) - RANGE_KEYS)
    if extra:
        raise ConfigError(
            f"unknown key '{extra[0]}' in the range of '{key}'", where=where, fix="a range has low, high, log, step"
        )
    low, high = checked(spec["low"]), checked(spec["high"])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"'{key}' is not a number, so it takes choices, not a range", where=where)
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"'{key}': log must be true or false, got {log!r}", where=where)
    if not low < high:
        raise ConfigError(f"'{key}': low ({low}) must be below high ({high})", where=where)
    if log and low <= 0:
        raise ConfigError(f"'{key}': a log range needs low > 0, got {low}", where=where)
    if step is not None and (log or isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ConfigError(f"'{key}': step must be a positive number, and cannot go with log: true", where=where)
    integer = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
    return {"low": low, "high": high, "log": log, "step": step, "integer": integer}


def _digest(values: dict, search: dict) -> str:
    content = {"config": {s: values[s] for s in STUDY_SECTIONS}, "search": search}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]


def suggest(trial, search: Search) -> dict:
    """Sample one trial's settings with Optuna (`trial` an optuna.Trial), as the experiment uses them."""
    params = {}
    for key, dim in search.space.items():
        if "choices" in dim:
            params[key] = trial.suggest_categorical(key, dim["choices"])
        elif dim["integer"]:
            params[key] = trial.suggest_int(key, dim["low"], dim["high"], step=dim["step"] or 1, log=dim["log"])
        else:
            params[key] = trial.suggest_float(key, dim["low"], dim["high"], step=dim["step"], log=dim["log"])
    return rounded(params, search)


def rounded(params: dict, search: Search) -> dict:
    """The settings an experiment runs with: a sampled float to 3 significant digits (1.2345e-4 -> 1.23e-4)."""
    out = {}
    for key in search.space:
        value = params[key]
        if isinstance(value, float) and value != 0 and "choices" not in search.space[key]:
            value = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
            if not math.isfinite(value):
                value = params[key]
        out[key] = value
    return out


def trials(search: Search) -> list[Trial]:
    """The study's trials so far, by number; none when the search has not started. A trial that stopped
    before all its settings were sampled has no experiment (the search driver marks it failed)."""
    if not storage_path().is_file():
        return []
    optuna = import_optuna()
    try:
        found = optuna.load_study(study_name=search.study_name, storage=storage_url()).get_trials(deepcopy=False)
    except KeyError:  # no such study yet: the config changed, a new search begins
        return []
    return named(found, search)


def named(optuna_trials, search: Search) -> list[Trial]:
    out, used = [], set()
    for trial in sorted(optuna_trials, key=lambda t: t.number):
        if set(trial.params) != set(search.space):
            continue
        params = rounded(trial.params, search)
        name = settings_name(params)
        if name in used:
            name = f"{name}-t{trial.number}"
        used.add(name)
        value = trial.value if trial.state.name == "COMPLETE" else None
        out.append(Trial(trial.number, trial.state.name, params, value, name))
    return out


def experiments(search: Search, check_layer) -> list[Experiment]:
    """Each trial of the study so far as an experiment (RUNNING and failed ones too)."""
    out = []
    for trial in trials(search):
        source = f"{WHERE} (trial {trial.number})"
        layer = check_layer(unflatten(trial.params), source)
        out.append(Experiment(trial.experiment, ((source, layer),), flatten(layer)))
    return out


def import_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
