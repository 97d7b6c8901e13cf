"""Secrets (a Hugging Face token for hub downloads, say): from environment variables or the git-ignored
config/passwords.yml, never from default.yaml or override.yaml, and never written anywhere.

`check_layer` refuses a config key that names a secret (token, password, api_key, ...) or a value that
looks like one (hf_..., sk-..., ghp_..., AKIA...), pointing to passwords.yml. `hf_token()` is the token
hub downloads use. Every log line goes through `redact` (pipeline.log installs it), which replaces each
known secret value with ***; manifests, reports, repro.sh and bundles are built from the config and the
stages' outputs, which never hold one.
"""

from __future__ import annotations

import functools
import os
import re

from pipeline import paths
from pipeline.errors import ConfigError

import yaml

PASSWORDS_FILE = "config/passwords.yml"
ENVIRONMENT = {  # name in passwords.yml: variables
    "hf_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "serve_api_key": ("SERVE_API_KEY",),
}
SECRET_NAME = re.compile(r"(^|_)(token|password|passwd|secret|api_?key|access_?key|credentials?)($|_)", re.I)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16})$")
MASK = "***"
_MIN_REDACTED = 6  # shorter values are not redacted: they would mask ordinary words


def check_layer(layer: dict, source: str, prefix: str = "") -> None:
    """One clear line for a secret in a config file or on the command line."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(key, str) and SECRET_NAME.search(key) and not isinstance(value, dict):
            raise ConfigError(
                f"'{dotted}' looks like a secret, and secrets never go in a config file",
                where=source,
                fix=f"put it in {PASSWORDS_FILE} (git-ignored), e.g. hf_token: <value>, or in an environment "
                "variable (HF_TOKEN), and remove it here",
            )
        if isinstance(value, dict):
            check_layer(value, source, dotted + ".")
        elif isinstance(value, str) and SECRET_VALUE.match(value.strip()):
            raise ConfigError(
                f"the value of '{dotted}' looks like a token or key, and secrets never go in a config file",
                where=source,
                fix=f"put it in {PASSWORDS_FILE} (git-ignored) or an environment variable (HF_TOKEN) instead",
            )


@functools.cache
def _file_values() -> dict[str, str]:
    path = paths.ROOT / PASSWORDS_FILE
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read it ({type(exc).__name__})", where=PASSWORDS_FILE) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
        raise ConfigError(
            "must be a mapping of names to strings", where=PASSWORDS_FILE, fix="e.g. hf_token: hf_your_token"
        )
    return {str(k): v for k, v in loaded.items()}


def get(name: str) -> str | None:
    """A secret by its passwords.yml name: its environment variables first, then the file."""
    for variable in ENVIRONMENT.get(name, ()):
        if os.environ.get(variable):
            return os.environ[variable]
    return _file_values().get(name)


def hf_token() -> str | None:
    return get("hf_token")


def known_values() -> list[str]:
    values = {v for name in ENVIRONMENT for v in [get(name)] if v}
    try:
        values |= set(_file_values().values())
    except ConfigError:
        pass
    return sorted((v for v in values if len(v) >= _MIN_REDACTED), key=len, reverse=True)


def redact(text: str) -> str:
    for value in known_values():
        text = text.replace(value, MASK)
    return text
