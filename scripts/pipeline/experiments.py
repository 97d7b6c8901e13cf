"""The experiments a config describes: the ones listed under `experiments`, each crossed with the grid
under `sweep` (the product of its lists; `_` a list of settings varied together) and repeated once per
seed of `sweep.seeds`. With none listed and no sweep there is one experiment, `experiment.name`.

A listed experiment is a name and a partial override of any section. A grid experiment's name is made
from what varies (`r4-lr1e-4`, `smol-r16-s1`, `s0`), so the same grid always gives the same names; two
experiments that would share a name are an error, as is any key default.yaml does not have.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import re
from collections.abc import Iterable

from pipeline.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PAIRED, SEEDS, SEARCH = "_", "seeds", "search"  # search: pipeline.study
RESERVED_SECTIONS = ("experiment", "experiments", "sweep")  # what an experiment cannot set
SEED_KEY = "train.seed"
# Short labels for the keys swept most; any other key is labelled by its last part.
LABELS = {
    "train.lora.rank": "r",
    "train.lora.scale": "scale",
    "train.lora.dropout": "drop",
    "train.learning_rate": "lr",
    "train.batch_size": "bs",
    "train.iters": "it",
    "train.epochs": "ep",
    "train.num_layers": "layers",
    "train.seed": "s",
    "train.fine_tune_type": "",
    "model.source": "",
    "data.source": "",
}


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    layers: tuple[tuple[str, dict], ...]  # (source, partial override) over the workspace config, lowest first
    varied: dict  # dotted key: value, everything its layers set

    def override(self) -> dict:
        merged: dict = {}
        for _, layer in self.layers:
            merged = deep_merge(merged, layer)
        return merged


def expand(values: dict, check_layer) -> list[Experiment]:
    """Every experiment of a resolved config (`values`), in a stable order: listed experiments, each
    crossed with the grid's points in the order its keys are written, each once per seed.
    `check_layer(layer, source)` checks and coerces a partial override against default.yaml."""
    listed = _listed(values["experiments"], check_layer)
    grid = _grid_points(values["sweep"], check_layer)
    seeds = _seeds(values["sweep"])
    experiments = []
    for (name, layers), point in itertools.product(listed, grid):
        for seed in seeds:
            seed_layers = [] if seed is None else [("sweep.seeds", unflatten({SEED_KEY: seed}))]
            parts = [name] if name else []
            parts += [_part(key, value, short=True) for key, value in point]
            if seed is not None:
                parts.append(_part(SEED_KEY, seed, short=True))
            all_layers = (*layers, *([("sweep", unflatten(dict(point)))] if point else []), *seed_layers)
            experiments.append((parts, all_layers, name, point, seed))
    if len(experiments) == 1 and not experiments[0][0]:
        return [Experiment(values["experiment"]["name"], (), {})]
    return _named(experiments)


def _named(experiments: list) -> list[Experiment]:
    names = [_join(parts) for parts, *_ in experiments]
    if len(set(names)) < len(names):  # short labels collided: label every key by its full path
        names = [
            _join(parts[: 1 if name else 0] + [_part(k, v, short=False) for k, v in point] + _seed_part(seed))
            for parts, _, name, point, seed in experiments
        ]
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise ConfigError(
                f"two experiments would both be named '{name}' (numbers {seen[name] + 1} and {index + 1} of the "
                "expanded list)",
                where="experiments / sweep",
                fix="give them distinct names in `experiments`, or drop the repeated grid value",
            )
        seen[name] = index
    out = []
    for name, (parts, layers, *_rest) in zip(names, experiments):
        varied = {}
        for _, layer in layers:
            varied.update(flatten(layer))
        out.append(Experiment(name, tuple(layers), varied))
    return out


def _seed_part(seed) -> list[str]:
    return [] if seed is None else [_part(SEED_KEY, seed, short=True)]


def _listed(entries, check_layer) -> list[tuple[str | None, list]]:
    """(name, layers) of each listed experiment; [(None, [])] when none is listed."""
    if entries is None or entries == []:
        return [(None, [])]
    if not isinstance(entries, list):
        raise ConfigError(
            "'experiments' must be a list of experiments", where="experiments", fix="e.g. experiments: [{name: r16}]"
        )
    out, names = [], {}
    for index, entry in enumerate(entries):
        where = f"experiments[{index}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(
                f"experiment {index + 1} has no name",
                where=where,
                fix="write each as {name: <folder name>, <section>: {<key>: <value>}}, e.g. "
                "{name: r16, train: {lora: {rank: 16}}}",
            )
        name = check_name(entry["name"], where)
        where = f"experiments[{index}] ({name})"
        if name in names:
            raise ConfigError(
                f"experiment name '{name}' is listed twice (experiments[{names[name]}] and [{index}])",
                where="experiments",
                fix="give each experiment its own name",
            )
        names[name] = index
        layer = {k: v for k, v in entry.items() if k != "name"}
        _refuse_reserved(layer, where)
        out.append((name, [(where, check_layer(layer, where))] if layer else []))
    return out


def check_name(name, where: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"experiment name '{name if name is not None else ''}' is not a plain folder name",
            where=where,
            fix="use letters, digits, '.', '_' and '-', starting with a letter or digit (it becomes runs/<name>/)",
        )
    return name


def _refuse_reserved(layer: dict, where: str) -> None:
    for section in RESERVED_SECTIONS:
        if section in layer:
            raise ConfigError(
                f"an experiment cannot set '{section}'",
                where=where,
                fix="experiments and sweeps are set at the top level of the config, not inside one experiment",
            )


def _grid_points(sweep: dict, check_layer) -> list[list[tuple[str, object]]]:
    """The grid's points, each [(dotted key, value), ...] in the order the keys are written; [[]]: no grid."""
    axes = []
    for key, values in flatten({k: v for k, v in (sweep or {}).items() if k != SEARCH}).items():
        if key == SEEDS:
            continue
        where = f"sweep.{key}"
        if not isinstance(values, list):
            raise ConfigError(
                f"grid value '{where}' is not a list (got {values!r})",
                where="sweep",
                fix=f"give the values to try as a list, e.g. {key}: [{values!r}, ...]",
            )
        if not values:
            raise ConfigError(
                f"grid '{where}' is empty", where="sweep", fix="give at least one value, or remove the key"
            )
        if key == PAIRED:
            axes.append([_bundle(bundle, index, check_layer) for index, bundle in enumerate(values)])
            continue
        _refuse_reserved(unflatten({key: None}), where)
        for value in values:
            check_layer(unflatten({key: value}), where)
        axes.append([[(key, flatten(check_layer(unflatten({key: value}), where))[key])] for value in values])
    return [sum(point, []) for point in itertools.product(*axes)] if axes else [[]]


