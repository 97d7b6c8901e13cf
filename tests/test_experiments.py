"""The experiments a config describes: listed ones, a grid and its paired values, seeds; their names,
and one clear error for each kind of bad experiment or grid, before any work."""

from __future__ import annotations

import re

from pipeline import paths
from pipeline.config import load_config, load_workspace
from pipeline.errors import ConfigError

import pytest

from helpers import write_override


def names(text: str) -> list[str]:
    return load_workspace(override_file=_file(text)).names()


def _file(text: str):
    path = paths.ROOT / "config" / "sweep-test.yaml"
    path.write_text(text)
    return path


def test_no_experiments_is_one_named_main(project):
    workspace = load_workspace()
    assert workspace.names() == ["main"] and workspace.selected() == "main"
    assert load_config(["experiment.name=other"]).experiment.name == "other"  # a new name, as before


def test_a_grid_is_the_product_of_its_lists_named_by_what_varies(project):
    grid = "sweep:\n  train.lora.rank: [4, 16]\n  train.learning_rate: [1.0e-4, 2.0e-4]\n"
    assert names(grid) == ["r4-lr1e-4", "r4-lr2e-4", "r16-lr1e-4", "r16-lr2e-4"]
    assert names(grid) == names(grid)  # the same grid, the same names
    workspace = load_workspace(override_file=_file(grid))
    cfg = workspace.config("r16-lr1e-4")
    assert cfg.train.lora.rank == 16 and cfg.train.learning_rate == 1e-4 and cfg.experiment.name == "r16-lr1e-4"
    assert workspace.experiment("r16-lr1e-4").varied == {"train.lora.rank": 16, "train.learning_rate": 1e-4}


def test_nested_grid_keys_paired_values_and_seeds(project):
    text = (
        "sweep:\n  train:\n    lora:\n      rank: [4, 16]\n"
        "  _:\n    - {train.lora.scale: 8.0, train.iters: 10}\n    - {train.lora.scale: 32.0, train.iters: 20}\n"
        "  seeds: [0, 1]\n"
    )
    got = names(text)
    assert len(got) == 8 and got[0] == "r4-scale8-it10-s0" and got[-1] == "r16-scale32-it20-s1"
    cfg = load_workspace(override_file=_file(text)).config("r16-scale32-it20-s1")
    assert (cfg.train.lora.rank, cfg.train.lora.scale, cfg.train.iters, cfg.train.seed) == (16, 32.0, 20, 1)


def test_listed_experiments_cross_the_grid_and_change_any_section(project):
    text = (
        "experiments:\n  - name: small\n    train: {lora: {rank: 4}}\n"
        "  - name: big\n    train: {lora: {rank: 32}}\n    eval: {max_tokens: 16}\n"
        "sweep:\n  seeds: [3]\n"
    )
    workspace = load_workspace(override_file=_file(text))
    assert workspace.names() == ["small-s3", "big-s3"]
    big = workspace.config("big-s3")
    assert (big.train.lora.rank, big.eval.max_tokens, big.train.seed) == (32, 16, 3)
    assert workspace.config("small-s3").eval.max_tokens != 16


def test_seeds_alone_are_named_by_the_seed(project):
    assert names("sweep:\n  seeds: [0, 1]\n") == ["s0", "s1"]
    assert load_workspace(["experiment.name=s1"], override_file=_file("sweep:\n  seeds: [0, 1]\n")).selected() == "s1"


def test_short_names_that_collide_fall_back_to_full_keys_and_values(project):
    assert names("sweep:\n  data.source: [a/qa.jsonl, b/qa.jsonl]\n") == [
        "data_source-a-qa.jsonl",
        "data_source-b-qa.jsonl",
    ]


