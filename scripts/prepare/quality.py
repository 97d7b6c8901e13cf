"""prepare's data quality checks: duplicates, empty records, token lengths with the real tokenizer,
control characters, secrets (key formats, generated values given to secret-named variables, and
detect-secrets' other vendor formats) and train↔valid/test contamination.

Columnar where it matters: regexes run over pyarrow string arrays (RE2), token counts come from the
tokenizer's batch encoder, and the secret rules only see the records an RE2 prefilter flags.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.core.scan import scan_line
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.settings import transient_settings

CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"


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
        "median": round(float(np.median(lengths)), 1),
        "p95": round(float(np.percentile(lengths, 95)), 1),
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
#
# Two kinds of rule. A key format (a vendor prefix, then a fixed charset and length) is rare enough in
# ordinary text to count wherever it appears, unless it is written as a placeholder (`sk-xxxx…`).
# A secret-named variable given a value (`password = "…"`, `"api_key": "…"`), a bearer token or a
# password in a URL is in every other code sample, so it counts only when the value looks generated:
# long, several character classes, high entropy, no words, no template. detect-secrets' own rules for
# those (Secret Keyword, Basic Auth) took any value at all, `password = "your_password"` included, and
# its high-entropy rules fire on every hash and base64 image, so they are replaced here; so are the
# vendor rules this table covers better. Its other vendor formats are used as they are, placeholders
# filtered the same way.

_DETECT_SECRETS_REPLACED = (
    "Base64HighEntropyString",  # every base64 image and encoded blob
    "HexHighEntropyString",  # every SHA digest and commit hash
    "IPPublicDetector",  # addresses are not secrets
    "KeywordDetector",  # `password = "your_password"`: Secret Keyword below, with _looks_random
    "BasicAuthDetector",  # `postgres://user:password@localhost`: Basic Auth Credentials below, likewise
    "GitHubTokenDetector",  # no github_pat_, and it yields the prefix alone (ghp), which redact replaced
    "GitLabTokenDetector",  # the same: glpat alone
    "JwtTokenDetector",  # two parts were enough, and the header need not name an algorithm
    "OpenAIDetector",  # only keys with the T3BlbkFJ marker; no sk-proj- without it, no Anthropic
    "PrivateKeyDetector",  # the BEGIN line alone counted, and redact then left the key body in place
    "SlackDetector",  # `xoxb-1-a` was enough
    "StripeDetector",  # 24 characters: redact left the rest of a longer key in place
)
REDACTED = "[REDACTED]"

# Written-out placeholders in a key format: sk-xxxx…, AKIAXXXX…, a run of one character, a template.
_FORMAT_PLACEHOLDER = re.compile(
    r"(?i)x{4,}|(.)\1{5,}|[*<>{}$…]|\.\.\.|your[_-]|[_-]here(?![a-z])|replace_?me|change_?me|redacted|placeholder"
)
# ...and in a free value, where words are a sign of a placeholder too (`your-secret-key-here`).
_VALUE_PLACEHOLDER = re.compile(
    r"(?i)your|my[_-]|example|sample|dummy|fake|test|demo|mock|default|placeholder|chang|redact|secret|pass|"
    r"token|api_?key|insert|replace|here|real|xxx|\.\.\.|…|\*{3}|abcd|1234|qwert|asdf|0000|none|null|todo|lorem|"
    r"admin|user|guest|login|welcome|letmein|hello|iloveyou|sunshine|princess|dragon|monkey|master|shadow|"
    r"football|summer|winter|spring|autumn"  # the words of the most common passwords
)
_LEET = str.maketrans("013457@$", "oieastas")
# An expression, a template, a path, an address or an id rather than a literal: `os.environ["X"]`,
# `${TOKEN}`, `<API_KEY>`, `settings.SECRET_KEY`, `user@host.org`, `key.pem`, a UUID.
_NOT_A_LITERAL = re.compile(
    r"[()\[\]{}<>]|^\$\w+$|^%\w+%$|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|://|@[\w-]+\.[a-z]{2,}$|"
    r"\.(?:pem|key|crt|json|txt|ya?ml|env|cfg|ini|p12)$|"
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_WORD = re.compile(r"[A-Z]?[a-z]{4,}|[A-Z]{5,}")
# Parts of a secret-named variable's name that say it holds something else: `password_hash`, `token_url`,
# `api_key_id`, `passwordMinLength`.
_NOT_THE_SECRET = frozenset(
    "hash hashed digest checksum sha md5 salt fingerprint id ids uuid url uri endpoint path file "
    "name type len length count max min limit size format field header env var regex pattern prompt label "
    "hint".split()
)
_NAME_PART = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_SECRET_NAME = (
    r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|credentials?|"
    r"(?:api|access|auth|private|client|secret|signing|encryption|master|license|service|account|app)[_-]?key)"
)


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    return -sum(n / len(value) * math.log2(n / len(value)) for n in Counter(value).values())


def _format_value(value: str) -> bool:
    """A value in a key format that is not written out as a placeholder."""
    return not _FORMAT_PLACEHOLDER.search(value)


def _mixed_case(value: str) -> bool:
    return _format_value(value) and bool(re.search("[a-z]", value) and re.search("[A-Z]", value))


def _mixed_case_and_digits(value: str) -> bool:
    return _format_value(value) and bool(
        re.search("[a-z]", value) and re.search("[A-Z]", value) and re.search("[0-9]", value)
    )


def _looks_random(value: str) -> bool:
    """A generated value, not a placeholder, a word, an id or an expression."""
    if not 16 <= len(value) <= 1024 or any(c.isspace() for c in value) or _NOT_A_LITERAL.search(value):
        return False
    if _wordy(value):
        return False
    decoded = _base64_text(value)
    if decoded is not None and (len(decoded) < 8 or _wordy(decoded)):
        return False  # base64 of a placeholder: `cGFzc3dvcmQxMjM=` is password123
    lower, upper, digit = (bool(re.search(c, value)) for c in ("[a-z]", "[A-Z]", "[0-9]"))
    other = bool(re.search("[^A-Za-z0-9]", value))
    if lower + upper + digit + other < 3 and not (lower + upper + digit == 2 and len(value) >= 20):
        return False  # one class (`kqzjxwvmplrtbnhg`), or two and short (a 16-digit hex id)
    grams = [value[i : i + 6] for i in range(len(value) - 5)]
    if len(set(grams)) < len(grams):
        return False  # a repeated piece: `Abc123!@#Abc123!@#`
    runs = sum(ord(b) - ord(a) == 1 for a, b in zip(value, value[1:]))
    if runs >= 0.3 * (len(value) - 1):
        return False  # ascending runs: `abc123def456ghi789`
    return _entropy(value) >= 3.0


def _wordy(value: str) -> bool:
    """A placeholder word (also in leetspeak: `P4ssw0rd`), or mostly words: `CorrectHorseBatteryStaple1!`."""
    if _VALUE_PLACEHOLDER.search(value) or _VALUE_PLACEHOLDER.search(value.translate(_LEET)):
        return True
    return sum(map(len, _WORD.findall(value))) >= 0.6 * len(value)


def _base64_text(value: str) -> str | None:
    """The printable text a base64 value encodes, if it is one (a generated secret decodes to bytes)."""
    if len(value) % 4 or not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", value):
        return None
    try:
        text = base64.b64decode(value, validate=True).decode("ascii")
    except ValueError:
        return None
    return text if text.isprintable() else None


def _jwt(value: str) -> bool:
    """Three base64url parts, the first two JSON objects and the header naming its algorithm."""
    try:
        header, payload = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in value.split(".")[:2])
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str) and isinstance(payload, dict)


def _private_key(value: str) -> bool:
    """A PEM block with a key body, not `-----BEGIN PRIVATE KEY-----` in prose or a `...` body."""
    body = re.sub(r"(?m)^[ \t]*[\w-]+: .*$|-----[A-Z0-9 ]+-----|\\r|\\n|\s", "", value)
    return len(body) >= 16 and not re.search("(?i)x{4,}", body)


@dataclasses.dataclass(frozen=True)
class _Rule:
    type: str
    pattern: re.Pattern  # the secret is its group "value" if it has one, else the whole match
    accept: Callable[[str], bool]
    prefilter: str = ""  # an RE2 pattern matching at least what `pattern` does; derived when empty

    @property
    def generic(self) -> bool:
        return self.accept is _looks_random


_BOUND, _END = r"(?<![\w-])", r"(?![\w-])"
_RULES = (
    _Rule(
        "Private Key",
        re.compile(
            r"-----BEGIN (?P<kind>(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
            r"(?:(?:[ \t]*(?:\r?\n|(?:\\r)?\\n)[ \t]*|[ \t]+)(?:[\w-]+: [^\r\n]*|[A-Za-z0-9+/=]+))*"  # \n or "\\n"
            r"(?:(?:\s|\\r|\\n)*-----END (?P=kind)-----)?"
        ),
        _private_key,
        prefilter=r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY",
    ),
    _Rule(
        "JSON Web Token",
        re.compile(_BOUND + r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{16,}" + _END),
        _jwt,
    ),
    _Rule(
        "GitHub Token",
        re.compile(
            r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})(?![A-Za-z0-9_])"
        ),
        _format_value,
    ),
    _Rule(
        "Anthropic API Key",
        re.compile(_BOUND + r"sk-ant-(?:[a-z]+\d*-)?[A-Za-z0-9_-]{32,}" + _END),
        _mixed_case_and_digits,
    ),
    _Rule(
        "OpenAI Token",
        re.compile(_BOUND + r"sk-(?!ant-)(?:(?:proj|svcacct|admin)-)?[A-Za-z0-9_-]{32,}" + _END),
        _mixed_case_and_digits,
    ),
    _Rule(
        "Slack Token",
        re.compile(_BOUND + r"xox[baprs]-\d{1,16}(?:-\d{1,16}){0,3}-[A-Za-z0-9]{16,}" + _END),
        _format_value,
    ),
    _Rule(
        "Slack Token",
        re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]{8,}/B[A-Z0-9]{8,}/[A-Za-z0-9]{24}" + _END),
        _format_value,
    ),
    _Rule(
        "GitLab Token",
        re.compile(
            _BOUND
            + r"(?:(?:glpat|gldt|glft|glsoat|glrt|glcbt|glimt|glptt|glagent|gloas)-|GR1348941)[A-Za-z0-9_-]{20,}"
            + _END
        ),
        _format_value,
    ),
    _Rule("Stripe Access Key", re.compile(_BOUND + r"[rs]k_live_[0-9A-Za-z]{24,}" + _END), _format_value),
    _Rule("Google API Key", re.compile(_BOUND + r"AIza[0-9A-Za-z_-]{35}" + _END), _format_value),
    _Rule("Hugging Face Token", re.compile(_BOUND + r"hf_[A-Za-z0-9]{34}" + _END), _mixed_case),
    _Rule(
        "Secret Keyword",
        re.compile(
            r"(?i)(?<![\w.-])(?P<name>[\w.-]*?" + _SECRET_NAME + r"[\w.-]*)"  # a variable, key or --flag
            r"[\"'\]]*[ \t]*(?::[ \t]*[\w.\[\], ]+?[ \t]*)?"  # a closing quote or bracket, a type annotation
            r"(?:=>|:=|==?|:)[ \t]*"
            r"(?:[bru]{0,2}(?P<q>[\"'`])(?P<value>[^\"'`\r\n]{1,1024}?)(?P=q)|(?P<bare>[^\s\"'`,;]{1,1024}))"
        ),
        _looks_random,
        prefilter=r"(?i)" + _SECRET_NAME + r"[^\s=:]*[ \t]*[=:]",
    ),
    _Rule(
        "Bearer Token", re.compile(r"(?<![\w-])[Bb]earer[ \t]+(?P<value>[A-Za-z0-9._~+/-]{16,1024}=*)"), _looks_random
    ),
    _Rule(
        "Basic Auth Credentials",
        re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s/:@\"'<>]+:(?P<value>[^\s/@\"'<>]+)@"),
        _looks_random,
    ),
)


@functools.cache
def _detect_secrets_plugins() -> tuple[list[str], list[str]]:
    """(plugin names used, RE2 prefilter patterns): detect-secrets' other vendor formats, RE2-safe and looser."""
    names, patterns = [], []
    for plugin in get_mapping_from_secret_type_to_class().values():
        if plugin.__name__ in _DETECT_SECRETS_REPLACED:
            continue
        names.append(plugin.__name__)
        if issubclass(plugin, RegexBasedDetector):
            patterns += [_re2_superset(p) for p in plugin().denylist]
    return sorted(names), patterns


