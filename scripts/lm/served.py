"""Which artifact of an experiment a tool runs (chat, serve, eval's adapter GGUF): the one
generation_policy.json ships or one named, and the base GGUF an adapter GGUF applies to."""

from __future__ import annotations

from pathlib import Path

from pipeline import contracts, paths, stages
from pipeline.errors import PipelineError

from lm import adapter_export

GGUF_KINDS = ("gguf", "gguf-adapter")
MLX_KINDS = ("base", "adapter", "fused", "mlx-quantized")
ACTIONS = {"chat": "chat with", "serve": "serve"}


def what_to_run(choice: str, experiment: str, tool: str) -> tuple[dict, list[dict], dict, dict]:
    """(generation policy, artifacts, data contract, the artifact `choice` names) of an evaluated experiment."""
    stages.read_manifest("eval", experiment)
    policy = contracts.read_json(paths.eval_dir(experiment) / "generation_policy.json", "generation_policy")
    artifacts = contracts.read_json(paths.artifacts_file(experiment), "artifacts")["artifacts"]
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    return policy, artifacts, contract, chosen_artifact(choice, policy, artifacts, experiment, tool)


def chosen_artifact(choice: str, policy: dict, artifacts: list[dict], experiment: str, tool: str) -> dict:
    """The artifact `choice` names for `make <tool>`: `shipped` (what generation_policy.json ships), an id
    or a path."""
    if choice == "shipped":
        if policy["ship"] is None:
            raise PipelineError(
                f"nothing ships for experiment '{experiment}' ({policy['reason']})",
                where=paths.display(paths.eval_dir(experiment) / "generation_policy.json"),
                fix=f"name one: make {tool} ARTIFACT=<an id from runs/{experiment}/artifacts.json>",
            )
        choice = policy["ship"]["id"]
    runnable = [a for a in artifacts if a["kind"] in GGUF_KINDS + MLX_KINDS]
    found = next((a for a in runnable if choice in (a["id"], a["path"], f"{experiment}/{choice}")), None)
    if found is None:
        raise PipelineError(
            f"no artifact '{choice}' to {ACTIONS[tool]} in experiment '{experiment}'",
            where=paths.display(paths.artifacts_file(experiment)),
            fix=f"ARTIFACT= one of: {', '.join(a['id'] for a in runnable)}",
        )
    if not paths.resolve(found["path"]).exists():
        raise PipelineError(
            f"the artifact {found['id']} is missing on disk",
            where=found["path"],
            fix=f"run `{stages.make_command('quantize', experiment)}` again",
        )
    return found


def base_gguf(artifacts: list[dict]) -> dict:
    """The base model's float GGUF, which quantize checked the adapter GGUF on."""
    found = next((a for a in artifacts if a["kind"] == "gguf-base" and a["parent"] == "base"), None)
    if found is None:
        raise PipelineError(
            "artifacts.json lists an adapter GGUF but no float GGUF of the base model to apply it to",
            where="artifacts.json",
            fix="run make quantize again",
        )
    return found


def adapter_route(artifact: dict, artifacts: list[dict]) -> tuple[Path, Path]:
    """(base GGUF, adapter GGUF) of a gguf-adapter artifact, checked to fit each other."""
    base, adapter = paths.resolve(base_gguf(artifacts)["path"]), paths.resolve(artifact["path"])
    adapter_export.check_pair(base, adapter)
    return base, adapter
