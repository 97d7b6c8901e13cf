"""Config: precedence, unknown keys with the closest valid key, type errors, bad files, and the
values config/schemas/config.schema.json allows (choices, ranges, null), checked when the config loads."""

from __future__ import annotations

import re

from pipeline.config import (
    choices,
    default_comments,
    describe,
    load_config,
    load_workspace,
    schema_knobs,
    valid_keys,
    write_slices,
)
from pipeline.errors import ConfigError

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator
from omegaconf.errors import ReadonlyConfigError

import quantize
from helpers import REPO, write_override

SCHEMA = orjson.loads((REPO / "config" / "schemas" / "config.schema.json").read_bytes())
DEFAULTS = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
SHIPPED_YAML = sorted(REPO.glob("config/**/*.yaml"))
ENUM_KEYS = {key: node for key, node in schema_knobs(SCHEMA).items() if choices(node)}
EXPECTED_ENUM_KEYS = {
    "model.dtype",
    "train.dtype",
    "fuse.dtype",
    "quantize.gguf_float",
    "data.format",
    "prepare.on_error",
    "prepare.too_long",
    "prepare.secrets",
    "prepare.template",
    "train.fine_tune_type",
    "train.optimizer",
    "train.lr_schedule",
    "distributed.backend",
    "train.resume",
    "quantize.on_mismatch",
    "quantize.adapter_exports",
    "quantize.mlx",
    "quantize.group_size",
    "eval.artifacts",
    "eval.proven",
    "eval.ship.kinds",
    "eval.ship.reference",
    "eval.task_metric",
}


def test_defaults_load_read_only(project):
    cfg = load_config()
    assert cfg.experiment.name == "main"
    with pytest.raises(ReadonlyConfigError):
        cfg.model.dtype = "float16"


def test_precedence_default_then_override_file_then_command_line(project):
    write_override(project, "model:\n  dtype: float16\n  cache_dir: elsewhere\n")
    cfg = load_config(["model.dtype=bfloat16"])
    assert cfg.model.dtype == "bfloat16"  # command line beats the file
    assert cfg.model.cache_dir == "elsewhere"  # the file beats the default
    assert cfg.model.source.startswith("builtin:")  # untouched default


def test_explicit_override_file_replaces_config_override_yaml(project, tmp_path):
    write_override(project, "experiment:\n  name: from-user-file\n")
    other = tmp_path / "exp.yaml"
    other.write_text("experiment:\n  name: from-explicit-file\n")
    assert load_config(override_file=other).experiment.name == "from-explicit-file"


def test_misspelt_key_in_override_names_file_and_closest_key(project):
    write_override(project, "model:\n  dtpye: float16\n")
    with pytest.raises(ConfigError) as err:
        load_config()
    line = err.value.line()
    assert "unknown key 'model.dtpye'" in line
    assert "config/override.yaml" in line
    assert "did you mean 'model.dtype'?" in line


def test_key_in_the_wrong_section_is_found(project):
    with pytest.raises(ConfigError, match="did you mean 'doctor.matmul_size'"):
        load_config(["model.matmul_size=512"])


