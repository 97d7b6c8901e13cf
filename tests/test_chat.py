"""make chat on the finished tiny project: prompts on stdin are answered one per line, as eval answered
them (same template, system prompt, stop tokens and greedy decoding); bad choices are one clear line."""

from __future__ import annotations

import shutil

import orjson
import pytest

from helpers import make


def user_prompts(root) -> list[str]:
    records = [orjson.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]


def eval_answers(root, artifact_id: str) -> list[str]:
    rows = [orjson.loads(line) for line in (root / "eval_out/main/final_generations.jsonl").read_text().splitlines()]
    return [row["outputs"][artifact_id] for row in rows]


@pytest.mark.parametrize("artifact", ["main/main-lora.gguf", "main/fused"])
def test_chat_answers_prompts_on_stdin_as_eval_answered_them(finished_copy, artifact):
    expected = eval_answers(finished_copy, artifact)
    prompts = user_prompts(finished_copy)[: len(expected)]
    assert len(prompts) == len(expected) >= 3
    # eval capped each answer at eval.max_tokens (8 here): the same cap gives the same answers
    result = make(finished_copy, "chat", f"ARTIFACT={artifact}", 'SET="chat.max_tokens=8"', stdin="\n".join(prompts))
    assert result.stdout.splitlines() == expected, result.stderr
    header = next(line for line in result.stderr.splitlines() if line.startswith("chat: "))
    assert artifact in header and "MB" in header and "system prompt of" in header


def test_chat_with_an_unknown_artifact_is_one_clear_line(finished_copy):
    result = make(finished_copy, "chat", "ARTIFACT=nope", stdin="hi\n", check=False)
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no artifact 'nope' to chat with" in errors[0] and "main/fused" in errors[0]


def test_chat_with_an_artifact_missing_on_disk_is_one_clear_line(finished_copy):
    shutil.rmtree(finished_copy / "runs" / "main" / "fused")
    result = make(finished_copy, "chat", "ARTIFACT=main/fused", stdin="hi\n", check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "the artifact main/fused is missing on disk" in errors[0]
