"""freeze stage: one experiment as one deterministic, verifiable tarball, dist/<experiment>-<hash>.tar.gz.

Reads config section `freeze`, runs/<experiment>/run_manifest.yaml (eval writes it),
eval_out/<experiment>/generation_policy.json and runs/<experiment>/package.manifest.json. The bundle
holds, at their workspace paths: the run manifest, the requirements lock it records, the data
contract, catalog and report, the adapter, the artifact the policy ships (and those
`freeze.artifacts` adds), the package stage's Ollama Modelfile and Docker image with the GGUF they
carry, the eval report with its charts, metrics.json and generation_policy.json; and config.yaml (the
resolved config), README.md for the receiver, SHA256SUMS. The training data (and the answers on the
test split) only with `freeze.include_data: true`. Every file recorded in the run manifest is checked against its sha256
before it goes in. The same experiment frozen twice gives the same bytes (pipeline.bundle), so the
hash in the name is the content's. Writes dist/<experiment>.freeze.manifest.json last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import pipeline  # noqa: F401
from pipeline import bundle, cli, config, contracts, frozen, hashing, paths, run_record, stages
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, changed_output, file_entry, output_path

import yaml

log = logging.getLogger("freeze")
DATA_FILES = ("data_contract.json", "data_catalog.json", "data_report.json", "data_report.md", "tool_schemas.json")
PRIVATE_EVAL_FILES = ("final_generations.jsonl",)  # test prompts and answers: data


def build_parser():
    return cli.stage_parser("freeze", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("freeze", args, run)


def run(cfg) -> Path:
    experiment = cfg.experiment.name
    stage = StageRun("freeze", {"freeze": config.section(cfg, "freeze")}, experiment=experiment)
    stages.read_manifest("eval", experiment)  # eval's outputs, the run manifest among them, are as it left them
    record_path = run_record.path(experiment)
    record = run_record.read(record_path)
    policy = contracts.read_json(paths.eval_dir(experiment) / "generation_policy.json", "generation_policy")
    recorded = {entry["path"]: entry for row in record["stages"] for entry in row["outputs"]}
    members = collect(cfg, record, policy, recorded)
    content = hashlib.sha256("".join(f"{n}\0{_digest(s)}\n" for n, s in sorted(members.items())).encode())
    out = paths.DIST_DIR / f"{experiment}-{content.hexdigest()[:12]}.tar.gz"
    digest = bundle.write(stage.staged(out), members)
    _, problems = frozen.verify(stage.staging.source(out))
    if problems:  # what freeze writes, verify must pass: a problem here is a bug
        raise PipelineError(f"the new bundle does not verify: {problems[0]}", where=paths.display(out))
    inputs = [file_entry("run_manifest", record_path), file_entry("generation_policy", policy_path(experiment))]
    size = stage.staging.source(out).stat().st_size
    details = {"sha256": digest, "bytes": size, "members": len(members) + 1, "ships": policy["ship"]["path"]}
    stage.finish(stages.get("freeze").manifest_path(experiment), inputs, [stage.entry("bundle", out)], details)
    log.info("bundle: %s (%s, sha256 %s, %d files)", paths.display(out), _size(size), digest, len(members) + 1)
    return out


def policy_path(experiment: str) -> Path:
    return paths.eval_dir(experiment) / "generation_policy.json"


def collect(cfg, record: dict, policy: dict, recorded: dict) -> dict[str, bundle.Source]:
    experiment = cfg.experiment.name
    members: dict[str, bundle.Source] = {}

    def add(path: Path) -> None:
        name = paths.display(path)
        if name in recorded and (problem := changed_output(recorded[name])):
            raise PipelineError(
                f"{name} is {problem} since the run manifest recorded it",
                where=paths.display(run_record.path(experiment)),
                fix=f"run `{stages.make_command('eval', experiment)}` to record the experiment as it is now",
            )
        if path.is_dir():
            members.update(bundle.files_of(path, name))
        else:
            members[name] = bundle.Source(path=path)

    if run_record.code_digest() != record["code"]["files_sha256"]:
        raise PipelineError(
            "the pipeline's code changed since the experiment was recorded, so the bundle could not replay it",
            where=paths.display(run_record.path(experiment)),
            fix=f"run `{stages.make_command('eval', experiment)}` to record it with the code as it is now",
        )
    for name, file in run_record.code_files().items():  # what repro.sh replays with
        members[name] = bundle.Source(path=file, executable=os.access(file, os.X_OK))
    add(run_record.path(experiment))
    add(paths.ROOT / record["environment"]["requirements_lock"]["path"])
    for name in DATA_FILES:
        if (paths.DATA_DIR / name).is_file():
            add(paths.DATA_DIR / name)
    for path in sorted(paths.eval_dir(experiment).iterdir()):
        private = path.name in PRIVATE_EVAL_FILES and not cfg.freeze.include_data
        if path.is_file() and not private and not path.name.endswith(".manifest.json"):
            add(path)
    add(_output(record, "train", "adapter"))
    add(paths.artifacts_file(experiment))  # the sha256 of every artifact, the bundled ones among them
    for artifact_path in _artifact_paths(cfg, policy):
        add(artifact_path)
    package = stages.read_manifest("package", experiment)  # the package as it made it
    package_dir = output_path(package, "package")
    if package_dir.is_dir() and any(package_dir.iterdir()):
        add(package_dir)
        if package["details"]["gguf"]:  # the Modelfile's FROM and the image's layer are this GGUF
            add(paths.resolve(package["details"]["gguf"]["path"]))
        route = package["details"].get("ollama_adapter")
        if route:  # Modelfile.adapter's FROM and ADAPTER, relative to the package folder
            for name in (route["from"], route["adapter"]):
                add((package_dir / name).resolve())
    if cfg.freeze.include_data:
        for split in paths.SPLITS:
            add(paths.split_file(split))
    resolved = yaml.safe_dump(record["config"], sort_keys=False, allow_unicode=True, width=120)
    members["config.yaml"] = bundle.Source(data=("# The resolved config of this experiment\n" + resolved).encode())
    members["README.md"] = bundle.Source(data=readme(record, policy, package["details"], members).encode())
    return members


def _output(record: dict, stage_name: str, role: str) -> Path:
    row = next(r for r in record["stages"] if r["stage"] == stage_name)
    return paths.resolve(next(e["path"] for e in row["outputs"] if e["role"] == role))


def _artifact_paths(cfg, policy: dict) -> list[Path]:
    experiment = cfg.experiment.name
    artifacts = contracts.read_json(paths.artifacts_file(experiment), "artifacts")["artifacts"]
    by_id = {a["id"]: a for a in artifacts}
    wanted = [policy["ship"]["id"]] if policy.get("ship") else []
    for artifact_id in cfg.freeze.artifacts:
        if artifact_id not in by_id:
            raise PipelineError(
                f"freeze.artifacts names '{artifact_id}', which {paths.display(paths.artifacts_file(experiment))} "
                "does not list",
                where="freeze.artifacts",
                fix="use ids from artifacts.json, e.g. " + ", ".join(sorted(by_id)[:4]),
            )
        wanted.append(artifact_id)
    found = []
    for artifact_id in dict.fromkeys(wanted):
        if artifact_id == "base" or by_id[artifact_id].get("kind") == "adapter":
            continue  # the base model is pinned by sha256, not shipped; the adapter is always in
        found.append(paths.resolve(by_id[artifact_id]["path"]))
    return found


def _digest(source: bundle.Source) -> str:
    return hashlib.sha256(source.data).hexdigest() if source.data is not None else hashing.sha256_file(source.path)


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"


def package_lines(experiment: str, package: dict) -> list[str]:
    folder = f"runs/{experiment}/package"
    lines = []
    if package.get("ollama"):
        lines += [
            f"Ollama: `ollama create {experiment} -f {folder}/Modelfile` then `ollama run {experiment}` (its FROM, "
            f"`{package['ollama']['from']}`, is relative to it; template, stops and sampling as eval scored them).",
            "",
        ]
    if package.get("ollama_adapter"):
        route = package["ollama_adapter"]
        lines += [
            f"Ollama, the adapter route: `ollama create {experiment}-lora -f {folder}/{route['file']}` (FROM the base "
            f"model `{route['from']}`, ADAPTER the LoRA adapter `{route['adapter']}`).",
            "",
        ]
    if package.get("docker"):
        docker = package["docker"]
        lines += [
            f"Docker Model Runner: `docker model load < {folder}/{docker['file']}` then `docker model run "
            f"{docker['reference']}`.",
            "",
        ]
    if not package.get("gguf"):
        lines += [f"No Ollama or Docker package: {package['why']}.", ""]
    return lines


def readme(record: dict, policy: dict, package: dict, members: dict) -> str:
    experiment = record["experiment"]
    ship = policy.get("ship")
    base = record["config"]["model"]["source"]
    lines = [
        f"# {experiment}: a fine-tuned model, frozen",
        "",
        f"Made by the LoRA-on-MLX pipeline from the base model `{base}`; how, exactly, is in "
        f"`runs/{experiment}/run_manifest.yaml` (config, input and output sha256s, versions, machine, seeds, commit).",
        "",
        "## What ships",
        "",
    ]
    if ship:
        lines += [
            f"`{ship['path']}` ({ship['format']}, {_size(ship['bytes'])}): {policy['reason']}.",
            "",
            f"Generate with the template and stop tokens in `eval_out/{experiment}/generation_policy.json`.",
            "",
        ]
    else:
        lines += ["Nothing qualified under the ship rule; see the eval report.", ""]
    lines += ["## Use it", ""]
    if ship and ship["kind"] == "gguf":
        lines += [
            "llama.cpp: `llama-cli -m " + ship["path"] + " -cnv` (or `llama-server -m " + ship["path"] + "`).",
            "",
            "Python: `llama_cpp.Llama(model_path='" + ship["path"] + "').create_chat_completion(messages=[...])`.",
            "",
        ]
    elif ship:
        lines += [f"mlx-lm: `mlx_lm.generate --model {ship['path']} --prompt '...'`.", ""]
    lines += package_lines(experiment, package)
    lines += [
        f"The LoRA adapter alone, on the base model: `mlx_lm.generate --model <base model> --adapter-path "
        f"runs/{experiment}/adapter --prompt '...'`.",
        "",
        "## Check it",
        "",
        "`sha256sum -c SHA256SUMS` checks every file; from the pipeline, `make verify BUNDLE=<this file>` also checks "
        "each against the sha256 the run manifest records, and `make thaw BUNDLE=<file> DEST=<dir>` extracts it "
        "safely after checking.",
        "",
        f"The eval report is `eval_out/{experiment}/report.md`.",
        "",
        "## Inside",
        "",
    ]
    lines += [f"- `{name}`" for name in sorted(members) if name != "README.md"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
