"""The stage registry: each stage's name, the config sections it reads, whether it runs per
experiment, the stages whose outputs it reads, what it writes and its manifest.

The Makefile's prerequisites, the config slicer (which sections are kept per experiment) and the
upstream checks of every stage read this table rather than keeping lists of their own. A stage's code
is its script (`scripts/<name>.py`) or folder (`scripts/<name>/`) and every project module those
import, found by reading their imports, so editing a file re-runs exactly the stages that use it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

from pipeline import contracts, hashing, paths
from pipeline.errors import PipelineError
from pipeline.manifest import changed_output, digests


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    product: str  # what it makes, in words, for messages ("trained adapter")
    sections: tuple[str, ...]  # the config sections it reads (its slices)
    per_experiment: bool  # outputs under runs/<experiment>/ (or eval_out/<experiment>/)
    upstream: tuple[str, ...]  # stages whose outputs it reads
    manifest: str | None  # written last; {experiment} is filled in
    outputs: tuple[str, ...]  # what it writes besides the manifest
    inputs: tuple[str, ...] = ()  # files it reads besides code, config and upstream outputs (globs)

    def manifest_path(self, experiment: str | None = None) -> Path:
        return paths.ROOT / self.manifest_for(experiment, paths.MODEL_VARIANT, paths.DATA_VARIANT)

    def manifest_for(self, experiment: str | None, model: str | None = None, data: str | None = None) -> str:
        """The manifest of the experiment whose base model and prepared data are the `model` and `data`
        variants (paths.use_variant), relative to the project root."""
        return self.manifest.format(experiment=experiment, **paths.variant_fields(model, data))

    def logged_sections(self) -> tuple[str, ...]:
        return ("experiment", *self.sections) if self.per_experiment else self.sections


_STAGES = (
    Stage("doctor", "machine check", ("doctor",), False, (), None, ()),
    Stage(
        "model",
        "converted base model",
        ("model",),
        False,
        (),
        "runs/model{model}.manifest.json",
        ("<model.cache_dir>/<converted model>/",),
    ),
    Stage(
        "prepare",
        "prepared data",
        ("data", "prepare"),
        False,
        ("model",),
        "data/{data}prepare.manifest.json",
        (
            "data/{data}train.jsonl",
            "data/{data}valid.jsonl",
            "data/{data}test.jsonl",
            "data/{data}data_contract.json",
            "data/{data}data_catalog.json",
            "data/{data}data_report.json",
            "data/{data}data_report.md",
            "data/{data}tool_schemas.json",
        ),
        inputs=("config/templates/*.jinja",),
    ),
    Stage(
        "search",
        "hyperparameter search",
        ("sweep",),
        False,
        ("model", "prepare"),
        "runs/search.manifest.json",
        ("runs/search.json",),
        inputs=(".state/config/search.json",),
    ),
    Stage(
        "train",
        "trained adapter",
        ("train", "distributed"),  # the number of ranks changes the float sums, so the adapter's bytes
        True,
        ("model", "prepare"),
        "runs/{experiment}/train.manifest.json",
        (
            "runs/{experiment}/adapter/",
            "runs/{experiment}/checkpoints/",
            "runs/{experiment}/metrics.jsonl",
            "runs/{experiment}/loss.png",
        ),
    ),
    Stage(
        "fuse",
        "fused model",
        ("fuse",),
        True,
        ("model", "prepare", "train"),
        "runs/{experiment}/fuse.manifest.json",
        ("runs/{experiment}/fused/", "runs/{experiment}/artifacts.json"),
    ),
    Stage(
        "quantize",
        "deployable files",
        ("quantize",),
        True,
        ("prepare", "fuse"),
        "runs/{experiment}/quantize.manifest.json",
        ("runs/{experiment}/quantized/", "runs/{experiment}/artifacts.json"),
    ),
    Stage(
        "eval",
        "eval report",
        ("eval",),
        True,
        ("model", "prepare", "train", "quantize"),
        "eval_out/{experiment}/eval.manifest.json",
        ("eval_out/{experiment}/", "runs/{experiment}/run_manifest.yaml"),
    ),
    Stage(
        "package",
        "Ollama and Docker package",
        ("package",),
        True,
        ("prepare", "fuse", "quantize", "eval"),
        "runs/{experiment}/package.manifest.json",
        ("runs/{experiment}/package/",),
    ),
    Stage(
        "freeze",
        "frozen bundle",
        ("freeze",),
        True,
        ("eval", "package"),
        "dist/{experiment}.freeze.manifest.json",
        ("dist/{experiment}-*.tar.gz",),
    ),
    Stage(
        "summary",
        "experiment summary",
        ("experiments", "sweep"),
        False,
        ("train", "eval", "package"),  # of every experiment it compares
        "eval_out/summary.manifest.json",
        ("runs/experiments.csv", "eval_out/summary.md", "eval_out/summary.html", "eval_out/summary/"),
    ),
)
_TOOLS = (  # read what the stages made, write nothing
    Stage("chat", "chat session", ("chat",), True, ("eval",), None, ()),
    Stage("serve", "model server", ("serve",), True, ("eval",), None, ()),
)
STAGES = {stage.name: stage for stage in _STAGES + _TOOLS}
PIPELINE = (
    "model",
    "prepare",
    "search",
    "train",
    "fuse",
    "quantize",
    "eval",
    "package",
    "summary",
)  # the order `make all` runs them in


def get(name: str) -> Stage:
    return STAGES[name]


def experiment_sections() -> set[str]:
    """Config sections that belong to one experiment: each experiment keeps its own slice of them."""
    return {section for stage in _STAGES if stage.per_experiment for section in stage.sections}


def shared_sections() -> set[str]:
    """Config sections of the stages every experiment shares (the base model, the prepared data)."""
    return {section for stage in _STAGES if stage.manifest and not stage.per_experiment for section in stage.sections}


def make_command(name: str, experiment: str | None) -> str:
    exp = f" EXP={experiment}" if STAGES[name].per_experiment and experiment else ""
    return f"make {name}{exp}"


def read_manifest(name: str, experiment: str | None = None) -> dict:
    """An upstream stage's manifest, validated, with every output it lists still on disk; otherwise one
    line saying which `make` to run."""
    stage = STAGES[name]
    path = stage.manifest_path(experiment)
    rerun = make_command(name, experiment)
    if not path.is_file():
        owner = f"experiment '{experiment}' has" if stage.per_experiment else "there is"
        raise PipelineError(f"{owner} no {stage.product} yet", where=paths.display(path), fix=f"run `{rerun}` first")
    manifest = contracts.read_json(path, "run_manifest")
    for entry in checked_outputs(name, manifest, experiment):
        problem = changed_output(entry)
        if problem == "missing":
            raise PipelineError(
                f"the {entry['role']} that `{rerun}` made is missing", where=entry["path"], fix=f"run `{rerun}` again"
            )
        if problem:
            raise PipelineError(
                f"the {entry['role']} has changed since `{rerun}` made it (its sha256 differs from "
                f"{paths.display(path)})",
                where=entry["path"],
                fix=f"run `{rerun}` again to remake it (or restore the file)",
            )
    return manifest


def checked_outputs(name: str, manifest: dict, experiment: str | None) -> list[dict]:
    """The outputs a manifest vouches for: all but those a later stage rewrites (quantize adds its files to
    the artifacts.json fuse wrote), which that stage's manifest vouches for."""
    later = PIPELINE[PIPELINE.index(name) + 1 :] if name in PIPELINE else ()
    fields = paths.variant_fields(paths.MODEL_VARIANT, paths.DATA_VARIANT)
    rewritten = {out.format(experiment=experiment, **fields) for stage in later for out in STAGES[stage].outputs}
    return [entry for entry in manifest["outputs"] if entry["path"] not in rewritten]


