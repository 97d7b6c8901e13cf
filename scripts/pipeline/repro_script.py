"""eval_out/<experiment>/repro.sh, the standalone replay script eval writes beside the report.

Run from the workspace or from a thawed bundle (`make repro EXP=<name>` runs it), it:
1. recreates the environment from the recorded requirements lock in a fresh virtual environment, or
   reuses the one REPRO_VENV names when its lock sha256 (<venv>/lock.sha256, which `make setup` writes)
   is the recorded one;
2. copies the pipeline's code into a fresh folder (REPRO_DIR, default a new temporary folder; the
   original outputs are never touched) and re-runs model → prepare → train → fuse → quantize → eval there
   with the recorded config, after checking every recorded dataset file is where the manifest says with
   the recorded sha256;
3. compares every recorded artifact's sha256 (`python -m repro compare`): one PASS or FAIL line each,
   exit 1 on any FAIL. On another platform (OS, architecture, device or BLAS) bits cannot match: it
   says so first and compares the eval metrics within a tolerance instead.
"""

from __future__ import annotations

import shlex

TEMPLATE = r"""#!/usr/bin/env bash
# Replay experiment {experiment} bit for bit: a fresh environment from the recorded requirements lock, every
# stage re-run with the recorded config in a fresh folder, every recorded artifact's sha256 compared.
# Written by the pipeline's eval stage (scripts/pipeline/repro_script.py). Run it from where it is, in a
# workspace or a thawed bundle:   bash eval_out/{experiment}/repro.sh
#   REPRO_DIR=<folder>   where to replay (default: a new temporary folder); must be empty or absent
#   REPRO_VENV=<venv>    reuse this virtual environment when its lock.sha256 is the recorded lock's
#                        (skips the ~6 minute install, which compiles llama.cpp)
#   PYTHON=<python3.11+> the interpreter a new environment is made with (default: python3)
set -euo pipefail
experiment={experiment_q}
lock_path={lock_q}
lock_sha256={lock_sha256}
say() {{ echo "repro: $*" >&2; }}
die() {{ say "error: $*"; exit 2; }}
source_root="$(cd "$(dirname "${{BASH_SOURCE[0]}}")/../.." && pwd)"
manifest="$source_root/runs/$experiment/run_manifest.yaml"
[ -f "$manifest" ] ||
  die "$manifest: missing -- fix: run repro.sh where it was written (a workspace or a thawed bundle)"
[ -f "$source_root/$lock_path" ] ||
  die "$source_root/$lock_path: missing -- fix: the recorded environment needs it"
found_sha256="$(sha256sum "$source_root/$lock_path" | cut -d' ' -f1)"
[ "$found_sha256" = "$lock_sha256" ] ||
  die "$lock_path: sha256 $found_sha256, the run manifest records $lock_sha256 -- fix: use the recorded lock"

work="${{REPRO_DIR:-$(mktemp -d "${{TMPDIR:-/tmp}}/repro-$experiment.XXXXXX")}}"
if [ -d "$work" ] && [ -n "$(ls -A "$work")" ]; then
  die "$work: not empty -- fix: give REPRO_DIR a new or empty folder"
fi
mkdir -p "$work"
work="$(cd "$work" && pwd)"
case "$work/" in "$source_root/"*) die "$work: inside $source_root -- fix: replay somewhere else";; esac
say "replaying $experiment in $work"

if [ -n "${{REPRO_VENV:-}}" ]; then
  [ "$(cat "$REPRO_VENV/lock.sha256" 2>/dev/null)" = "$lock_sha256" ] ||
    die "$REPRO_VENV: not made from the recorded $lock_path (its lock.sha256 differs or is missing)" \
      "-- fix: unset REPRO_VENV to build a fresh environment"
  venv="$(cd "$REPRO_VENV" && pwd)"
  say "environment: reusing $venv (lock sha256 matches)"
else
  venv="$work/.venv"
  say "environment: installing $lock_path into $venv (the first time compiles llama.cpp: ~6 minutes)"
  "${{PYTHON:-python3}}" -m venv "$venv"
  CMAKE_ARGS="${{CMAKE_ARGS:-{cmake_args}}}" \
    "$venv/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$source_root/$lock_path"
  echo "$lock_sha256" > "$venv/lock.sha256"
fi

for item in Makefile requirements.in scripts; do cp -R "$source_root/$item" "$work/"; done
mkdir -p "$work/config"
for item in default.yaml schemas templates; do cp -R "$source_root/config/$item" "$work/config/"; done
cp "$source_root/$lock_path" "$work/$lock_path"
if [ -f "$source_root/config/passwords.yml" ]; then  # linked, never copied: a secret stays in one place
  ln -s "$source_root/config/passwords.yml" "$work/config/passwords.yml"
fi
find "$work/scripts" -name __pycache__ -prune -exec rm -rf {{}} +
mkdir -p "$work/data" "$work/runs" "$work/eval_out" "$work/dist"
ln -s "$venv" "$work/.venv"
lock_name="$(basename "$lock_path" .lock)"
extra="${{lock_name#requirements}}"
touch "$work/.venv/.setup-$lock_name.stamp"  # the environment is the recorded lock's: make need not install it

cd "$work"
PYTHONPATH=scripts .venv/bin/python -m repro config "$manifest" config/replay.yaml
PYTHONPATH=scripts .venv/bin/python -m repro inputs "$manifest" "$source_root"
make --no-print-directory eval OVERRIDE=config/replay.yaml EXP="$experiment" MLX_EXTRA="${{extra#-}}"
PYTHONPATH=scripts .venv/bin/python -m repro compare "$manifest" "$work"
"""

PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def render(experiment: str, lock: dict, platform_name: str) -> str:
    """The script for `experiment`; `lock` is run_record.lock_entry() ({"path", "sha256"})."""
    return TEMPLATE.format(
        experiment=experiment,
        experiment_q=shlex.quote(experiment),
        lock_q=shlex.quote(lock["path"]),
        lock_sha256=lock["sha256"],
        cmake_args=PORTABLE_CMAKE_ARGS if platform_name == "Linux-x86_64" else "",
    )


def write(path, experiment: str, lock: dict, platform_name: str) -> None:
    path.write_text(render(experiment, lock, platform_name), encoding="utf-8")
    path.chmod(0o755)
