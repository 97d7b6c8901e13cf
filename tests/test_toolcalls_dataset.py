"""The embedded default dataset: deterministic, valid answers, held-out test phrasing, strict scoring."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO
from prepare import toolcalls_dataset as ds


def test_same_seed_same_data_across_processes():
    code = (
        "import hashlib, json; from prepare import toolcalls_dataset as d; "
        "print(hashlib.sha256(json.dumps(d.generate(0)).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO / "scripts",
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed},
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1
    assert ds.generate(0) != ds.generate(1)


def test_every_answer_is_a_valid_call_and_requests_never_repeat():
    splits = ds.generate(0)
    requests = [r["messages"][1]["content"] for s in splits.values() for r in s]
    assert len(requests) == len(set(requests))
    for records in splits.values():
        for record in records:
            answer = record["messages"][2]["content"]
            assert ds.check_call(answer) == {
                "json_valid": True,
                "schema_valid": True,
                "name": json.loads(answer)["name"],
            }
    names = {json.loads(r["messages"][2]["content"])["name"] for r in splits["test"]}
    assert names == {tool["name"] for tool in ds.TOOLS}


def test_check_call_rejects_what_a_model_gets_wrong():
    assert ds.check_call("not json") == {"json_valid": False, "schema_valid": False, "name": None}
    assert ds.check_call('{"name": "set_timer", "arguments": {"minutes": "ten"}}')["schema_valid"] is False
    assert ds.check_call('{"name": "no_such_tool", "arguments": {}}')["schema_valid"] is False
    assert (
        ds.check_call('{"name": "create_event", "arguments": {"title": "x", "date": "2026-02-30"}}')["schema_valid"]
        is False
    )
    assert ds.check_call(ds.call_text("set_timer", {"minutes": 10}))["schema_valid"] is True