def test_the_one_experiment_needs_no_name_but_several_do(project):
    write_override(project, "experiments:\n  - name: only\n")
    assert load_config().experiment.name == "only"
    write_override(project, "experiments:\n  - name: a\n  - name: b\n")
    with pytest.raises(ConfigError, match="2 experiments are configured and none is named"):
        load_config()
    with pytest.raises(ConfigError, match="no experiment named 'c'"):
        load_config(["experiment.name=c"])
    assert load_config(["experiment.name=b"]).experiment.name == "b"


BAD = {
    "unknown key names the experiment and the closest key": (
        "experiments:\n  - name: r16\n    train: {lora: {rnak: 16}}\n",
        r"^experiments\[0\] \(r16\): unknown key 'train\.lora\.rnak' -- fix: did you mean 'train\.lora\.rank'",
    ),
    "unknown grid key": (
        "sweep:\n  train.lerning_rate: [1.0e-4]\n",
        r"unknown key 'train\.lerning_rate'.*learning_rate",
    ),
    "wrong type in a grid": ("sweep:\n  train.lora.rank: [four]\n", r"'train\.lora\.rank' must be an integer"),
    "out of range in an experiment": (
        "experiments:\n  - name: a\n    train: {batch_size: 0}\n",
        r"^experiments\[0\] \(a\): 'train\.batch_size' must be >= 1",
    ),
    "duplicate names": ("experiments:\n  - name: a\n  - name: a\n", r"'a' is listed twice"),
    "empty grid": ("sweep:\n  train.lora.rank: []\n", r"grid 'sweep\.train\.lora\.rank' is empty"),
    "grid value not a list": ("sweep:\n  train.lora.rank: 4\n", r"grid value 'sweep\.train\.lora\.rank' is not a list"),
    "name not a folder name": ("experiments:\n  - name: ../up\n", r"'\.\./up' is not a plain folder name"),
    "no name": ("experiments:\n  - train: {iters: 3}\n", r"experiment 1 has no name"),
    "experiments not a list": ("experiments:\n  name: old-style\n", r"'experiments' must be a list"),
    "an experiment sets the sweep": ("experiments:\n  - name: a\n    sweep: {}\n", r"cannot set 'sweep'"),
    "bad seeds": ("sweep:\n  seeds: [0, 0]\n", r"repeats a seed"),
    "same name twice from a grid": (
        "sweep:\n  data.source: [a/qa.jsonl, 'a:qa.jsonl']\n",
        r"two experiments would both be named 'data_source-a-qa\.jsonl'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_experiments_are_one_clear_error(project, case):
    text, pattern = BAD[case]
    with pytest.raises(ConfigError) as err:
        workspace = load_workspace(override_file=_file(text))
        for name in workspace.names():
            workspace.config(name)
    line = err.value.line()
    assert "\n" not in line and re.search(pattern, line), line


@pytest.mark.parametrize(
    "sweep, names",
    [
        (
            "seeds.yaml",
            ["r8-lr5e-4-s1", "r8-lr5e-4-s2", "r8-lr2e-4-s1", "r8-lr2e-4-s2", "r16-lr2e-4-s1", "r16-lr2e-4-s2"],
        ),
        ("steps96.yaml", ["s0", "s1", "s2"]),
        ("steps144.yaml", ["s0", "s1", "s2"]),
    ],
)
def test_the_sweeps_that_chose_the_defaults_are_valid(project, sweep, names):
    workspace = load_workspace(override_file=paths.ROOT / "config" / "sweeps" / sweep)
    assert workspace.names() == names
    for name in names:
        config = workspace.config(name)
        assert config.eval.artifacts == ["base", "fused"] and config.train.steps_per_eval == 24
        assert config.train.seed == int(name[-1])


def test_the_shipped_example_sweep_is_valid(project):
    workspace = load_workspace(override_file=paths.ROOT / "config" / "sweeps" / "rank-lr.yaml")
    assert workspace.names() == ["r4-lr1e-4", "r4-lr2e-4", "r16-lr1e-4", "r16-lr2e-4"]
    for name in workspace.names():
        assert workspace.config(name).eval.artifacts == ["base", "fused"]