def stale_outputs(name: str, experiment: str | None) -> list[str]:
    """What is wrong with the outputs a finished stage recorded (missing or changed), for Make: a stage
    whose outputs are not what its manifest says is out of date. Empty when it never ran."""
    path = STAGES[name].manifest_path(experiment)
    if not path.is_file():
        return []
    try:
        manifest = contracts.read_json(path, "run_manifest")
    except PipelineError as exc:
        return [exc.what]
    found = []
    for entry in checked_outputs(name, manifest, experiment):
        problem = changed_output(entry)
        if problem:
            found.append(f"{entry['path']} is {problem}")
    return found


# --- code dependencies ---------------------------------------------------------------------------


def code_files(name: str) -> list[Path]:
    """The stage's own files and every project module they import, directly or not, sorted."""
    script = paths.SCRIPTS_DIR / f"{name}.py"
    start = [script] if script.is_file() else sorted((paths.SCRIPTS_DIR / name).glob("*.py"))
    seen: set[Path] = set()
    pending = list(start)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending.extend(_local_imports(path))
    return sorted(seen)


@functools.cache
def _local_imports(path: Path) -> tuple[Path, ...]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += _module_files(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += _module_files(node.module)
            for alias in node.names:  # `from pkg import module` imports a module too
                found += _module_files(f"{node.module}.{alias.name}", only_modules=True)
    return tuple(found)


def _module_files(module: str, only_modules: bool = False) -> list[Path]:
    """The project files that importing `module` runs: each package's __init__.py on the way, then the module."""
    parts = module.split(".")
    files = []
    for depth in range(1, len(parts) + 1):
        base = paths.SCRIPTS_DIR.joinpath(*parts[:depth])
        last = depth == len(parts)
        if base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
        elif (base / "__init__.py").is_file():
            if not (last and only_modules):
                files.append(base / "__init__.py")
        else:
            return [] if (depth == 1 or only_modules) else files
    return files


# --- data sources ----------------------------------------------------------------------------------

_NOT_FILES = ("builtin:", "hub:")  # how prepare records a source that is no file: nothing on disk to check
_MAX_NAMED = 5  # files named per changed folder; the rest are counted


def stale_sources(configured: Sequence[str] | None = None) -> list[str]:
    """What changed in the data prepare read, since it read it: each file or folder source its manifest
    records (inputs with role "source") whose sha256 differs now ("data/qa.jsonl is changed"), or that is
    gone ("... is missing": prepare itself then says what to do). The Sha256Cache reads a file again only
    when its size or mtime changed, so this is a stat per file on every make. A folder names the files
    added, removed or edited when the data contract lists its files (sources[].files), else the folder.

    `configured` is data.source now: a recorded source no longer configured is not checked (the data slice
    changed with it and re-runs prepare anyway). Empty when prepare never ran or its manifest is broken
    (stale_outputs reports that)."""
    if not paths.PREPARE_MANIFEST.is_file():
        return []
    try:
        recorded = contracts.read_json(paths.PREPARE_MANIFEST, "run_manifest")["inputs"]
    except (PipelineError, OSError):
        return []
    wanted = None if configured is None else {paths.display(paths.resolve(source)) for source in configured}
    listed = functools.cache(_contract_files)
    found = []
    for entry in recorded:
        if entry["role"] != "source" or entry["path"].startswith(_NOT_FILES):
            continue
        if wanted is None or entry["path"] in wanted:
            found += _source_changes(entry, listed)
    digests().save()
    return found


def _source_changes(entry: dict, listed) -> list[str]:
    where = paths.resolve(entry["path"])
    if not where.exists():
        return [f"{entry['path']} is missing"]
    try:
        now = hashing.fingerprint(where, digests().sized, entry["path"])
    except OSError as exc:  # unreadable now: prepare reports it, naming the file
        return [f"{entry['path']} cannot be read ({exc.strerror})"]
    if now["sha256"] == entry["sha256"]:
        return []
    before = listed().get(entry["path"]) if where.is_dir() else None
    changes = hashing.changed_files(before, now["files"]) if before is not None else []
    if len(changes) > _MAX_NAMED:
        changes = changes[:_MAX_NAMED] + [f"{len(changes) - _MAX_NAMED} more files in {entry['path']}"]
    return changes or [f"{entry['path']} is changed"]


def _contract_files() -> dict[str, list[dict]]:
    """{source path: its files} as the data contract lists them; empty when it lists none or is unreadable."""
    try:
        contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    except (PipelineError, OSError):
        return {}
    return {source["path"]: source["files"] for source in contract["sources"] if "files" in source}


def stale_stages(experiment: str, sources: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Each finished stage that must run again, with why, one clause per reason: its recorded outputs are
    missing or changed, or (prepare) the data it read changed. `sources`: data.source now (stale_sources)."""
    found = {}
    for stage in _STAGES:
        if stage.manifest:
            reasons = []
            problems = stale_outputs(stage.name, experiment if stage.per_experiment else None)
            if problems:
                reasons.append("its recorded outputs are not on disk as it left them: " + "; ".join(problems))
            if stage.name == "prepare" and (changed := stale_sources(sources)):
                reasons.append("the data it read has changed since: " + "; ".join(changed))
            if reasons:
                found[stage.name] = reasons
    return found


def make_include(
    experiments: Sequence[str],
    selected: Sequence[str] | None = None,
    stale: dict[str, dict] | None = None,
    variants: dict[str, tuple[str | None, str | None]] | None = None,
    parents: dict[str, str | None] | None = None,
    owner: str | None = None,
    searched: bool = False,
) -> str:
    """Make variables for every experiment: <stage>_TARGETS, the manifests `make <stage>` builds (those
    of the `selected` experiments), and each target's prerequisites (code, config slices, extra inputs,
    upstream manifests): <stage>_DEPS_<experiment> for a per-experiment stage; for a shared one
    <stage>_DEPS (the workspace's own model or data) or <stage>_DEPS_<variant> (`variants`: experiment ->
    its (model, data) variant, paths.use_variant), with <stage>_OWNER[_<variant>], an experiment whose
    config it runs with. A stage in `stale[experiment]` (stale_stages) also depends on FORCE, so Make runs
    it again, and so every stage after it, whose prerequisites include its manifest. `parents`: experiment ->
    the experiment whose adapter it starts from (train.init_from), whose train manifest its train needs.
    `owner`: the experiment the shared stages run with when there is none yet (a search before its first
    trial). `searched`: the experiments are a search's trials, run by the search stage (one sub-make a
    trial, IN_SEARCH=1); outside it their stages come after the search (AFTER_<experiment>, order-only)
    and the summary after it too."""
    selected = list(experiments if selected is None else selected)
    owner = owner or (experiments[0] if experiments else None)
    stale, variants, parents = stale or {}, variants or {}, parents or {}
    lines = [
        "# Written by `python -m pipeline.config slices` from scripts/pipeline/stages.py; do not edit.",
        "EXPERIMENTS := " + " ".join(experiments),
        "SELECTED := " + " ".join(selected),
    ]
    shared = ("config/schemas/*.json",)  # every stage validates contract files against these
    for stage in _STAGES:
        code = [paths.display(p) for p in code_files(stage.name)]
        globs = [f"$(wildcard {pattern})" for pattern in (*shared, *stage.inputs)]
        targets = []
        for rule in _rules(stage, experiments, selected, variants, owner, searched):
            variant = variants.get(rule.owner, (None, None))
            slices = [_slice_file(section, rule.owner, variant) for section in stage.sections]
            upstream = [
                STAGES[u].manifest_for(e, *variants.get(e, (None, None))) for u in stage.upstream for e in rule.reads
            ]
            if stage.name == "train" and parents.get(rule.owner):
                upstream.append(stage.manifest_for(parents[rule.owner]))
            if stage.name == "summary" and searched:
                upstream.append(STAGES["search"].manifest_for(None))
            force = ["FORCE"] if stage.name in stale.get(rule.owner, {}) else []
            suffix = f"_{rule.key}" if rule.key else ""
            deps = [*code, *slices, *globs, *dict.fromkeys(upstream), *force]
            lines.append(f"{stage.name}_DEPS{suffix} := " + " ".join(deps))
            if not stage.per_experiment:
                lines.append(f"{stage.name}_OWNER{suffix} := {rule.owner}")
            if stage.manifest and rule.wanted:
                targets.append(stage.manifest_for(rule.owner, *variant))
        if stage.manifest:
            lines.append(f"{stage.name}_TARGETS := " + " ".join(targets))
    if searched:
        after = STAGES["search"].manifest_for(None)
        lines += [f"AFTER_{name} := $(if $(IN_SEARCH),,{after})" for name in experiments]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class _Rule:
    key: str | None  # the variable suffix: the experiment, the variant, or none (the workspace's own)
    owner: str  # the experiment whose config the stage runs with
    reads: tuple[str, ...]  # the experiments whose upstream manifests it reads
    wanted: bool  # `make <stage>` builds it (a selected experiment needs it)


def _rules(stage: Stage, experiments, selected, variants, owner, searched) -> list[_Rule]:
    """One rule per experiment of a per-experiment stage; one per variant of a shared stage, owned by the
    first experiment that uses it; one for the summary, after every selected experiment; one for the
    search when there is one (its trials share the workspace's model and data)."""
    if stage.per_experiment:  # a selected experiment's parent (train.init_from) is trained first, by Make
        return [_Rule(e, e, (e,), e in selected) for e in experiments]
    if stage.name == "search":
        return [_Rule(None, owner, (owner,), True)] if searched else []
    if any(STAGES[u].per_experiment for u in stage.upstream):
        return [_Rule(None, selected[0] if selected else owner, tuple(selected), True)]
    if not experiments:
        return [_Rule(None, owner, (owner,), True)]
    index = 0 if stage.name == "model" else 1  # which variant: the model's or the prepared data's
    groups: dict = {}
    for experiment in experiments:
        groups.setdefault(variants.get(experiment, (None, None))[index], []).append(experiment)
    return [_Rule(key, users[0], (users[0],), any(u in selected for u in users)) for key, users in groups.items()]


def _slice_file(section: str, experiment: str, variant: tuple[str | None, str | None] = (None, None)) -> str:
    if section in experiment_sections() or section == "experiment":
        return paths.display(paths.run_dir(experiment) / ".config" / f"{section}.json")
    return paths.display(shared_slice_dir(section, variant) / f"{section}.json")


def shared_slice_dir(section: str, variant: tuple[str | None, str | None]) -> Path:
    """Where a shared section's slice is: .state/config/, or .state/config/<variant>/ for the model
    section of a model variant and the data and prepare sections of a prepared-data variant."""
    key = variant[0] if section == "model" else variant[1] if section in ("data", "prepare") else None
    return paths.CONFIG_SLICE_DIR / key if key else paths.CONFIG_SLICE_DIR
