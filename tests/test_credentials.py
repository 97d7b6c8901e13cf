"""Secrets: from the environment or config/passwords.yml only; a secret in a config file is one line
pointing there; a planted token appears in no file the pipeline writes, the frozen bundle included."""

from __future__ import annotations

import logging
import os
import subprocess
import tarfile

from pipeline import credentials
from pipeline.config import load_workspace
from pipeline.errors import ConfigError
from pipeline.log import setup_logging

import pytest

from helpers import make, write_override
from test_make import BRIEF

FAKE_TOKEN = "hf_" + "PlantedFakeTokenForTheLeakTest0123456789"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model:\n  hf_token: abc123\n", "'model.hf_token' looks like a secret"),
        ("data:\n  source: " + FAKE_TOKEN + "\n", "the value of 'data.source' looks like a token or key"),
        ("experiments:\n  - name: a\n    train: {api_key: xyz}\n", "'train.api_key' looks like a secret"),
    ],
    ids=["secret_key", "token_value", "inside_an_experiment"],
)
def test_a_secret_in_a_config_file_is_one_line_pointing_to_passwords_yml(project, override, expected):
    write_override(project, override)
    with pytest.raises(ConfigError) as caught:
        load_workspace()
    line = caught.value.line()
    assert expected in line and "config/passwords.yml" in line and "\n" not in line
    result = make(project, "experiments", check=False)
    assert result.returncode == 2 and expected in result.stderr
    assert FAKE_TOKEN not in result.stderr


def test_the_token_comes_from_the_environment_then_passwords_yml(project, monkeypatch):
    credentials._file_values.cache_clear()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert credentials.hf_token() is None
    (project / "config" / "passwords.yml").write_text(f"hf_token: {FAKE_TOKEN}\n")
    credentials._file_values.cache_clear()
    assert credentials.hf_token() == FAKE_TOKEN
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment0000000000000000")
    assert credentials.hf_token() == "hf_fromTheEnvironment0000000000000000"
    credentials._file_values.cache_clear()


def test_log_lines_never_show_a_known_secret(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    setup_logging()
    logging.getLogger("t").info("downloading with %s", FAKE_TOKEN)
    try:
        raise RuntimeError(f"401 for token {FAKE_TOKEN}")
    except RuntimeError:
        logging.getLogger("t").exception("failed")
    err = capsys.readouterr().err
    assert FAKE_TOKEN not in err and err.count(credentials.MASK) >= 2, err


@pytest.mark.slow
def test_a_planted_token_is_in_no_file_the_pipeline_writes(project, tiny_model_dir):
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}")
    (project / "config" / "passwords.yml").write_text(f"hf_token: {FAKE_TOKEN}\n")
    env_token = "hf_" + "PlantedInTheEnvironmentToo0123456789ab"
    result = make_with_env(project, {"HF_TOKEN": env_token}, "all")
    make_with_env(project, {"HF_TOKEN": env_token}, "freeze")
    written = [
        p
        for p in project.rglob("*")
        if p.is_file() and not {".venv", ".cache"} & set(p.parts) and p.name != "passwords.yml"
    ]
    assert len(written) > 40  # the whole pipeline's outputs, logs and manifests
    for path in written:
        data = path.read_bytes()
        assert FAKE_TOKEN.encode() not in data and env_token.encode() not in data, path
    (bundle,) = (project / "dist").glob("main-*.tar.gz")
    with tarfile.open(bundle) as tar:
        for member in tar.getmembers():
            if member.isfile():
                data = tar.extractfile(member).read()
                assert FAKE_TOKEN.encode() not in data and env_token.encode() not in data, member.name
        assert "config/passwords.yml" not in tar.getnames()
    assert FAKE_TOKEN not in result.stdout + result.stderr and env_token not in result.stdout + result.stderr


def make_with_env(project, extra: dict, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "PIPELINE_"))}
    env.update(extra)
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result
