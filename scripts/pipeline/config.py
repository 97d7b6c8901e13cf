"""Config: config/default.yaml < config/override.yaml (or --override FILE) < key=value overrides.

default.yaml is the schema: a key it does not have is an error naming the closest valid key, and a
value must have the type of the default it replaces (a null default takes any value). Also a CLI,
used by the Makefile to write one JSON file per config section, rewritten only when its resolved
content changes, so that Make re-runs exactly the stages whose settings changed:

    python -m pipeline.config slices --out .state/config --experiments-root runs [--override FILE] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import paths
from pipeline.contracts import write_text_if_changed
from pipeline.errors import ConfigError, PipelineError

EXPERIMENT_SECTIONS = ("train", "fuse", "quantize", "eval")  # settings that differ between experiments; the rest is shared
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_config(
    overrides: Sequence[str] = (),
    override_file: str | Path | None = None,
    default_file: str | Path | None = None,
) -> DictConfig:
    """The resolved, read-only config. `override_file` None means config/override.yaml if present."""
    default_path = Path(default_file) if default_file else paths.DEFAULT_CONFIG
    defaults = _read_yaml(default_path)
    merged = OmegaConf.create(defaults)
    for source, layer in _override_layers(overrides, override_file):
        _check_against_defaults(layer, defaults, source)
        merged = OmegaConf.merge(merged, _coerce(layer, defaults))
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve an interpolation: {exc}", where="config") from None
    name = merged.experiments.name
    if not isinstance(name, str) or not _EXPERIMENT_NAME.fullmatch(name):
        raise ConfigError(
            f"experiment name '{name or ''}' is not a plain folder name",
            where="experiments.name",
            fix="use letters, digits, '.', '_' and '-' (it becomes runs/<name>/)",
        )
    OmegaConf.set_struct(merged, True)
    OmegaConf.set_readonly(merged, True)
    return merged


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{where}:{mark.line + 1}:{mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", where=where, fix="correct the YAML syntax there") from None
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", where=where, fix="see config/override.example.yaml")
    return data


def _parse_dotlist(overrides: Iterable[str]) -> dict:
    layer: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"'{item}' is not KEY=VALUE", where="command line", fix="write it as section.key=value, e.g. train.learning_rate=2e-4")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse the value of {key}: {exc}", where="command line") from None
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


def _check_against_defaults(layer: dict, defaults: dict, source: str, root: dict | None = None, prefix: str = "") -> None:
    root = defaults if root is None else root
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in defaults:
            raise ConfigError(f"unknown key '{dotted}'", where=source, fix=_suggestion(dotted, root, defaults))
        default = defaults[key]
        if isinstance(default, dict) and not default:  # an empty mapping in default.yaml is free-form
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' must be a mapping, got {value!r}", where=source, fix=f"e.g. {dotted}: {{key: value}}")
            continue
        if isinstance(default, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section, got the value {value!r}", where=source, fix=f"set keys inside it, e.g. {dotted}.{next(iter(default), 'key')}=...")
            _check_against_defaults(value, default, source, root, dotted + ".")
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


def _coerce(layer: dict, defaults: dict) -> dict:
    """Ints given for float knobs become floats, numbers given for string knobs become strings."""
    out = {}
    for key, value in layer.items():
        default = defaults.get(key)
        if isinstance(default, dict) and isinstance(value, dict):
            out[key] = _coerce(value, default)
        elif isinstance(default, float) and isinstance(value, int):
            out[key] = float(value)
        elif isinstance(default, str) and isinstance(value, (int, float)):
            out[key] = str(value)
        elif isinstance(default, list) and isinstance(value, str):
            out[key] = [value]  # a list knob also takes a single value
        else:
            out[key] = value
    return out


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def write_slices(cfg: DictConfig, out_dir: Path, experiments_root: Path | None = None) -> list[str]:
    """One JSON file per top-level section, rewritten only when its content changes. Sections that
    belong to one experiment go to <experiments_root>/<name>/.config/, so each experiment keeps its own."""
    changed = []
    for name in cfg:
        folder = out_dir
        if experiments_root is not None and name in EXPERIMENT_SECTIONS:
            folder = experiments_root / cfg.experiments.name / ".config"
        text = orjson.dumps(section(cfg, name), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode() + "\n"
        if write_text_if_changed(folder / f"{name}.json", text):
            changed.append(name)
    return changed


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    slices = sub.add_parser("slices", help="write one JSON file per config section (and a Make include)")
    slices.add_argument("--out", type=Path, default=paths.CONFIG_SLICE_DIR)
    slices.add_argument("--mk", type=Path, help="also write this Make include, giving EXP_NAME")
    slices.add_argument("--experiments-root", type=Path, help="write experiment sections to <root>/<name>/.config/")
    slices.add_argument("--override", metavar="FILE")
    slices.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show = sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("--override", metavar="FILE")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides, args.override)
    except PipelineError as exc:
        print(f"config error: {exc.line()}", file=sys.stderr)
        return 2
    if args.command == "show":
        print(dump_yaml(OmegaConf.to_container(cfg, resolve=True)))
    else:
        write_slices(cfg, args.out, args.experiments_root)
        if args.mk:
            write_text_if_changed(args.mk, f"EXP_NAME := {cfg.experiments.name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
