"""package stage: the GGUF eval decided to ship, packed for the tools people run models with.

Reads config section `package`, eval_out/<experiment>/generation_policy.json (generation_policy),
runs/<experiment>/artifacts.json (artifacts), data/data_contract.json (the chat template) and the fused
model's tokenizer (its eos token). Writes runs/<experiment>/package/ — an Ollama Modelfile, a second one
for the adapter route (Modelfile.adapter: FROM the base GGUF, ADAPTER the LoRA adapter GGUF, when
quantize made them) and a Docker Model Runner OCI image-layout tarball — and
runs/<experiment>/package.manifest.json last.

What is packed follows the decision, never precedes it: the GGUF the policy ships; when it ships an
MLX model (which neither Ollama nor Docker Model Runner runs), the smallest GGUF that qualified under
the same rule; when no GGUF qualified (or nothing ships), nothing, and the manifest says why. The
Modelfile carries the policy's template (checked to render like the Jinja one), stop tokens and
sampling settings (temperature; top_p and seed when sampling); eval's max_tokens is a cap for scoring,
not for serving, and is left out. The packed GGUF, loaded fresh in llama.cpp, answers the first test
prompt as Ollama would send it; the answer is recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import bundle, cli, config, contracts, paths, splits, stages
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, changed_output, file_entry, output_path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from lm import docker, gguf_header, llama_runner, ollama

log = logging.getLogger("package")
ANSWER_TOKENS = 64
ADAPTER_MODELFILE = "Modelfile.adapter"


def build_parser():
    return cli.stage_parser("package", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("package", args, run)


def run(cfg) -> Path:
    experiment = cfg.experiment.name
    stage = StageRun("package", {"package": config.section(cfg, "package")}, experiment=experiment)
    stages.read_manifest("eval", experiment)
    fused_dir = output_path(stages.read_manifest("fuse", experiment), "fused")
    policy_file = paths.eval_dir(experiment) / "generation_policy.json"
    policy = contracts.read_json(policy_file, "generation_policy")
    artifacts = contracts.read_json(paths.artifacts_file(experiment), "artifacts")["artifacts"]
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    check_template(policy, contract, policy_file)
    gguf, why = packed_gguf(policy, artifacts)
    log.info("%s", why)

    out_dir = paths.run_dir(experiment) / "package"
    details: dict = {"gguf": None, "why": why}
    with contracts.atomic_dir(stage.staged(out_dir)) as tmp:
        if gguf is not None:
            details.update(write_package(tmp, gguf, policy, contract, fused_dir, experiment, cfg.package, artifacts))
    inputs = [
        file_entry("generation_policy", policy_file),
        file_entry("artifacts", paths.artifacts_file(experiment)),
        file_entry("data_contract", paths.DATA_CONTRACT),
    ]
    if gguf is not None:
        inputs.append(file_entry("gguf", paths.resolve(gguf["path"])))
    stage.finish(stages.get("package").manifest_path(experiment), inputs, [stage.entry("package", out_dir)], details)
    return out_dir


def check_template(policy: dict, contract: dict, policy_file: Path) -> None:
    """The policy was scored with the template the data contract holds now."""
    if policy["generation"]["template_sha256"] != contract["template"]["sha256"]:
        raise PipelineError(
            "the chat template changed since eval scored the artifacts (the sha256 in the generation policy differs "
            "from the data contract's)",
            where=paths.display(policy_file),
            fix=f"run `{stages.make_command('eval', policy['experiment'])}` again",
        )


def packed_gguf(policy: dict, artifacts: list[dict]) -> tuple[dict | None, str]:
    """(the artifacts.json entry of the GGUF to pack, or None; why, in one line)."""
    ship = policy["ship"]
    if ship is None:
        return None, f"nothing packaged: nothing ships ({policy['reason']})"
    by_id = {a["id"]: a for a in artifacts}
    if ship["id"] not in by_id:
        raise PipelineError(
            f"generation_policy.json ships '{ship['id']}', which artifacts.json does not list",
            where=paths.display(paths.artifacts_file(policy["experiment"])),
            fix=f"run `{stages.make_command('eval', policy['experiment'])}` again",
        )
    if ship["kind"] == "gguf":
        return by_id[ship["id"]], f"packaging {ship['id']}: the artifact generation_policy.json ships"
    qualified = [by_id[c] for c in policy["candidates"] if c in by_id and by_id[c]["kind"] == "gguf"]
    runs = "an MLX model, which Ollama and Docker Model Runner do not run"
    if not qualified:
        return None, f"nothing packaged: the policy ships {ship['id']} ({runs}) and no GGUF qualified under its rule"
    smallest = min(qualified, key=lambda a: (a["bytes"], a["id"]))
    return smallest, (
        f"packaging {smallest['id']}: the policy ships {ship['id']} ({runs}); this is the smallest GGUF that "
        "qualified under the same rule"
    )


def write_package(
    out_dir: Path, gguf: dict, policy: dict, contract: dict, fused_dir: Path, experiment: str, pcfg, artifacts
):
    gguf_path = paths.resolve(gguf["path"])
    if problem := changed_output({**gguf, "kind": "file"}):
        raise PipelineError(
            f"the GGUF to package is {problem} since artifacts.json recorded it",
            where=gguf["path"],
            fix=f"run `{stages.make_command('quantize', experiment)}` and `{stages.make_command('eval', experiment)}`",
        )
    details = {"gguf": {k: gguf[k] for k in ("id", "path", "sha256", "bytes")}}
    modelfile = modelfile_plan(gguf_path, policy, contract, load_tokenizer(fused_dir).eos_token, pcfg.ollama)
    if pcfg.ollama.enabled:
        text = ollama.modelfile_text(
            _relative(gguf_path, experiment),
            modelfile["spec"],
            stops=modelfile["stops"],
            num_ctx=modelfile["num_ctx"],
            system=modelfile["system"],
            parameters=modelfile["parameters"],
        )
        contracts.write_bytes_atomic(out_dir / "Modelfile", text.encode("utf-8"))
        shown = {k: v for k, v in modelfile.items() if k != "spec"}
        details["ollama"] = {"file": "Modelfile", "from": _relative(gguf_path, experiment), **shown}
        route = adapter_route(gguf, artifacts)
        if route is not None:
            base, adapter = (_relative(paths.resolve(a["path"]), experiment) for a in route)
            text = ollama.modelfile_text(
                base,
                modelfile["spec"],
                stops=modelfile["stops"],
                num_ctx=modelfile["num_ctx"],
                system=modelfile["system"],
                parameters=modelfile["parameters"],
                adapter_file=adapter,
                name=ADAPTER_MODELFILE,
            )
            contracts.write_bytes_atomic(out_dir / ADAPTER_MODELFILE, text.encode("utf-8"))
            details["ollama_adapter"] = {"file": ADAPTER_MODELFILE, "from": base, "adapter": adapter}
    if pcfg.docker.enabled:
        details["docker"] = write_docker_image(out_dir, gguf_path, contract, experiment, pcfg.docker)
    details["answer"] = packed_answer(gguf_path, modelfile, contract)
    return details


def adapter_route(gguf: dict, artifacts: list[dict]) -> tuple[dict, dict] | None:
    """(base GGUF, adapter GGUF) for a Modelfile of the adapter route: the base model in the packed GGUF's
    format (Q4_K_M for Q4_K_M), else its float GGUF; None when quantize made no adapter GGUF."""
    adapter = next((a for a in artifacts if a["kind"] == "gguf-adapter"), None)
    bases = [a for a in artifacts if a["kind"] == "gguf-base"]
    if adapter is None or not bases:
        return None
    same_format = [a for a in bases if a["format"] == gguf["format"]]
    return (same_format or [a for a in bases if a["parent"] == "base"] or bases)[0], adapter


def _relative(gguf_path: Path, experiment: str) -> str:
    """The GGUF as the Modelfile's FROM names it: relative to the Modelfile (ollama create resolves it so),
    which holds in the workspace and in a thawed bundle alike."""
    return Path(os.path.relpath(gguf_path, paths.run_dir(experiment) / "package")).as_posix()


def modelfile_plan(gguf_path: Path, policy: dict, contract: dict, eos: str | None, ocfg) -> dict:
    """The Go template (checked against the Jinja one on sample conversations), SYSTEM, stops and parameters."""
    template = contract["template"]["source"]
    spec = ollama.infer_template_spec(template, eos_token=eos)
    go_template = ollama.go_template(spec)
    system = spec.default_system if ocfg.system == "auto" else (ocfg.system or None)
    ollama.check_modelfile_template(template, go_template, system, sample_conversations(contract), eos_token=eos)
    generation = policy["generation"]
    stops = list(dict.fromkeys([*generation["stop_tokens"], *ollama.stop_tokens(spec, eos)]))
    parameters = {"temperature": generation["temperature"]}
    if generation["temperature"] > 0:
        parameters |= {"top_p": generation["top_p"], "seed": generation["seed"]}
    num_ctx = min(ocfg.num_ctx, int(gguf_header.read_header(gguf_path)["context_length"] or 2048))
    return {
        "spec": spec,
        "go_template": go_template,
        "system": system,
        "stops": stops,
        "num_ctx": num_ctx,
        "parameters": parameters,
    }


def sample_conversations(contract: dict) -> list[list[dict]]:
    """Conversations the Go and Jinja templates must render identically: test chats plus a multi-turn one."""
    multi_turn = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Two turns:\n- one\n- two"},
    ]
    conversations = [multi_turn, multi_turn[1:]]
    if contract["format"] == "messages":
        for record in splits.read_split(contract, "test", 3):
            messages = record["messages"]
            conversations.append(messages[:-1] if messages[-1]["role"] == "assistant" else messages)
    return conversations


def write_docker_image(out_dir: Path, gguf_path: Path, contract: dict, experiment: str, dcfg) -> dict:
    """The OCI tarball, dated by bundle.reproducible_time() so that the same GGUF always gives the same bytes."""
    reference = dcfg.reference
    if reference == "auto":
        reference = f"ai/{experiment.lower()}:{gguf_path.stem.rsplit('-', 1)[-1].lower()}"
    tar_path = out_dir / f"{gguf_path.stem}.docker.tar"
    created = dt.datetime.fromtimestamp(bundle.reproducible_time(), dt.timezone.utc)
    result = docker.write_model_image(
        gguf_path, contract["template"]["source"], tar_path, reference=reference, created=created
    )
    if problems := docker.validate_oci_layout(tar_path):
        raise PipelineError(
            f"the Docker model image is not a valid OCI layout: {problems[0]}",
            where=paths.display(tar_path),
            fix="report it with the package log",
        )
    gguf_layer = result["layers"][0]
    return {
        "file": tar_path.name,
        "reference": reference,
        "manifest_digest": result["manifest_digest"],
        "gguf_layer": gguf_layer["digest"],
    }


def packed_answer(gguf_path: Path, modelfile: dict, contract: dict) -> dict:
    """The packed GGUF, loaded fresh in llama.cpp, answers the first test prompt rendered by the Go template
    (the text Ollama sends), greedily, stopping at the Modelfile's stops."""
    messages = (sample_conversations(contract)[2:] or [[{"role": "user", "content": "Hello"}]])[0]
    prompt = ollama.render_go(modelfile["go_template"], messages, modelfile["system"])
    llm = llama_runner.open_llama(gguf_path, n_ctx=modelfile["num_ctx"])
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    stop_ids = {llm.token_eos()}
    for stop in modelfile["stops"]:
        ids = llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
        stop_ids |= set(ids) if len(ids) == 1 else set()  # a text stop ("### Instruction:") is cut below
    answer_ids = llama_runner.greedy(llm, prompt_ids, ANSWER_TOKENS, stop_ids)
    answer = llm.detokenize([t for t in answer_ids if t not in stop_ids]).decode("utf-8", errors="replace")
    for stop in modelfile["stops"]:
        answer = answer.split(stop, 1)[0]
    log.info("llama.cpp %s answers: %s", gguf_path.name, answer.strip()[:200])
    return {"prompt_tokens": len(prompt_ids), "answer": answer, "tokens": len(answer_ids)}


if __name__ == "__main__":
    sys.exit(main())
