"""repro: the Python half of eval_out/<experiment>/repro.sh (pipeline.repro_script), run in the replay folder.

  python -m repro config  <run_manifest.yaml> <out.yaml>     the recorded config as the replay's override
  python -m repro inputs  <run_manifest.yaml> <source root>  every recorded dataset file where the manifest
                                                             says, with its sha256 (relative ones linked in)
  python -m repro compare <run_manifest.yaml> <replay root>  one PASS/FAIL line per recorded artifact

`compare` exits 1 on any FAIL. On another platform (OS and architecture, device or BLAS) than the
recorded one, bits cannot match: it says so first and compares each artifact's eval metrics instead,
within LOSS_TOLERANCE (relative) and POINTS_TOLERANCE (task metric points).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pipeline  # noqa: F401
from pipeline import cli, contracts, hashing, paths, run_record
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

import yaml

log = logging.getLogger("repro")
# The replay is this one experiment, trained in one process here: the hosts of a distributed run are
# the recorder's (the adapter then matches within float rounding, which the replay's tolerances allow).
NOT_REPLAYED = ("experiment", "experiments", "sweep", "distributed")
NOT_FILES = ("builtin:", "hub:")
LOSS_TOLERANCE = 0.02  # relative, across platforms
POINTS_TOLERANCE = 2.0  # task metric points (0-100), across platforms


def build_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser("repro", __doc__)
    parser.add_argument("command", choices=("config", "inputs", "compare"))
    parser.add_argument("manifest", type=Path, help="the recorded runs/<experiment>/run_manifest.yaml")
    parser.add_argument("target", type=Path, help="config: the override to write; inputs/compare: a root folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        record = run_record.read(args.manifest)
        if args.command == "config":
            check_code(record)
            write_config(record, args.target)
            return 0
        if args.command == "inputs":
            check_inputs(record, args.target.resolve())
            return 0
        return compare(record, args.manifest.resolve().parents[2], args.target.resolve())
    except PipelineError as exc:
        log.error("error: %s", exc.line())
        return 2


def check_code(record: dict) -> None:
    """The code copied into the replay folder is the code that made the experiment."""
    recorded, now = record["code"]["files_sha256"], run_record.code_digest()
    if now != recorded:
        commit = record["code"]["commit"]
        raise PipelineError(
            f"the pipeline's code is not the code that made the experiment (files sha256 {now}, the run manifest "
            f"records {recorded})",
            where=str(paths.ROOT),
            fix=(f"check out commit {commit} and run repro.sh again" if commit else "replay from the frozen bundle")
            + ", or re-run the experiment with this code (make eval) to record it anew",
        )


def write_config(record: dict, out: Path) -> None:
    replay = {k: v for k, v in record["config"].items() if k not in NOT_REPLAYED}
    replay["experiment"] = {"name": record["experiment"]}
    text = "# The recorded config of experiment " + record["experiment"] + " (from its run_manifest.yaml)\n"
    contracts.write_bytes_atomic(out, (text + yaml.safe_dump(replay, sort_keys=False)).encode())


def check_inputs(record: dict, source_root: Path) -> None:
    """Each recorded dataset file or folder, with the recorded sha256; one given relative to the project is
    linked into the replay folder (the working directory) at the same place."""
    for entry in record["inputs"]["data"]:
        if entry["path"].startswith(NOT_FILES):
            continue
        recorded = Path(entry["path"]).expanduser()
        where = recorded if recorded.is_absolute() else source_root / recorded
        if not where.exists():
            raise PipelineError(
                "the dataset is no longer where the run manifest says",
                where=str(where),
                fix=f"put the file back (sha256 {entry['sha256']}) and run repro.sh again",
            )
        now = hashing.fingerprint(where, shown=entry["path"])["sha256"]
        if now != entry["sha256"]:
            raise PipelineError(
                f"the dataset changed since the experiment was made: sha256 {now}, the run manifest records "
                f"{entry['sha256']}",
                where=str(where),
                fix="restore the recorded version of the data to replay the experiment",
            )
        if not recorded.is_absolute():
            link = Path.cwd() / recorded
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(where)
        log.info("input %s: sha256 as recorded", entry["path"])


def compare(record: dict, source_root: Path, replay_root: Path) -> int:
    """`source_root`: the workspace or thawed bundle the recorded manifest is in."""
    experiment = record["experiment"]
    replayed_record = run_record.read(replay_root / "runs" / experiment / "run_manifest.yaml")
    recorded_env, here = record["environment"], replayed_record["environment"]
    same_platform = all(recorded_env.get(k) == here.get(k) for k in ("platform", "device", "blas"))
    recorded = _artifacts(record, source_root)
    replayed = _artifacts(replayed_record, replay_root)
    if not same_platform:
        print(
            f"repro: recorded on {_where(recorded_env)}, replayed on {_where(here)}: bits cannot match across "
            f"platforms, so each artifact's eval metrics are compared (loss within {LOSS_TOLERANCE:.0%}, "
            f"task metric within {POINTS_TOLERANCE} points)",
            flush=True,
        )
        return _compare_metrics(record, source_root, replay_root)
    failed = 0
    for artifact_id, sha256 in recorded.items():
        now = replayed.get(artifact_id)
        if now == sha256:
            print(f"PASS {artifact_id}  {sha256}")
        else:
            failed += 1
            print(f"FAIL {artifact_id}  recorded {sha256}, replayed {now or 'nothing'}")
    print(f"repro: {len(recorded) - failed} of {len(recorded)} artifacts identical" + (", FAIL" if failed else ""))
    return 1 if failed else 0


def _artifacts(record: dict, root: Path) -> dict[str, str]:
    """{artifact id: sha256} of the experiment's artifacts (artifacts.json under `root`, checked against the
    sha256 the record gives it), the base model as the model stage converted it first."""
    model = next(r for r in record["stages"] if r["stage"] == "model")
    found = {"base (converted)": model["outputs"][0]["sha256"]}
    listing = next(
        (e for stage in ("quantize", "fuse") for r in record["stages"] if r["stage"] == stage
         for e in r["outputs"] if e["role"] == "artifacts"),
        None,
    )  # fmt: skip
    if listing is None:
        return found
    path = root / listing["path"]
    if not path.is_file() or hashing.sha256_file(path) != listing["sha256"]:
        raise PipelineError(
            "the artifacts list is missing or not the one its run manifest records",
            where=str(path),
            fix="run repro.sh from the workspace or thawed bundle that holds it",
        )
    for artifact in contracts.read_json(path, "artifacts")["artifacts"]:
        if artifact["kind"] != "base":
            found[artifact["id"]] = artifact["sha256"]
    return found


def _compare_metrics(record: dict, source_root: Path, replay_root: Path) -> int:
    experiment = record["experiment"]
    before = contracts.read_json(source_root / "eval_out" / experiment / "metrics.json", "eval_metrics")
    after = contracts.read_json(replay_root / "eval_out" / experiment / "metrics.json", "eval_metrics")
    task = before["task_metric"]
    now = {a["id"]: a for a in after["artifacts"]}
    failed = total = 0
    for artifact in before["artifacts"]:
        if artifact["status"] != "ok":
            continue
        total += 1
        other = now.get(artifact["id"])
        problems = _metric_problems(artifact, other, task)
        failed += bool(problems)
        print(("FAIL " if problems else "PASS ") + artifact["id"] + ("  " + "; ".join(problems) if problems else ""))
    print(f"repro: {total - failed} of {total} artifacts within tolerance" + (", FAIL" if failed else ""))
    return 1 if failed else 0


def _metric_problems(artifact: dict, other: dict | None, task: str) -> list[str]:
    if other is None or other["status"] != "ok":
        return ["not scored in the replay"]
    problems = []
    if abs(other["loss"] - artifact["loss"]) > LOSS_TOLERANCE * abs(artifact["loss"]):
        problems.append(f"loss {artifact['loss']:.4f} recorded, {other['loss']:.4f} replayed")
    if task != "loss":
        a = ((artifact.get("metrics") or {}).get(task) or {}).get("value")
        b = ((other.get("metrics") or {}).get(task) or {}).get("value")
        if a is not None and (b is None or abs(a - b) > POINTS_TOLERANCE):
            problems.append(f"{task} {a} recorded, {b} replayed")
    return problems


def _where(env: dict) -> str:
    return f"{env.get('platform')} {env.get('device')} {env.get('blas')}"


if __name__ == "__main__":
    sys.exit(main())
