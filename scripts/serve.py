"""make serve: an OpenAI-compatible HTTP server (/v1/chat/completions, streaming too, and /v1/models)
for the model an experiment ships, with the chat template and stop tokens it was trained with.

Reads config section `serve`, eval_out/<experiment>/generation_policy.json (the shipped artifact and its
sampling), runs/<experiment>/artifacts.json and data/data_contract.json (the training chat template).
Writes nothing. A GGUF is served by llama-cpp-python's server, an MLX model by mlx-lm's: this script
only checks and starts them.

Before it starts: the server must render the training template's text (checked on sample
conversations); the port must be free; a bind to anything but loopback needs serve.host set on purpose
(HOST=) and an API key (SERVE_API_KEY in the environment or serve_api_key in config/passwords.yml),
which the server then checks on every request (mlx-lm's server checks none, so an MLX model is
served on loopback only).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, credentials, paths, runtime
from pipeline.errors import PipelineError

from lm import chat_template, gguf_header
from lm.served import GGUF_KINDS, adapter_route, what_to_run

log = logging.getLogger("serve")
SAMPLE_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    [
        {"role": "user", "content": "Two turns:\n- one"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "- two"},
    ],
]


def build_parser():
    return cli.stage_parser("serve", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    outcome = {"code": 0}
    code = cli.run_stage("serve", args, lambda cfg: outcome.update(code=run(cfg)))
    return code or outcome["code"]


def run(cfg) -> int:
    experiment, scfg = cfg.experiment.name, cfg.serve
    policy, artifacts, contract, artifact = what_to_run(scfg.artifact, experiment, "serve")
    api_key = check_bind(scfg.host, artifact)
    check_port_free(scfg.host, scfg.port)
    if artifact["kind"] in GGUF_KINDS:
        command, env = gguf_command(artifact, artifacts, contract, scfg, api_key)
    else:
        command, env = mlx_command(artifact, artifacts, contract, policy, scfg), {}
    log.info(
        "serving %s on http://%s:%d/v1 (OpenAI-compatible; Ctrl-C stops it)",
        artifact["id"],
        _url_host(scfg.host),
        scfg.port,
    )
    return serve(command, env)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, artifact: dict) -> str | None:
    """The API key a non-loopback bind requires (None on loopback); one clear line when it cannot be had."""
    if is_loopback(host):
        return None
    if artifact["kind"] not in GGUF_KINDS:
        raise PipelineError(
            f"serving {artifact['id']} on {host} would open it to the network without an API key check "
            "(mlx-lm's server has none)",
            where="serve.host",
            fix="bind to 127.0.0.1 (the default), or serve a GGUF artifact (ARTIFACT=), whose server checks a key",
        )
    key = credentials.get("serve_api_key")
    if not key:
        raise PipelineError(
            f"binding to {host} (not loopback) needs an API key, and none is set",
            where="serve.host",
            fix=f"set SERVE_API_KEY in the environment or serve_api_key in {credentials.PASSWORDS_FILE}; "
            "or bind to 127.0.0.1",
        )
    return key


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PipelineError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                where="serve.port",
                fix="choose another port: make serve PORT=8081",
            ) from None


def gguf_command(artifact, artifacts, contract, scfg, api_key) -> tuple[list[str], dict]:
    model, lora = paths.resolve(artifact["path"]), None
    if artifact["kind"] == "gguf-adapter":
        model, lora = adapter_route(artifact, artifacts)
    check_gguf_template(model, contract)
    context = min(scfg.context_tokens, int(gguf_header.read_header(model)["context_length"] or scfg.context_tokens))
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", scfg.host]
    command += ["--port", str(scfg.port), "--n_ctx", str(context), "--n_threads", str(runtime.cpu_threads())]
    command += ["--chat_format", "chat_template.default", "--model_alias", artifact["id"], "--verbose", "False"]
    if lora:
        command += ["--lora_path", str(lora)]
    return command, ({"API_KEY": api_key} if api_key else {})


def check_gguf_template(gguf_path, contract: dict) -> None:
    """llama-cpp-python's server renders chats with the GGUF's template (Jinja): the text must be
    prepare's, conversation by conversation."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
    finally:
        llm.close()
    if not template:
        raise PipelineError(
            "the GGUF carries no chat template, so the server would not render the training one",
            where=paths.display(gguf_path),
            fix="run make quantize again (it writes the training template into the GGUF)",
        )
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    special = {"bos_token": bos, "eos_token": eos}
    for messages in SAMPLE_CONVERSATIONS:
        served = formatter(messages=messages).prompt
        trained = chat_template.render_chat(contract["template"], messages, special, add_generation_prompt=True)
        if served != trained:
            raise PipelineError(
                "the server would render chats differently from the training template",
                where=paths.display(gguf_path),
                fix="run make quantize again so that the GGUF carries the template prepare used",
            )


def mlx_command(artifact, artifacts, contract, policy, scfg) -> list[str]:
    path, adapter = paths.resolve(artifact["path"]), None
    if artifact["kind"] == "adapter":
        adapter = path
        path = paths.resolve(next(a for a in artifacts if a["kind"] == "base")["path"])
    generation = policy["generation"]
    command = [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--host", scfg.host]
    command += ["--port", str(scfg.port), "--chat-template", contract["template"]["source"]]
    command += ["--temp", str(generation["temperature"]), "--top-p", str(generation["top_p"])]
    if adapter:
        command += ["--adapter-path", str(adapter)]
    return command


def serve(command: list[str], env: dict) -> int:
    """Run the server until it ends or this process is told to stop (SIGINT, SIGTERM), then stop it with
    one SIGINT (a graceful shutdown). The server has a session of its own, so Ctrl-C at the terminal
    reaches it once, from here."""
    environment = {**os.environ, **env, "PYTHONPATH": str(paths.ROOT / "scripts")}
    process = subprocess.Popen(command, env=environment, preexec_fn=_own_session_ended_with_parent)

    def stop(signum, frame):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:
                stop(signal.SIGINT, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            process.kill()
            process.wait()
    log.info("server stopped")
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else 1


def _own_session_ended_with_parent() -> None:
    """In the server's process before it starts: a session of its own, and (Linux) SIGTERM when this
    process dies, however it dies, so that no server outlives `make serve`."""
    os.setsid()
    runtime.end_with_parent(signal.SIGTERM)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
