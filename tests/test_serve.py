"""make serve on the finished tiny project: an OpenAI-compatible server (llama-cpp-python's) answering as
eval answered, streaming and not; stopped cleanly; a non-loopback bind needs an API key, which it then
checks; a port in use is one clear line."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error

import orjson
import pytest

from helpers import free_port, make, request, server, wait_ready

ARTIFACT = "main/main-lora.gguf"  # the base GGUF with the adapter GGUF, in llama.cpp


def first_test_chat(root) -> tuple[list[dict], str]:
    """The first test record's messages up to its answer, and eval's answer to it from ARTIFACT."""
    record = orjson.loads((root / "data" / "test.jsonl").read_text().splitlines()[0])
    messages = [m for m in record["messages"] if m["role"] != "assistant"]
    rows = (root / "eval_out/main/final_generations.jsonl").read_text().splitlines()
    return messages, orjson.loads(rows[0])["outputs"][ARTIFACT]


def test_serve_answers_as_eval_did_streaming_and_not_and_stops_cleanly(finished_copy):
    port = free_port()
    messages, expected = first_test_chat(finished_copy)
    body = {"model": ARTIFACT, "messages": messages, "temperature": 0, "max_tokens": 8, "repeat_penalty": 1.0}
    with server(finished_copy, f"PORT={port}", f"ARTIFACT={ARTIFACT}") as process:
        wait_ready(port, process)
        models = json.loads(request("GET", port, "/v1/models"))
        assert [m["id"] for m in models["data"]] == [ARTIFACT]
        answer = json.loads(request("POST", port, "/v1/chat/completions", body))
        assert answer["choices"][0]["message"]["content"].strip() == expected
        events = request("POST", port, "/v1/chat/completions", body | {"stream": True}).splitlines()
        chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert len(chunks) > 2 and streamed.strip() == expected and events[-1].strip() in ("data: [DONE]", "")
        oversize = body | {"messages": [{"role": "user", "content": "word " * 2000}]}  # the tiny model holds 512
        with pytest.raises(urllib.error.HTTPError) as refused:
            request("POST", port, "/v1/chat/completions", oversize)
        assert 400 <= refused.value.code < 500 and "context" in json.loads(refused.value.read())["error"]["message"]
    # Ctrl-C ends make by the signal; the server shuts down gracefully and serve says so
    assert process.returncode in (0, -signal.SIGINT) and "server stopped" in process.output, process.output
    assert "Traceback" not in process.output, process.output
    with pytest.raises(urllib.error.URLError):
        request("GET", port, "/v1/models")  # nothing listens any more


def test_a_bind_beyond_loopback_needs_an_api_key_and_checks_it(finished_copy):
    port = free_port()
    refused = make(finished_copy, "serve", f"PORT={port}", "HOST=0.0.0.0", f"ARTIFACT={ARTIFACT}", check=False)
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr
    assert "binding to 0.0.0.0 (not loopback) needs an API key" in errors[0] and "SERVE_API_KEY" in errors[0]

    key = {"SERVE_API_KEY": "a-test-key-123456"}
    with server(finished_copy, f"PORT={port}", "HOST=0.0.0.0", f"ARTIFACT={ARTIFACT}", env=key) as process:
        wait_ready(port, process, headers={"Authorization": "Bearer a-test-key-123456"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            request("GET", port, "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert denied.value.code == 401
    assert "a-test-key-123456" not in process.output  # never logged


def test_a_port_in_use_is_one_clear_line(finished_copy):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = make(finished_copy, "serve", f"PORT={port}", check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0]
