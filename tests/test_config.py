"""Config: precedence, unknown keys with the closest valid key, type errors, bad files."""

from __future__ import annotations

import pytest

from helpers import write_override
from pipeline.config import load_config, write_slices
from pipeline.errors import ConfigError


def test_defaults_load_read_only(project):
    cfg = load_config()
    assert cfg.experiments.name == "main"
    with pytest.raises(Exception):
        cfg.model.dtype = "float16"


def test_precedence_default_then_override_file_then_command_line(project):
    write_override(project, "model:\n  dtype: float16\n  cache_dir: elsewhere\n")
    cfg = load_config(["model.dtype=bfloat16"])
    assert cfg.model.dtype == "bfloat16"  # command line beats the file
    assert cfg.model.cache_dir == "elsewhere"  # the file beats the default
    assert cfg.model.source.startswith("builtin:")  # untouched default


def test_explicit_override_file_replaces_config_override_yaml(project, tmp_path):
    write_override(project, "experiments:\n  name: from-user-file\n")
    other = tmp_path / "exp.yaml"
    other.write_text("experiments:\n  name: from-explicit-file\n")
    assert load_config(override_file=other).experiments.name == "from-explicit-file"


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
        ("model.trust_remote_code=3", "must be a boolean"),
        ("model=cpu", "'model' is a section"),
    ],
)
def test_wrong_types_are_errors(project, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_int_given_for_float_and_number_for_string_are_accepted(project):
    cfg = load_config(["doctor.min_gflops=50", "experiments.name=2024"])
    assert cfg.doctor.min_gflops == 50.0 and isinstance(cfg.doctor.min_gflops, float)
    assert cfg.experiments.name == "2024"


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
    write_slices(load_config(["experiments.name=a", "train.learning_rate=1e-3"]), out, runs)
    write_slices(load_config(["experiments.name=b"]), out, runs)
    assert (runs / "a" / ".config" / "train.json").read_text() != (runs / "b" / ".config" / "train.json").read_text()
    assert not (out / "train.json").exists() and (out / "data.json").exists()
    before = (runs / "a" / ".config" / "train.json").stat().st_mtime_ns
    write_slices(load_config(["experiments.name=a", "train.learning_rate=1e-3"]), out, runs)
    assert (runs / "a" / ".config" / "train.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("name", ["../escape", "a b", "", "-x"])
def test_experiment_name_must_be_a_plain_folder_name(project, name):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        load_config([f"experiments.name={name}"])


def test_every_default_knob_has_a_comment():
    from helpers import REPO

    lines = (REPO / "config" / "default.yaml").read_text().splitlines()
    knobs = [l for l in lines if l.startswith("  ") and ":" in l and not l.strip().startswith("#") and not l.rstrip().endswith(":")]
    undocumented = [l for l in knobs if "#" not in l]
    assert knobs and not undocumented, undocumented