def test_unknown_section_on_command_line(project):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'modle'.*did you mean 'model'"):
        load_config(["modle.dtype=float16"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("doctor.matmul_size=big", "'doctor.matmul_size' must be an integer, got a string 'big'"),
        ("doctor.matmul_size=1.5", "must be an integer, got a number 1.5"),
        ("prepare.dedupe=3", "'prepare.dedupe' must be a boolean"),
        ("model=cpu", "'model' is a section"),
    ],
)
def test_wrong_types_are_errors(project, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_int_given_for_float_and_number_for_string_are_accepted(project):
    cfg = load_config(["doctor.min_gflops=50", "experiment.name=2024"])
    assert cfg.doctor.min_gflops == 50.0 and isinstance(cfg.doctor.min_gflops, float)
    assert cfg.experiment.name == "2024"


def test_missing_override_file_is_an_error(project):
    with pytest.raises(ConfigError, match="override file nope.yaml does not exist"):
        load_config(override_file="nope.yaml")


def test_invalid_yaml_names_the_line(project):
    write_override(project, "model:\n  dtype: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config/override.yaml:\d+:\d+: invalid YAML"):
        load_config()


def test_not_key_value(project):
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(["model.dtype"])


def test_empty_override_file_is_fine(project):
    write_override(project, "# nothing yet\n")
    assert load_config().model.dtype == "auto"


def test_slices_are_rewritten_only_when_their_content_changes(project, tmp_path):
    out = tmp_path / "slices"
    assert set(write_slices(load_config(), out)) == set(load_config())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_slices(load_config(), out) == []
    assert write_slices(load_config(["doctor.matmul_size=256"]), out) == ["doctor"]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["model.json"] == before["model.json"]
    assert after["doctor.json"] != before["doctor.json"]


def test_experiment_sections_are_kept_per_experiment(project, tmp_path):
    out, runs = tmp_path / "slices", tmp_path / "runs"
    write_slices(load_config(["experiment.name=a", "train.learning_rate=1e-3"]), out, runs)
    write_slices(load_config(["experiment.name=b"]), out, runs)
    assert (runs / "a" / ".config" / "train.json").read_text() != (runs / "b" / ".config" / "train.json").read_text()
    assert not (out / "train.json").exists() and (out / "data.json").exists()
    before = (runs / "a" / ".config" / "train.json").stat().st_mtime_ns
    write_slices(load_config(["experiment.name=a", "train.learning_rate=1e-3"]), out, runs)
    assert (runs / "a" / ".config" / "train.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("name", ["../escape", "a b", "", "-x"])
def test_experiment_name_must_be_a_plain_folder_name(project, name):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        load_config([f"experiment.name={name}"])


def test_every_default_knob_has_a_comment():
    lines = (REPO / "config" / "default.yaml").read_text().splitlines()
    knobs = [
        line
        for line in lines
        if line.startswith("  ")
        and ":" in line
        and not line.strip().startswith("#")
        and not line.rstrip().endswith(":")
    ]
    undocumented = [line for line in knobs if "#" not in line]
    assert knobs and not undocumented, undocumented


# --- values the schema allows ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda path: path.name)
def test_every_shipped_yaml_loads_and_validates(project, path):
    if path.name == "default.yaml":
        assert load_config().experiment.name == "main"
    else:  # every experiment it describes (a sweep has several)
        workspace = load_workspace(override_file=path)
        for name in workspace.names():
            workspace.config(name)


def test_the_commented_example_overrides_are_valid(project, tmp_path):
    header, _, body = (REPO / "config" / "override.example.yaml").read_text().partition("\n\n")
    uncommented = [m[1] for m in re.finditer(r"^# ( *(?:- +)?[A-Za-z_][\w.-]*:.*)$", body, flags=re.M)]
    assert uncommented, "override.example.yaml has no commented keys to try"
    example = tmp_path / "example.yaml"
    example.write_text("\n".join(uncommented) + "\n")
    workspace = load_workspace(override_file=example)
    assert len(workspace.names()) == 8  # the example experiments, crossed with its sweep
    for name in workspace.names():
        workspace.config(name)


def test_the_enumerated_keys_are_the_expected_ones():
    assert set(ENUM_KEYS) == EXPECTED_ENUM_KEYS


def _misspelt(choice):
    return choice + 1 if isinstance(choice, int) else choice + choice[-1]


@pytest.mark.parametrize("key", sorted(ENUM_KEYS))
def test_a_typo_in_a_choice_is_refused_with_the_closest_choice(project, key):
    node, default = ENUM_KEYS[key], _default(key)
    is_list = node.get("type") == "array"
    good = default[0] if is_list and default else default if default in choices(node) else choices(node)[0]
    bad = _misspelt(good)
    with pytest.raises(ConfigError) as err:
        load_config([f"{key}=[{bad}]" if is_list else f"{key}={bad}"])
    line = err.value.line()
    assert line.startswith("command line: ") and f"'{key}{'[0]' if is_list else ''}' must be" in line
    assert f"got {bad!r} -- fix: did you mean {good!r}?" in line


def test_a_choice_far_from_all_lists_them(project):
    with pytest.raises(ConfigError) as err:
        load_config(["prepare.secrets=zzz"])
    assert err.value.line().endswith("-- fix: use one of: warn, redact, fail")


@pytest.mark.parametrize(
    "override, message, fix",
    [
        ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0", "the closest valid value is 1"),
        ("data.max_seq_length=1", "'data.max_seq_length' must be >= 2, got 1", "the closest valid value is 2"),
        ("train.learning_rate=0", "'train.learning_rate' must be > 0, got 0.0", "use a value > 0, e.g. 0.0002"),
        ("eval.top_p=1.5", "'eval.top_p' must be in (0, 1], got 1.5", "the closest valid value is 1"),
        ("train.lora.dropout=1", "'train.lora.dropout' must be in [0, 1), got 1.0", "use a value in [0, 1), e.g. 0.0"),
        ("train.val_batches=0", "'train.val_batches' must be -1 or >= 1, got 0", "the closest valid value is 1"),
        ("eval.records=-7", "'eval.records' must be -1 or >= 1, got -7", "the closest valid value is -1"),
        ("eval.workers=0", "'eval.workers' must be auto or an integer >= 1, got 0", "the closest valid value is 1"),
        (
            "eval.answer_records=-5",
            "'eval.answer_records' must be auto or -1 or >= 1, got -5",
            "the closest valid value is -1",
        ),
        ("train.epochs=-1", "'train.epochs' must be > 0, got -1", "use a value > 0, e.g. 3"),
        ("data.splits.test=2", "'data.splits.test' must be in [0, 1], got 2.0", "the closest valid value is 1"),
    ],
)
def test_a_value_out_of_range_is_refused_with_the_closest_valid_one(project, override, message, fix):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert err.value.line() == f"command line: {message} -- fix: {fix}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("quantize.gguf_types=[Q4_K_M, q8_0]", "'quantize.gguf_types[1]' must be a llama.cpp type name in capitals"),
        ("eval.plugins=[my_metrics]", "'eval.plugins[0]' must be a plugin name module:function, got 'my_metrics'"),
        ("package.docker.reference=''", "'package.docker.reference' must not be empty"),
        ("prepare.template=my.tmpl", "'prepare.template' must be one of auto, chatml, alpaca, llama-3 or a path"),
    ],
)
def test_free_strings_must_have_their_form(project, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([override])


def test_forms_the_stages_accept_load(project):
    cfg = load_config(
        [
            "prepare.template=my/template.j2",
            "eval.task_metric=my_metrics:mentions_city",
            "eval.plugins=[my_metrics:mentions_city]",
            "quantize.mlx=[affine, mxfp4, mixed_3_6]",
        ]
    )
    assert list(cfg.quantize.mlx) == ["affine", "mxfp4", "mixed_3_6"]


def test_mlx_items_accept_exactly_what_the_quantize_stage_parses():
    items = Draft202012Validator(SCHEMA["properties"]["quantize"]["properties"]["mlx"]["items"])
    modes = [*quantize.MLX_MODES, "affin", "mxfp6", "Affine"]
    samples = [f"{mode}{suffix}" for mode in modes for suffix in ("", "-", "-4", "-8", "-04", "-3", "-16", "-x", "-4-")]
    samples += [*quantize.MLX_RECIPES, "mixed_5_6", "mixed_4_6-4", ""]
    disagreements = [spec for spec in samples if items.is_valid(spec) != _parses(spec)]
    assert not disagreements


def _parses(spec: str) -> bool:
    try:
        quantize.parse_mlx_spec(spec, 64)
    except Exception:
        return False
    return True


def test_builtin_template_names_are_the_template_files():
    names = set(choices(SCHEMA["properties"]["prepare"]["properties"]["template"])) - {"auto"}
    assert names == {path.stem for path in (REPO / "config" / "templates").glob("*.jinja")}


def test_epochs_is_null_or_a_positive_number(project):
    assert load_config().train.epochs is None
    assert load_config(["train.epochs=1.5"]).train.epochs == 1.5
    with pytest.raises(ConfigError) as err:
        load_config(["train.epochs=abc"])
    assert err.value.line() == (
        "command line: 'train.epochs' must be null or a number, got a string 'abc'"
        " -- fix: give null or a number, e.g. 3"
    )


def test_revision_is_null_or_a_string(project):
    assert load_config(["model.revision=v1.0"]).model.revision == "v1.0"
    with pytest.raises(ConfigError, match=r"'model.revision' must be null or a string, got a list \['a'\]"):
        load_config(["model.revision=[a]"])


def test_splits_must_sum_to_one(project):
    assert load_config(["data.splits.train=0.7", "data.splits.valid=0.2"]).data.splits.test == 0.1  # 0.9999999999999999
    with pytest.raises(ConfigError) as err:
        load_config(["data.splits.train=0.9"])
    assert err.value.line() == (
        "command line: 'data.splits' train + valid + test must sum to 1, got 1.1 (0.9 + 0.1 + 0.1)"
        " -- fix: set data.splits.test=0 (1 - train - valid)"
    )


def test_a_wrong_value_names_the_layer_that_gave_it(project):
    write_override(project, "quantize:\n  on_mismatch: fial\n")
    with pytest.raises(ConfigError, match=r"^config/override.yaml: 'quantize.on_mismatch' must be one of fail, warn"):
        load_config()
    assert load_config(["quantize.on_mismatch=warn"]).quantize.on_mismatch == "warn"  # the command line wins
    default = project / "config" / "default.yaml"
    default.write_text(default.read_text().replace("lr_schedule: cosine", "lr_schedule: cosin"))
    with pytest.raises(ConfigError, match=r"^config/default.yaml: 'train.lr_schedule' .* did you mean 'cosine'\?$"):
        load_config(["quantize.on_mismatch=warn"])


def test_every_wrong_value_is_reported_in_one_line(project):
    write_override(project, "train:\n  optimizer: adamx\n")
    with pytest.raises(ConfigError) as err:
        load_config(["train.batch_size=0", "eval.artifacts=[base, guff]"])
    line = err.value.line()
    assert "\n" not in line and line.startswith("config: 3 invalid values: ")
    assert "config/override.yaml: 'train.optimizer' must be one of" in line and "(did you mean 'adam'?)" in line
    assert "command line: 'train.batch_size' must be >= 1, got 0 (the closest valid value is 1)" in line
    assert "command line: 'eval.artifacts[1]' must be one of" in line and "(did you mean 'gguf'?)" in line


def test_the_schema_declares_exactly_the_keys_of_default_yaml():
    declared = set(_schema_keys(SCHEMA))
    defaults = set(valid_keys(DEFAULTS))
    assert not declared - defaults, f"in the schema but not in default.yaml: {sorted(declared - defaults)}"
    assert not defaults - declared, f"in default.yaml but not in the schema: {sorted(defaults - declared)}"


def test_every_schema_section_requires_all_its_keys_and_allows_no_others():
    for key, node in _schema_sections(SCHEMA):
        assert set(node.get("required", [])) == set(node["properties"]), key
        assert node.get("additionalProperties") is False, key
    field_map = SCHEMA["properties"]["data"]["properties"]["field_map"]
    assert field_map["additionalProperties"] == {"type": "string", "examples": ["question"]}


def test_every_choice_is_named_in_the_comment_of_its_key():
    comments = default_comments(REPO / "config" / "default.yaml")
    missing = [
        f"{key}: {choice}"
        for key, node in ENUM_KEYS.items()
        for choice in choices(node)
        if not re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", comments[key][1])
    ]
    assert not missing, f"choices missing from the comments in config/default.yaml: {missing}"


def test_describe_lists_every_key_with_default_allowed_values_and_comment(project):
    table = describe()
    listed = {line.split()[0] for line in table.splitlines()[1:] if line and not line.startswith(" ")}
    assert listed == set(valid_keys(DEFAULTS))
    row = next(line for line in table.splitlines() if line.startswith("quantize.on_mismatch "))
    assert row.split()[1] == "fail" and "one of fail, warn" in row and "the check finds a difference" in row
    assert "train.learning_rate" not in describe("eval") and "eval.ship.kinds" in describe("eval")
    with pytest.raises(ConfigError, match="unknown section 'evl' -- fix: did you mean 'eval'"):
        describe("evl")


def _default(key: str):
    node = DEFAULTS
    for part in key.split("."):
        node = node[part]
    return node


def _schema_sections(node: dict, prefix: str = ""):
    """(dotted key, node) of every object in the schema that declares properties."""
    if "properties" in node:
        yield prefix or "<root>", node
        for key, child in node["properties"].items():
            yield from _schema_sections(child, f"{prefix}{key}.".lstrip("."))


def _schema_keys(node: dict, prefix: str = ""):
    for key, child in node.get("properties", {}).items():
        yield prefix + key
        yield from _schema_keys(child, f"{prefix}{key}.")
