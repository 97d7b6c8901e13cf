"""Config: config/default.yaml < config/override.yaml (or --override FILE) < key=value overrides.

default.yaml holds every key and its default: a key it does not have is an error naming the closest
valid key, and a value must have the type of the default it replaces. config/schemas/config.schema.json
holds what each key allows (choices, ranges, null): the merged, resolved config is checked against it
before any stage runs, every wrong value reported in one line with the closest valid one. Also a CLI,
used by the Makefile to write one JSON file per config section, rewritten only when its resolved
content changes, so that Make re-runs exactly the stages whose settings changed:

    python -m pipeline.config slices --out .state/config --experiments-root runs [--override FILE] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import NamedTuple

from pipeline import contracts, credentials, experiments, paths, stages, study
from pipeline.contracts import write_text_if_changed
from pipeline.errors import ConfigError, PipelineError

import orjson
import yaml
from jsonschema import ValidationError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_SCHEMA_NAME = "config"
_SPLITS_TOLERANCE = 1e-6
_KNOB_LINE = re.compile(r"(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)")
_SCHEMA_TYPE_NAMES = {
    "boolean": "a boolean",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_PYTHON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}
_RANGE_KEYWORDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


class Problem(NamedTuple):
    """One wrong value: the layer that gave it, what is wrong and the fix."""

    source: str
    what: str
    fix: str | None


def load_config(
    overrides: Sequence[str] = (),
    override_file: str | Path | None = None,
    default_file: str | Path | None = None,
    shared: bool = False,
) -> DictConfig:
    """The resolved, read-only config of one experiment: the one `experiment.name` names, or the only one
    (`shared`: a stage every experiment shares, which may take the first). `override_file` None means
    config/override.yaml if present."""
    workspace = load_workspace(overrides, override_file, default_file)
    return workspace.config(workspace.selected(shared))


def load_workspace(
    overrides: Sequence[str] = (),
    override_file: str | Path | None = None,
    default_file: str | Path | None = None,
) -> Workspace:
    """Every layer of the config, merged, and the experiments it describes (pipeline.experiments)."""
    default_path = Path(default_file) if default_file else paths.DEFAULT_CONFIG
    defaults = _read_yaml(default_path)
    layers = [(paths.display(default_path), defaults)]
    merged = OmegaConf.create(defaults)
    for source, layer in _override_layers(overrides, override_file):
        credentials.check_layer(layer, source)
        _check_against_defaults(layer, defaults, source)
        layers.append((source, _coerce(layer, defaults)))
        merged = OmegaConf.merge(merged, layers[-1][1])
    values = _resolved(merged, layers)
    experiments.check_name(values["experiment"]["name"], "experiment.name")

    def check_layer(layer: dict, source: str) -> dict:
        credentials.check_layer(layer, source)
        _check_against_defaults(layer, defaults, source)
        return _coerce(layer, defaults)

    search = study.parse(values, check_layer)
    if search is not None:
        study.refuse_grid(values)
        listed = study.experiments(search, check_layer)
    else:
        listed = experiments.expand(values, check_layer)
    workspace = Workspace(defaults, layers, merged, listed, search, values["experiment"]["name"])
    workspace.check_lineage()
    return workspace


@dataclasses.dataclass
class Workspace:
    defaults: dict
    layers: list  # (source, mapping), lowest precedence first
    merged: DictConfig  # every layer merged, not yet resolved
    experiments: list[experiments.Experiment]
    search: study.Search | None = None  # sweep.search: the experiments are its trials so far (maybe none)
    base_name: str = "main"  # experiment.name as configured: the shared stages' owner before any trial
    _configs: dict = dataclasses.field(default_factory=dict, repr=False)
    _variants: dict | None = dataclasses.field(default=None, repr=False)

    def names(self) -> list[str]:
        return [e.name for e in self.experiments]

    def experiment(self, name: str) -> experiments.Experiment:
        if not self.experiments and name == self.base_name:
            return experiments.Experiment(name, (), {})  # a search before its first trial: the config as it is
        return next(e for e in self.experiments if e.name == name)

    def owner(self) -> str:
        """The experiment whose config the shared stages (model, prepare, search) run with."""
        return self.experiments[0].name if self.experiments else self.base_name

    def selected(self, shared: bool = False) -> str:
        """The experiment a stage runs: the one experiment.name names, or the only one there is (`shared`:
        the first, when none is named; the sections a shared stage reads are the same in all)."""
        asked = _resolved(self.merged, self.layers)["experiment"]["name"]
        names = self.names()
        if asked in names:
            return asked
        if not names:
            if shared:
                return self.base_name
            raise ConfigError(
                "the search has run no trial yet, so there is no experiment to run a stage for",
                where="sweep.search",
                fix="run `make all` (or `make search`): each trial is an experiment",
            )
        set_by = [source for source, layer in self.layers[1:] if _sets(layer, ("experiment", "name"))]
        if (len(names) == 1 or shared) and not set_by:
            return names[0]
        if not set_by:
            raise ConfigError(
                f"{len(names)} experiments are configured and none is named",
                where="experiment.name",
                fix=f"name one, e.g. make <stage> EXP={names[0]} (`make experiments` lists them: "
                + ", ".join(names[:6])
                + (", ..." if len(names) > 6 else "")
                + ")",
            )
        close = difflib.get_close_matches(asked, names, n=1, cutoff=0.5)
        raise ConfigError(
            f"there is no experiment named '{asked}'",
            where=set_by[-1],
            fix=(f"did you mean '{close[0]}'? " if close else "") + "`make experiments` lists the configured ones",
        )

    def init_from(self, name: str) -> str | None:
        """The experiment whose adapter experiment `name` starts from (train.init_from), if any."""
        return self.config(name).train.init_from

    def check_lineage(self) -> None:
        """train.init_from names another configured experiment on the same base model, and no chain of
        them comes back to where it started."""
        names = self.names()
        for name in names:
            parent = self.init_from(name)
            if parent is None:
                continue
            where = next((source for source, _ in reversed(self.experiment(name).layers)), self.layers[-1][0])
            if parent not in names:
                close = difflib.get_close_matches(parent, names, n=1, cutoff=0.5)
                raise ConfigError(
                    f"experiment '{name}' starts from '{parent}' (train.init_from), which is not configured",
                    where=where,
                    fix=(f"did you mean '{close[0]}'? " if close else "") + "name one of `make experiments`",
                )
            if self.variant(parent)[0] != self.variant(name)[0]:
                raise ConfigError(
                    f"experiment '{name}' starts from '{parent}' (train.init_from), which trains another base model",
                    where=where,
                    fix="continue from an experiment on the same model.source",
                )
            seen = [name]
            while parent is not None:
                if parent in seen:
                    raise ConfigError(
                        "train.init_from goes round in a circle: " + " -> ".join([*seen, parent]),
                        where=where,
                        fix="let the first experiment of the chain start from the base model (train.init_from: null)",
                    )
                seen.append(parent)
                parent = self.init_from(parent)

    def variant(self, name: str) -> tuple[str | None, str | None]:
        """The (model, prepared data) variant experiment `name` uses, for paths.use_variant: None where it
        uses the workspace's own (model, data and prepare as configured outside `experiments`), else a name
        made from what it changes (`tiny-b`), the same for every experiment that changes them alike."""
        if self._variants is None:
            self._variants = self._all_variants()
        return self._variants.get(name, (None, None))  # the base config of a search before its first trial

    def _all_variants(self) -> dict[str, tuple[str | None, str | None]]:
        base = _resolved(self.merged, self.layers)
        found = {}
        for index, sections in enumerate((VARIANT_SECTIONS[:1], VARIANT_SECTIONS)):
            contents = {}
            for name in self.names():
                values = OmegaConf.to_container(self.config(name), resolve=True)
                if all(values[s] == base[s] for s in sections):
                    contents[name] = None
                    continue
                flat = experiments.flatten({s: values[s] for s in sections})
                base_flat = experiments.flatten({s: base[s] for s in sections})
                changed = {k: v for k, v in flat.items() if base_flat.get(k) != v}
                contents[name] = (experiments.settings_name(changed), orjson.dumps(flat, option=orjson.OPT_SORT_KEYS))
            slugs = experiments.distinct_names({c for c in contents.values() if c})
            for name, content in contents.items():
                found.setdefault(name, [None, None])[index] = slugs[content] if content else None
        return {name: tuple(pair) for name, pair in found.items()}

    def config(self, name: str) -> DictConfig:
        """The resolved, checked, read-only config of experiment `name`."""
        if name in self._configs:
            return self._configs[name]
        experiment = self.experiment(name)
        layers = [*self.layers, *experiment.layers, ("experiment", {"experiment": {"name": name}})]
        merged = self.merged
        for _, layer in layers[len(self.layers) :]:
            merged = OmegaConf.merge(merged, layer)
        check_values(_resolved(merged, layers), layers)
        OmegaConf.resolve(merged)
        OmegaConf.set_struct(merged, True)
        OmegaConf.set_readonly(merged, True)
        self._configs[name] = merged
        return merged


VARIANT_SECTIONS = ("model", "data", "prepare")  # what the base model (the first) and prepared data depend on


def _resolved(merged: DictConfig, layers) -> dict:
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise _interpolation_error(exc, merged, layers) from None


def section(cfg: DictConfig, name: str) -> dict:
    """One top-level section as a plain dict, as stages record it in their outputs."""
    return OmegaConf.to_container(cfg[name], resolve=True)


def dump_yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False).rstrip()


def _override_layers(overrides: Sequence[str], override_file):
    if override_file is not None:
        path = paths.resolve(override_file)
        if not path.is_file():
            raise ConfigError(
                f"override file {override_file} does not exist",
                where="config",
                fix="give an existing YAML file (copy config/override.example.yaml to start one)",
            )
        yield paths.display(path), _read_yaml(path, allow_empty=True)
    elif paths.USER_OVERRIDE.is_file():
        yield paths.display(paths.USER_OVERRIDE), _read_yaml(paths.USER_OVERRIDE, allow_empty=True)
    if overrides:
        yield "command line", _parse_dotlist(overrides)


def _read_yaml(path: Path, allow_empty: bool = False) -> dict:
    where = paths.display(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", where=where) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8 text", where=where, fix="save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{where}:{mark.line + 1}:{mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        fix = "keep one of them (merge the two)" if "appears twice" in problem else "correct the YAML syntax there"
        raise ConfigError(f"invalid YAML: {problem}", where=where, fix=fix) from None
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "the top level must be a mapping of sections", where=where, fix="see config/override.example.yaml"
        )
    return data


def _interpolation_error(exc: OmegaConfBaseException, merged: DictConfig, layers) -> ConfigError:
    """Name the key whose ${...} cannot be resolved, the layer that set it, what is missing and the fix."""
    key = getattr(exc, "full_key", None) or "config"
    path = key.split(".")
    raw = _value_at(OmegaConf.to_container(merged, resolve=False), path)
    reason = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    return ConfigError(
        f"cannot resolve '{key}: {raw}': {reason}",
        where=layers[_last_layer_setting(path, layers)][0],
        fix="refer to an existing key, e.g. ${train.batch_size}, or to a set environment variable, "
        "e.g. ${oc.env:NAME,default}",
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a second `train:` section would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' appears twice in the same mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_dotlist(overrides: Iterable[str]) -> dict:
    layer: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"'{item}' is not KEY=VALUE",
                where="command line",
                fix="write it as section.key=value, e.g. train.learning_rate=2e-4",
            )
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(
                f"cannot parse the value of {key}: {str(exc).splitlines()[0]}",
                where="command line",
                fix="quote it if it is text; an interpolation is written ${section.key}",
            ) from None
        node = layer
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key} is given both as a value and as a section", where="command line")
        node[leaf] = value
    return layer


def valid_keys(defaults: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in defaults.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(valid_keys(value, dotted + "."))
    return keys


def _check_against_defaults(
    layer: dict, defaults: dict, source: str, root: dict | None = None, prefix: str = ""
) -> None:
    root = defaults if root is None else root
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in defaults:
            raise ConfigError(f"unknown key '{dotted}'", where=source, fix=_suggestion(dotted, root, defaults))
        default = defaults[key]
        if isinstance(default, dict) and not default:  # an empty mapping in default.yaml is free-form
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"'{dotted}' must be a mapping, got {value!r}", where=source, fix=f"e.g. {dotted}: {{key: value}}"
                )
            continue
        if isinstance(default, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"'{dotted}' is a section, got the value {value!r}",
                    where=source,
                    fix=f"set keys inside it, e.g. {dotted}.{next(iter(default), 'key')}=...",
                )
            _check_against_defaults(value, default, source, root, dotted + ".")
        elif _is_interpolation(value):
            continue  # checked once resolved, against the schema
        elif default is not None and value is not None and not _type_fits(value, default):
            raise ConfigError(
                f"'{dotted}' must be {_type_name(default)}, got {_type_name(value)} {value!r}",
                where=source,
                fix=f"give {_type_name(default)} like the default ({default!r})",
            )


def _suggestion(dotted: str, root: dict, siblings: dict) -> str:
    """The closest valid key, searched over the whole config so a key in the wrong section is found too."""
    candidates = valid_keys(root)
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = dotted.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.8)
        close = [c for c in candidates if close and c.rsplit(".", 1)[-1] == close[0]][:1]
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys here: " + ", ".join(sorted(siblings))


def _type_fits(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, (list, str))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _coerce(layer: dict, defaults: dict, prefix: str = "") -> dict:
    """Ints given for float knobs become floats, numbers given for string knobs become strings (unless
    the schema takes a number there too, as `eval.answer_records: auto | N` does)."""
    out = {}
    for key, value in layer.items():
        default = defaults.get(key)
        if isinstance(default, dict) and isinstance(value, dict):
            out[key] = _coerce(value, default, f"{prefix}{key}.")
        elif _is_interpolation(value):
            out[key] = value
        elif isinstance(default, float) and isinstance(value, int):
            out[key] = float(value)
        elif isinstance(default, str) and isinstance(value, (int, float)) and not _takes_number(prefix + key):
            out[key] = str(value)
        elif isinstance(default, list) and isinstance(value, str):
            out[key] = [value]  # a list knob also takes a single value
        else:
            out[key] = value
    return out


def _takes_number(dotted: str) -> bool:
    def numeric(node: dict) -> bool:
        node = _deref(node)
        kinds = node.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        return bool({"integer", "number"} & set(kinds)) or any(numeric(b) for b in node.get("anyOf", []))

    node = schema_knobs().get(dotted)
    return node is not None and numeric(node)


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def _type_name(value) -> str:
    return _PYTHON_TYPE_NAMES.get(type(value), type(value).__name__)


# --- values: config/schemas/config.schema.json, then the rules that span keys ---------------------------------


def check_values(values: dict, layers: Sequence[tuple[str, dict]]) -> None:
    """Raise one ConfigError naming every value the schema or a cross-key rule refuses.

    `layers` are (source, mapping) from lowest to highest precedence; a wrong value is blamed on the
    last layer that set it."""
    problems = _schema_problems(values, layers) or _split_problems(values, layers)
    if problems:
        raise _config_error(problems)


def schema() -> dict:
    return contracts.validator(_SCHEMA_NAME).schema


def schema_knobs(node: dict | None = None, prefix: str = "") -> dict[str, dict]:
    """Every key the schema declares (sections too), dotted, in file order, with its ($ref-resolved) schema."""
    node = schema() if node is None else node
    knobs = {}
    for key, child in node.get("properties", {}).items():
        child = _deref(child)
        knobs[prefix + key] = child
        knobs.update(schema_knobs(child, f"{prefix}{key}."))
    return knobs


def choices(node: dict) -> list:
    """The enumerated values a key (or each item of a list key) may take; [] when it has none."""
    node = _deref(node)
    if "items" in node:
        return choices(node["items"])
    found = list(node.get("enum", []))
    for branch in node.get("anyOf", []):
        found += choices(branch)
    return found


def allowed_text(node: dict) -> str:
    """What a key allows, in words: `one of a, b`, `>= 1`, `-1 or >= 1`, `null or a string`, ..."""
    node = _deref(node)
    if "anyOf" in node:
        return " or ".join(allowed_text(branch) for branch in node["anyOf"])
    if "enum" in node:
        return "one of " + ", ".join(str(choice) for choice in node["enum"])
    if "const" in node:
        return str(node["const"])
    if node.get("type") == "array":
        return "a list, each " + allowed_text(node.get("items", {}))
    if "description" in node and node.get("type") != "object":
        return node["description"]
    if "pattern" in node:
        return f"matching {node['pattern']}"
    return " ".join(part for part in (_types_text(node.get("type", [])), _range_text(node)) if part)


def _deref(node: dict) -> dict:
    """A node with its local `$ref` (#/$defs/<name>) merged in."""
    ref = node.get("$ref")
    if not ref:
        return node
    resolved = dict(schema()["$defs"][ref.rsplit("/", 1)[-1]])
    resolved.update({key: value for key, value in node.items() if key != "$ref"})
    return resolved


def _schema_problems(values: dict, layers) -> list[Problem]:
    problems, seen = [], set()
    for error in contracts.validator(_SCHEMA_NAME).iter_errors(values):
        path = _subject_path(error)
        if path not in seen:  # one problem per value: a wrong type hides the other checks of that value
            seen.add(path)
            what, fix = _explain(error, _dotted(path), _value_at(layers[0][1], path))
            problems.append(Problem(layers[_last_layer_setting(path, layers)][0], what, fix))
    return problems


def _subject_path(error: ValidationError) -> tuple:
    """The path of the value the error is about; for a missing or undeclared key, that key's path."""
    path = tuple(error.absolute_path)
    if error.validator == "required":
        return path + (_missing_keys(error)[0],)
    if error.validator == "additionalProperties":
        return path + (_undeclared_keys(error)[0],)
    return path


def _missing_keys(error: ValidationError) -> list[str]:
    return [key for key in error.validator_value if key not in error.instance]


def _undeclared_keys(error: ValidationError) -> list[str]:
    return sorted(set(error.instance) - set(error.schema.get("properties", {})))


def _explain(error: ValidationError, key: str, default) -> tuple[str, str | None]:
    """(what is wrong, the fix) for one schema error, in the words of the config."""
    node, value, kind = error.schema, error.instance, error.validator
    if kind == "type":
        example = None if "object" in _types(node) else _example(node, default)  # a whole section is no example
        fix = f"give {_types_text(node['type'])}" + (f", e.g. {example!r}" if example is not None else "")
        return f"'{key}' must be {_types_text(node['type'])}, got {_described(value)}", fix
    if kind == "enum":
        fix = _suggested_choice(value, node["enum"]) or f"use one of: {_listed(node['enum'])}"
        return f"'{key}' must be one of {_listed(node['enum'])}; got {value!r}", fix
    if kind == "anyOf":
        allowed = allowed_text(node)
        separator = "; " if "," in allowed else ", "
        return f"'{key}' must be {allowed}{separator}got {value!r}", _any_of_fix(node, value, allowed, default)
    if kind in _RANGE_KEYWORDS:
        return f"'{key}' must be {_range_text(node)}, got {value!r}", _range_fix(node, value, default)
    if kind == "pattern":
        return f"'{key}' must be {allowed_text(node)}, got {value!r}", _pattern_fix(node, value, default)
    if kind == "minLength":
        return f"'{key}' must not be empty", f"give {allowed_text(node)}"
    if kind == "required":
        return f"'{key}' is missing", "add it with its default to config/default.yaml"
    if kind == "additionalProperties":
        return (
            f"'{key}' is not declared in config/schemas/config.schema.json",
            "declare it there with what it allows, or remove it from config/default.yaml",
        )
    return f"'{key}': {error.message}", None


def _suggested_choice(value, options: Sequence) -> str | None:
    """`did you mean X?` with the nearest number, or the string differing only in case or closest in spelling."""
    if _is_number(value) and all(_is_number(option) for option in options):
        return f"did you mean {_nearest(value, options)!r}?"
    if not isinstance(value, str):
        return None
    texts = [option for option in options if isinstance(option, str)]
    same_but_case = [option for option in texts if option.lower() == value.strip().lower()]
    close = same_but_case or difflib.get_close_matches(value, texts, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _any_of_fix(node: dict, value, allowed: str, default) -> str:
    if _is_number(value) and not choices(node):
        return _range_fix(node, value, default)
    return _suggested_choice(value, choices(node)) or f"use {allowed}"


def _range_fix(node: dict, value, default) -> str:
    closest = _closest_number(node, value)
    if closest is not None:
        return f"the closest valid value is {closest!r}"
    example = _example(node, default)
    return f"use a value {_range_text(node)}" + (f", e.g. {example!r}" if example is not None else "")


def _pattern_fix(node: dict, value, default) -> str:
    """A likely intended spelling (spaces or case) when it fits, else an example."""
    pattern = re.compile(node["pattern"])
    for candidate in (value.strip(), value.strip().upper()):
        if pattern.search(candidate):
            return f"did you mean {candidate!r}?"
    example = _example(node, default)
    return f"e.g. {example!r}" if example is not None else f"give {allowed_text(node)}"


def _closest_number(node: dict, value):
    """The valid number nearest to `value`, or None when the bound is exclusive and not an integer step."""
    integer = "integer" in _types(node)
    candidates = []
    for branch in node.get("anyOf", [node]):
        if "anyOf" in branch and branch is not node:  # e.g. `auto | N` where N is -1 or at least 1
            candidates.append(_closest_number(branch, value))
        elif "const" in branch:
            candidates.append(branch["const"])
        else:
            candidates.append(_clamped(branch, value, integer or "integer" in _types(branch)))
    # only numbers: a word such as `auto` is allowed too, but is not "the nearest number"
    candidates = [c for c in candidates if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return _nearest(value, candidates) if candidates else None


def _clamped(node: dict, value, integer: bool):
    if "minimum" in node and value < node["minimum"]:
        return node["minimum"]
    if "exclusiveMinimum" in node and value <= node["exclusiveMinimum"]:
        return node["exclusiveMinimum"] + 1 if integer else None
    if "maximum" in node and value > node["maximum"]:
        return node["maximum"]
    if "exclusiveMaximum" in node and value >= node["exclusiveMaximum"]:
        return node["exclusiveMaximum"] - 1 if integer else None
    return value


def _nearest(value, options: Sequence):
    return min(options, key=lambda option: (abs(option - value), -option))  # a tie goes to the larger value


def _range_text(node: dict) -> str:
    """`>= 1`, `> 0`, `in [0, 1)`, ... from the JSON Schema bounds of a node."""
    low = [(node[k], k == "minimum") for k in ("minimum", "exclusiveMinimum") if k in node]
    high = [(node[k], k == "maximum") for k in ("maximum", "exclusiveMaximum") if k in node]
    if low and high:
        (lo, lo_closed), (hi, hi_closed) = low[0], high[0]
        return f"in {'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
    if low:
        return f"{'>=' if low[0][1] else '>'} {low[0][0]}"
    if high:
        return f"{'<=' if high[0][1] else '<'} {high[0][0]}"
    return ""


def _types(node: dict) -> list[str]:
    kinds = node.get("type", [])
    return [kinds] if isinstance(kinds, str) else list(kinds)


def _types_text(kinds) -> str:
    kinds = [kinds] if isinstance(kinds, str) else sorted(kinds, key=lambda kind: kind != "null")
    return " or ".join(_SCHEMA_TYPE_NAMES.get(kind, kind) for kind in kinds)


def _example(node: dict, default):
    """A valid value to show in a fix: the schema's example, else the default, else the first choice."""
    examples = node.get("examples", []) + ([] if default is None else [default]) + node.get("enum", [])
    return examples[0] if examples else None


def _described(value) -> str:
    return "null" if value is None else f"{_type_name(value)} {value!r}"


def _listed(options: Iterable) -> str:
    return ", ".join(str(option) for option in options)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dotted(path: Sequence) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def _last_layer_setting(path: Sequence, layers: Sequence[tuple[str, dict]]) -> int:
    """Index of the highest layer that sets the key at `path` (list indexes are part of the key's value)."""
    keys = []
    for part in path:
        if isinstance(part, int):
            break
        keys.append(part)
    for index in range(len(layers) - 1, 0, -1):
        if _sets(layers[index][1], keys):
            return index
    return 0


def _value_at(tree, path: Sequence):
    """The value at a schema error path (keys and list indexes), or None when `tree` has none there."""
    for part in path:
        if isinstance(part, int) and isinstance(tree, list) and part < len(tree):
            tree = tree[part]
        elif isinstance(part, str) and isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return None
    return tree


def _sets(layer: dict, keys: Sequence[str]) -> bool:
    node = layer
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _split_problems(values: dict, layers) -> list[Problem]:
    """data.splits must share out all records: train + valid + test = 1."""
    splits = values["data"]["splits"]
    total = sum(splits.values())
    if abs(total - 1) <= _SPLITS_TOLERANCE:
        return []
    source = layers[max(_last_layer_setting(("data", "splits", name), layers) for name in splits)][0]
    shares = " + ".join(f"{share:g}" for share in splits.values())
    what = f"'data.splits' train + valid + test must sum to 1, got {total:g} ({shares})"
    return [Problem(source, what, _split_fix(splits, total))]


def _split_fix(splits: dict, total: float) -> str:
    rest = round(1 - splits["train"] - splits["valid"], 6)
    if 0 <= rest <= 1:
        return f"set data.splits.test={rest + 0.0:g} (1 - train - valid)"  # + 0.0 turns -0.0 into 0.0
    if total > 0:
        return "scale them, e.g. " + ", ".join(f"data.splits.{k}={v / total:.3g}" for k, v in splits.items())
    return "e.g. data.splits.train=0.8, data.splits.valid=0.1, data.splits.test=0.1"


def _config_error(problems: Sequence[Problem]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(problems[0].what, where=problems[0].source, fix=problems[0].fix)
    sources = list(dict.fromkeys(problem.source for problem in problems))
    parts = [_with_fix(problem, named=len(sources) > 1) for problem in problems]
    return ConfigError(
        f"{len(problems)} invalid values: " + "; ".join(parts),
        where=sources[0] if len(sources) == 1 else "config",
        fix="correct each as suggested (the comments in config/default.yaml list what each key allows)",
    )


def _with_fix(problem: Problem, named: bool) -> str:
    text = f"{problem.source}: {problem.what}" if named else problem.what
    return f"{text} ({problem.fix})" if problem.fix else text


# --- describe: the knobs as a table ------------------------------------------------------------------------


def default_comments(default_file: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """Each key of default.yaml (sections too), dotted, in file order: (its value as written, its comment).

    Each knob is one line, `key: value  # comment`; a section is `key:` with its keys indented below."""
    path = Path(default_file) if default_file else paths.DEFAULT_CONFIG
    knobs, parents = {}, []  # parents: (indent, key) of the sections the line is inside
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _KNOB_LINE.fullmatch(line)
        if not match:
            continue
        indent, key = len(match["indent"]), match["key"]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        dotted = ".".join([parent for _, parent in parents] + [key])
        value, _, comment = match["rest"].partition(" #")
        knobs[dotted] = (value.strip(), comment.strip())
        if not value.strip():
            parents.append((indent, key))
    return knobs


def describe(section: str | None = None) -> str:
    """A plain-text table of every key (of one section, or all): its default, what it allows, its comment."""
    knobs, declared = default_comments(), schema_knobs()
    sections = [key for key in knobs if "." not in key]
    if section is not None and section not in sections:
        close = difflib.get_close_matches(section, sections, n=1)
        fix = f"did you mean '{close[0]}'?" if close else "sections: " + ", ".join(sections)
        raise ConfigError(f"unknown section '{section}'", where="config", fix=fix)
    rows = [("key", "default", "allowed", "meaning")]
    for key, (default, comment) in knobs.items():
        if section is None or key == section or key.startswith(section + "."):
            allowed = "a section" if not default else allowed_text(declared.get(key, {}))
            rows.append((key, default, allowed, comment))
    return _table(rows, widths=(max(len(row[0]) for row in rows), 24, 36, 56))


def _table(rows: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    """Columns padded to `widths`; a longer cell wraps onto the next lines of its column (keys never wrap)."""
    lines = []
    for row in rows:
        cells = [
            [cell] if column == 0 else textwrap.wrap(cell, width) or [""]
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        for parts in zip_longest(*cells, fillvalue=""):
            lines.append("  ".join(part.ljust(width) for part, width in zip(parts, widths)).rstrip())
    return "\n".join(lines) + "\n"


def write_slices(
    cfg: DictConfig, out_dir: Path, experiments_root: Path | None = None, variant: tuple = (None, None)
) -> list[str]:
    """One JSON file per top-level section, rewritten only when its content changes. Sections that
    belong to one experiment go to <experiments_root>/<name>/.config/, so each experiment keeps its own;
    those of a model or prepared-data variant (Workspace.variant) to <out_dir>/<variant>/."""
    changed = []
    for name in cfg:
        folder = out_dir / stages.shared_slice_dir(name, variant).relative_to(paths.CONFIG_SLICE_DIR)
        if experiments_root is not None and (name in stages.experiment_sections() or name == "experiment"):
            folder = experiments_root / cfg.experiment.name / ".config"
        text = orjson.dumps(section(cfg, name), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode() + "\n"
        if write_text_if_changed(folder / f"{name}.json", text):
            changed.append(name)
    return changed


def write_workspace_slices(workspace: Workspace, out_dir: Path, experiments_root: Path) -> dict[str, DictConfig]:
    """Every experiment's slices (each experiment's config checked on the way), and {name: config}."""
    configs = {name: workspace.config(name) for name in workspace.names() or [workspace.owner()]}
    for name, cfg in configs.items():
        write_slices(cfg, out_dir, experiments_root, workspace.variant(name))
    if workspace.search is not None:  # what the search stage depends on: its study (named after the config) and budget
        text = orjson.dumps(dataclasses.asdict(workspace.search), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        write_text_if_changed(out_dir / "search.json", text.decode() + "\n")
    return configs


def _make_include(workspace: Workspace, configs: dict[str, DictConfig], selected: list[str]) -> str:
    stale, told = {}, set()
    for name, cfg in configs.items():
        sources = [cfg.data.source] if isinstance(cfg.data.source, str) else [str(s) for s in cfg.data.source]
        paths.use_variant(*workspace.variant(name))
        stale[name] = stages.stale_stages(name, sources)
        for stage, reasons in stale[name].items():
            label = f"{stage} ({name})" if stages.get(stage).per_experiment and len(configs) > 1 else stage
            if label not in told:
                told.add(label)
                print(f"{label}: runs again, " + "; ".join(reasons), file=sys.stderr)
    paths.use_variant(None, None)
    variants = {name: workspace.variant(name) for name in configs}
    parents = {name: workspace.init_from(name) for name in configs}
    searched = workspace.search is not None
    return stages.make_include(workspace.names(), selected, stale, variants, parents, workspace.owner(), searched)


def experiments_table(workspace: Workspace) -> str:
    """The expanded experiments, each with the settings it changes (`make experiments`)."""
    rows = [
        (e.name, ", ".join(f"{k}={v}" for k, v in e.varied.items()) or "(the config as it is)")
        for e in workspace.experiments
    ]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [f"{len(rows)} experiment{'s' if len(rows) != 1 else ''}" + (":" if rows else "")]
    lines += [f"  {name:<{width}}  {what}" for name, what in rows]
    if workspace.search is not None:
        search = workspace.search
        lines.append(
            f"search: study {search.study_name} in {paths.display(study.storage_path())}, "
            f"{len(rows)} of {search.trials} trials run; it searches "
            + ", ".join(f"{key} {_dimension_text(dim)}" for key, dim in search.space.items())
        )
    return "\n".join(lines)


def _dimension_text(dim: dict) -> str:
    if "choices" in dim:
        return "in {" + ", ".join(str(c) for c in dim["choices"]) + "}"
    extra = " (log)" if dim["log"] else f" (step {dim['step']})" if dim["step"] else ""
    return f"{dim['low']}..{dim['high']}{extra}"


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    slices = sub.add_parser("slices", help="write one JSON file per config section (and a Make include)")
    slices.add_argument("--out", type=Path, default=paths.CONFIG_SLICE_DIR)
    slices.add_argument("--mk", type=Path, help="also write this Make include (targets and prerequisites)")
    slices.add_argument(
        "--experiments-root", type=Path, default=paths.RUNS_DIR, help="experiment slices go to <root>/<name>/.config/"
    )
    slices.add_argument("--override", metavar="FILE")
    slices.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show = sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("--override", metavar="FILE")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    listing = sub.add_parser("experiments", help="list the experiments and what each changes")
    listing.add_argument("--override", metavar="FILE")
    listing.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    describe_cmd = sub.add_parser("describe", help="every key: default, allowed values, what it does")
    describe_cmd.add_argument("section", nargs="?")
    args = parser.parse_args(argv)
    if args.command == "describe":
        print(describe(args.section))
        return 0
    try:
        workspace = load_workspace(args.overrides, args.override)
        if args.command == "show":
            print(dump_yaml(OmegaConf.to_container(workspace.config(workspace.selected()), resolve=True)))
        elif args.command == "experiments":
            for name in workspace.names():
                workspace.config(name)  # every experiment checked, as make would
            print(experiments_table(workspace))
        else:
            configs = write_workspace_slices(workspace, args.out, args.experiments_root)
            asked = any(_sets(layer, ("experiment", "name")) for _, layer in workspace.layers[1:])
            if not workspace.names():
                selected = []  # a search before its first trial: only the shared stages and the search
            else:
                selected = [workspace.selected()] if asked or len(configs) == 1 else workspace.names()
            if args.mk:
                write_text_if_changed(args.mk, _make_include(workspace, configs, selected))
    except PipelineError as exc:
        print(f"config error: {exc.line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