def _re2_superset(pattern: re.Pattern) -> str:
    # RE2 has no lookaround and caps repetition at 1000: dropping lookarounds and upper bounds only
    # widens the match, so the prefilter still flags everything the real pattern would.
    text = re.sub(r"\(\?<?[=!](?:[^()]|\([^()]*\))*\)", "", pattern.pattern)
    text = re.sub(r"\{(\d+),\d{4,}\}", r"{\1,}", text)
    return ("(?i)" if pattern.flags & re.IGNORECASE and not text.startswith("(?i)") else "") + text


def _matching(array: pa.Array, patterns: list[str]) -> set[int]:
    mask = None
    for pattern in patterns:
        hits = pc.match_substring_regex(array, pattern)
        mask = hits if mask is None else pc.or_(mask, hits)
    return set() if mask is None else {int(i) for i in np.flatnonzero(mask.to_numpy(zero_copy_only=False))}


def _line_of(text: str, offset: int) -> int:
    return len((text[:offset] + "x").splitlines())


def _name_parts(name: str) -> set[str]:
    return {part.lower() for part in _NAME_PART.findall(name)}


def _rule_findings(text: str, known: list[str]) -> list[dict]:
    """Key formats first; then the generic rules, for values no format rule (nor `known`) holds already."""
    found = []
    for rule in sorted(_RULES, key=lambda r: r.generic):
        for match in rule.pattern.finditer(text):
            group = "value" if "value" in rule.pattern.groupindex else 0
            value, start = match.group(group), match.start(group)
            if value is None:  # an unquoted assignment
                value, start = match.group("bare").rstrip(".,:)]}>"), match.start("bare")
            if rule.generic:
                if rule.type == "Secret Keyword" and _NOT_THE_SECRET & _name_parts(match.group("name")):
                    continue
                if any(value in k or k in value for k in known):
                    continue
            if rule.accept(value):
                found.append({"type": rule.type, "line": _line_of(text, start), "value": value})
                known.append(value)
    return found