def _bundle(bundle, index: int, check_layer) -> list[tuple[str, object]]:
    where = f"sweep._[{index}]"
    if not isinstance(bundle, dict) or not bundle:
        raise ConfigError(
            f"'{where}' must be a mapping of the settings varied together",
            where="sweep",
            fix="e.g. _: [{train.lora.rank: 4, train.lora.scale: 8.0}, {train.lora.rank: 16, train.lora.scale: 32.0}]",
        )
    layer = unflatten(flatten(bundle))
    _refuse_reserved(layer, where)
    return list(flatten(check_layer(layer, where)).items())


def _seeds(sweep: dict) -> list[int | None]:
    if not sweep or SEEDS not in sweep:
        return [None]
    seeds = sweep[SEEDS]
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(
            f"'sweep.seeds' must be a non-empty list of seeds, got {seeds!r}",
            where="sweep",
            fix="e.g. seeds: [0, 1, 2]",
        )
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed {seed!r} in 'sweep.seeds' is not a non-negative integer", where="sweep")
    if len(set(seeds)) < len(seeds):
        raise ConfigError("'sweep.seeds' repeats a seed", where="sweep", fix="list each seed once")
    return list(seeds)


def settings_name(changed: dict) -> str:
    """A folder name made from settings (dotted key: value), like a grid experiment's: `r8-lr3.2e-4` for a
    search trial, `tiny-b` for a base model variant with model.source=models/tiny-b."""
    return _join(_part(key, value, short=True) for key, value in changed.items())


def distinct_names(variants: set[tuple[str, bytes]]) -> dict[tuple[str, bytes], str]:
    """{(name, content): name}, a short content hash added where two different contents share a name."""
    counts: dict[str, int] = {}
    for name, _ in variants:
        counts[name] = counts.get(name, 0) + 1
    return {
        (name, content): name if counts[name] == 1 else f"{name}-{hashlib.sha256(content).hexdigest()[:6]}"
        for name, content in variants
    }


# --- names --------------------------------------------------------------------------------------------


def _part(key: str, value, short: bool) -> str:
    """`r4`, `lr1e-4`, `dora`; not short (when short names collide): `train_lora_rank-4`, the whole path."""
    label = LABELS.get(key, key.rsplit(".", 1)[-1]) if short else key.replace(".", "_")
    text = format_value(value) if short else _full_text(value)
    return f"{label}{text}" if label and _is_number(value) else "-".join(p for p in (label, text) if p)


def _join(parts: Iterable[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))
    return re.sub(r"-{2,}", "-", name).strip("-.") or "experiment"


def format_value(value) -> str:
    """A value as a name part: 0.0001 -> 1e-4, 20.0 -> 20, True -> on, a path -> its last part."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e5:
            mantissa, exponent = f"{value:.12e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.12g}"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value) or "none"
    text = str(value).rstrip("/")
    return re.split(r"[/:\\]", text)[-1].removesuffix(".gguf") or text


def _full_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "+".join(_full_text(v) for v in value) or "none"
    return format_value(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- nested <-> dotted ----------------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lora": {"rank": 4}}} -> {"train.lora.rank": 4} (a dotted key stays as it is)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = str(dotted).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
