"""prepare's data quality checks: duplicates, empty records, token lengths with the real tokenizer,
control characters, secrets (detect-secrets) and train↔valid/test contamination.

Columnar where it matters: regexes run over pyarrow string arrays (RE2), token counts come from the
tokenizer's batch encoder, and detect-secrets only sees the records an RE2 prefilter flags.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.core.scan import scan_line
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.keyword import DENYLIST
from detect_secrets.settings import transient_settings

CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_NOISY_SECRET_PLUGINS = ("Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector")
REDACTED = "[REDACTED]"


def record_text(record: dict) -> str:
    """All the text of a record, for duplicate, secret and control-character checks."""
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return record["prompt"] + "\n" + record["completion"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def prompt_side_text(record: dict) -> str:
    """What a test question looks like: user turns (or prompt, or text), for contamination n-grams."""
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return record["prompt"]
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")


def is_empty(record: dict) -> bool:
    if "text" in record:
        return not record["text"].strip()
    if "prompt" in record:
        return not record["completion"].strip()
    return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")


_PUNCTUATION = str.maketrans(
    "", "", "".join(chr(c) for c in range(128) if not chr(c).isalnum() and not chr(c).isspace())
)


def normalized_key(text: str) -> str:
    """Case, accents, punctuation and spacing folded away: near-identical records collide."""
    folded = text.casefold()
    if folded.isascii():
        return " ".join(folded.translate(_PUNCTUATION).split())
    folded = unicodedata.normalize("NFKD", folded)
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]", "", folded).split())


def dedupe(texts: list[str]) -> tuple[list[int], int, int]:
    """(indices kept, exact duplicates, further normalized duplicates), first occurrence kept."""
    seen_exact: set[str] = set()
    seen_normal: set[str] = set()
    kept, exact, normal = [], 0, 0
    for i, text in enumerate(texts):
        if text in seen_exact:
            exact += 1
            continue
        seen_exact.add(text)
        key = normalized_key(text)
        if key in seen_normal:
            normal += 1
            continue
        seen_normal.add(key)
        kept.append(i)
    return kept, exact, normal


def count_matching(texts: list[str], pattern: str) -> int:
    if not texts:
        return 0
    return int(pc.sum(pc.match_substring_regex(pa.array(texts, pa.large_string()), pattern)).as_py() or 0)


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Token counts with the model's own tokenizer (its fast batch encoder when it has one)."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    fast = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "_tokenizer", None)
    if fast is not None and hasattr(fast, "encode_batch"):
        encode = getattr(fast, "encode_batch_fast", fast.encode_batch)  # _fast skips character offsets
        lengths = []
        for start in range(0, len(texts), 4096):
            lengths += [len(e.ids) for e in encode(texts[start : start + 4096], add_special_tokens=False)]
        return np.array(lengths, dtype=np.int64)
    return np.array([len(tokenizer.encode(t)) for t in texts], dtype=np.int64)


def length_stats(lengths: np.ndarray) -> dict:
    if lengths.size == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0.0, "total": 0}
    return {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
        "total": int(lengths.sum()),
    }


def present_fields(record: dict) -> dict:
    """The fields of a normalized record, with chat roles (and tools) counted as fields."""
    if "messages" not in record:
        return record
    fields = {f"role:{m['role']}": True for m in record["messages"]}
    if record.get("tools"):
        fields["tools"] = True
    return fields


def field_presence(raw_records: list[dict]) -> dict[str, float]:
    """Share of records in which each field is present and not empty."""
    if not raw_records:
        return {}
    counts: dict[str, int] = {}
    for record in raw_records:
        for key, value in record.items():
            if value not in (None, "", [], {}):
                counts[key] = counts.get(key, 0) + 1
    return {key: round(n / len(raw_records), 4) for key, n in sorted(counts.items())}


# --- secrets -----------------------------------------------------------------------------------


@functools.cache
def _secret_plugins() -> tuple[list[str], list[str]]:
    """(plugin names used, RE2 prefilter patterns): every detect-secrets regex, made RE2-safe and looser."""
    names, patterns = [], ["(?i)(" + "|".join(DENYLIST) + ")"]
    for plugin in get_mapping_from_secret_type_to_class().values():
        if plugin.__name__ in _NOISY_SECRET_PLUGINS:
            continue
        names.append(plugin.__name__)
        if issubclass(plugin, RegexBasedDetector):
            patterns += [_re2_superset(p) for p in plugin().denylist]
    return sorted(names), patterns


def _re2_superset(pattern: re.Pattern) -> str:
    # RE2 has no lookaround and caps repetition at 1000: dropping lookarounds and upper bounds only
    # widens the match, so the prefilter still flags everything the real plugin would.
    text = re.sub(r"\(\?<?[=!](?:[^()]|\([^()]*\))*\)", "", pattern.pattern)
    text = re.sub(r"\{(\d+),\d{4,}\}", r"{\1,}", text)
    return ("(?i)" if pattern.flags & re.IGNORECASE else "") + text


def find_secrets(texts: list[str]) -> dict[int, list[dict]]:
    """{record index: [{"type", "line"}]} for records holding something detect-secrets calls a secret."""
    if not texts:
        return {}
    names, patterns = _secret_plugins()
    array = pa.array(texts, pa.large_string())
    mask = None
    for pattern in patterns:
        hits = pc.match_substring_regex(array, pattern)
        mask = hits if mask is None else pc.or_(mask, hits)
    candidates = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    found: dict[int, list[dict]] = {}
    with transient_settings({"plugins_used": [{"name": n} for n in names]}):
        for index in candidates:
            for line_no, line in enumerate(texts[index].splitlines(), 1):
                for secret in scan_line(line):
                    found.setdefault(int(index), []).append(
                        {"type": secret.type, "line": line_no, "value": secret.secret_value}
                    )
    return found


def redact(record: dict, values: list[str]):
    def scrub(text: str) -> str:
        for value in values:
            if value:
                text = text.replace(value, REDACTED)
        return text

    if "text" in record:
        return {**record, "text": scrub(record["text"])}
    if "prompt" in record:
        return {"prompt": scrub(record["prompt"]), "completion": scrub(record["completion"])}
    return {**record, "messages": [{**m, "content": scrub(m["content"])} for m in record["messages"]]}


# --- contamination -----------------------------------------------------------------------------


def word_ngrams(normalized: str, n: int) -> set[tuple[str, ...]]:
    words = normalized.split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return set(zip(*(words[i:] for i in range(n))))


def contamination(train_keys: list[str], eval_keys: list[str], n: int) -> dict:
    """Given normalized prompts: how many eval records equal a train record, and how many share a word
    n-gram with one."""
    train_set = set(train_keys)
    eval_grams = [word_ngrams(k, n) for k in eval_keys]
    wanted = set().union(*eval_grams) if eval_grams else set()
    train_grams: set[tuple[str, ...]] = set()
    for key in train_keys:
        train_grams |= word_ngrams(key, n) & wanted
    return {
        "exact": sum(k in train_set for k in eval_keys),
        "ngram": sum(bool(g & train_grams) for g in eval_grams),
        "ngram_n": n,
        "records": len(eval_keys),
    }