def _detect_secrets_findings(text: str) -> list[dict]:
    return [
        {"type": secret.type, "line": line_no, "value": secret.secret_value}
        for line_no, line in enumerate(text.splitlines(), 1)
        for secret in scan_line(line)
        if secret.secret_value and _format_value(secret.secret_value)
    ]


def find_secrets(texts: list[str]) -> dict[int, list[dict]]:
    """{record index: [{"type", "line", "value"}]} for records holding a secret, in line order."""
    if not texts:
        return {}
    names, ds_patterns = _detect_secrets_plugins()
    array = pa.array(texts, pa.large_string())
    by_detect_secrets = _matching(array, ds_patterns)
    by_rules = _matching(array, [r.prefilter or _re2_superset(r.pattern) for r in _RULES])
    found: dict[int, list[dict]] = {}
    with transient_settings({"plugins_used": [{"name": n} for n in names]}):
        for index in sorted(by_detect_secrets | by_rules):
            findings = _detect_secrets_findings(texts[index]) if index in by_detect_secrets else []
            if index in by_rules:
                findings += _rule_findings(texts[index], [f["value"] for f in findings])
            if findings:
                found[index] = sorted(findings, key=lambda f: f["line"])
    return found


def redact(record: dict, values: list[str]):
    def scrub(text: str) -> str:
        for value in sorted(values, key=len, reverse=True):  # a longer value may hold a shorter one
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
