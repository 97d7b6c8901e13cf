"""A small Go text/template renderer: the subset Ollama's chat templates use, in pure Python.

Supported: text and {{ }} actions with {{- / -}} whitespace trimming, {{/* comments */}}, lookups
(. .Field $ $x $x.Field) on dicts, $x := / $x = variables, if / else if / else, range (with $i, $m
and else), with / else with, pipelines with |, string ("\n"), raw (`...`), int, true/false/nil
literals, and the functions eq ne and or not len slice index print printf.
Anything else raises GoTemplateError instead of rendering something Go would not.

One deliberate difference: a missing key renders as "" and tests false. Ollama passes structs, whose
unset fields are zero values; Go would print "<no value>" for a missing map key.
"""

from __future__ import annotations

import re

SPACE = " \t\r\n"
ACTION_END = re.compile(r"([ \t\r\n]+-)?\}\}")
TOKEN = re.compile(
    r"""(?P<space>\s+) | (?P<string>"(?:[^"\\\n]|\\.)*") | (?P<raw>`[^`]*`) | (?P<number>-?\d+(?![\w.]))
      | (?P<var>\$\w*(?:\.\w+)*) | (?P<field>(?:\.[A-Za-z_]\w*)+|\.(?![\w.])) | (?P<declare>:=) | (?P<assign>=)
      | (?P<punct>[|(),]) | (?P<ident>[A-Za-z_]\w*)""",
    re.X,
)
ESCAPE = re.compile(r'\\(?:([abfnrtv\\"])|x([0-9a-fA-F]{2})|([0-7]{3})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))', re.S)
SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
UNSUPPORTED = {"define", "template", "block", "break", "continue"}
CONSTANTS = {"true": True, "false": False, "nil": None}


class GoTemplateError(ValueError):
    pass


class Template:
    """A parsed Go template; render(data) executes it with data as both . and $."""

    def __init__(self, source: str):
        self.nodes = _Parser(_split(source)).body()[0]

    def render(self, data) -> str:
        out: list[str] = []
        scope = _Scope()
        scope.vars["$"] = data
        _run(self.nodes, data, scope, out)
        return "".join(out)


def render(source: str, data) -> str:
    return Template(source).render(data)


# --- lexing --------------------------------------------------------------------------------------


def _split(source: str) -> list[tuple]:
    """[("text", str, line) | ("action", tokens, line)], with trim markers applied and comments dropped."""
    items, pos, trim_next = [], 0, False
    while (start := source.find("{{", pos)) >= 0:
        line = source.count("\n", 0, start) + 1
        text, inner = source[pos:start], start + 2
        if trim_next:
            text = text.lstrip(SPACE)
        if source[inner : inner + 1] == "-" and source[inner + 1 : inner + 2] in tuple(SPACE):
            text, inner = text.rstrip(SPACE), inner + 2
        items.append(("text", text, line))
        tokens, end = _lex_action(source, inner, line)
        trim_next = end.group(1) is not None
        if tokens is not None:
            items.append(("action", tokens, line))
        pos = end.end()
    items.append(("text", source[pos:].lstrip(SPACE) if trim_next else source[pos:], 0))
    return [item for item in items if item[0] == "action" or item[1]]


def _lex_action(source: str, pos: int, line: int) -> tuple[list[tuple[str, str]] | None, re.Match]:
    """The action's tokens (None for a comment) and the match of its closing delimiter."""
    if source.startswith("/*", pos):
        close = source.find("*/", pos + 2)
        if close >= 0 and (end := ACTION_END.match(source, close + 2)):
            return None, end
        raise GoTemplateError(f"line {line}: unclosed comment (a comment must end with */}} or */ -}})")
    tokens = []
    while pos < len(source):
        if end := ACTION_END.match(source, pos):
            if not tokens:
                raise GoTemplateError(f"line {line}: empty action")
            return tokens, end
        token = TOKEN.match(source, pos)
        if not token:
            raise GoTemplateError(f"line {line}: unexpected {source[pos : pos + 12]!r} in action")
        if token.lastgroup == "field" and source[pos - 1] == ")":
            raise GoTemplateError(
                f"line {line}: a field of a parenthesized pipeline, (...){token.group()}, is not supported"
            )
        if token.lastgroup != "space":
            tokens.append((token.lastgroup, token.group()))
        pos = token.end()
    raise GoTemplateError(f"line {line}: unclosed action")


def _unquote(kind: str, text: str, line: int) -> str:
    if kind == "raw":
        return text[1:-1]

    def escape(m: re.Match) -> str:
        simple, hex2, octal, hex4, hex8, unknown = m.groups()
        if unknown is not None:
            raise GoTemplateError(f"line {line}: unknown escape sequence \\{unknown} in {text}")
        if simple:
            return SIMPLE_ESCAPES[simple]
        code = int(hex2 or octal or hex4 or hex8, 8 if octal else 16)
        if (hex2 or octal) and code > 0x7F:
            raise GoTemplateError(f"line {line}: byte escapes above 0x7f are not supported in {text}")
        return chr(code)

    return ESCAPE.sub(escape, text[1:-1])


# --- parsing -------------------------------------------------------------------------------------
# Nodes: ("text", s) | ("action", pipe) | ("if"/"with", [(pipe, body)...], else_body) | ("range", pipe, body, else_body)
# A pipe is (variables, declare_or_assign, commands); a command is a list of operands.


class _Parser:
    def __init__(self, items: list[tuple]):
        self.items, self.i = items, 0

    def body(self, closed: bool = False) -> tuple[list, list | None, int]:
        """The nodes up to the {{end}} or {{else}} that closes them (closed) or to the end of the template."""
        nodes = []
        while self.i < len(self.items):
            kind, value, line = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(("text", value))
                continue
            word = value[0][1] if value[0][0] == "ident" else None
            if word in ("end", "else"):
                if not closed:
                    raise GoTemplateError(f"line {line}: unexpected {{{{{word}}}}}")
                return nodes, value, line
            if word in UNSUPPORTED:
                raise GoTemplateError(f"line {line}: {{{{{word}}}}} is not supported")
            nodes.append(
                self.control(word, value[1:], line)
                if word in ("if", "with", "range")
                else ("action", _pipe(value, line))
            )
        if closed:
            raise GoTemplateError("unexpected end of template: missing {{end}}")
        return nodes, None, 0

    def control(self, word: str, tokens: list, line: int) -> tuple:
        branches, else_body = [], None
        while True:
            pipe = _pipe(tokens, line, max_vars=2 if word == "range" else 1)
            body, closer, line = self.body(closed=True)
            branches.append((pipe, body))
            if closer[0][1] == "else" and len(closer) > 2 and closer[1] == ("ident", word) and word != "range":
                tokens = closer[2:]
                continue
            if closer[0][1] == "else":
                if len(closer) > 1:
                    raise GoTemplateError(f"line {line}: unexpected {' '.join(t for _, t in closer)} in {{{{{word}}}}}")
                else_body, closer, line = self.body(closed=True)
                if closer[0][1] == "else":
                    raise GoTemplateError(f"line {line}: {{{{else}}}} after {{{{else}}}}")
            if len(closer) > 1:
                raise GoTemplateError(f"line {line}: {{{{end}}}} takes no arguments")
            if word == "range":
                return ("range", branches[0][0], branches[0][1], else_body)
            return (word, branches, else_body)


def _pipe(tokens: list, line: int, max_vars: int = 1) -> tuple:
    names, mode = [], None
    operators = [i for i, t in enumerate(tokens) if t[0] in ("declare", "assign")]
    if operators:
        split = operators[0]
        names = [t for i, t in enumerate(tokens[:split]) if i % 2 == 0]
        commas = [t for i, t in enumerate(tokens[:split]) if i % 2 == 1]
        if (
            not names
            or len(names) > max_vars
            or any(k != "var" or "." in n for k, n in names)
            or any(c != ("punct", ",") for c in commas)
        ):
            raise GoTemplateError(
                f"line {line}: bad variable declaration {' '.join(t for _, t in tokens[: split + 1])}"
            )
        mode, tokens = tokens[split][0], tokens[split + 1 :]
    commands, current, depth = [], [], 0
    for token in tokens:
        depth += {"(": 1, ")": -1}.get(token[1], 0) if token[0] == "punct" else 0
        if token == ("punct", "|") and depth == 0:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    if depth != 0:
        raise GoTemplateError(f"line {line}: unbalanced parentheses")
    return [n for _, n in names], mode, [_operands(c, line) for c in commands]


def _operands(tokens: list, line: int) -> list[tuple]:
    if not tokens:
        raise GoTemplateError(f"line {line}: missing command in pipeline")
    operands, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        if (kind, text) == ("punct", "("):
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j][1], 0) if tokens[j][0] == "punct" else 0
                j += 1
            operands.append(("pipe", _pipe(tokens[i + 1 : j - 1], line)))
            i = j
            continue
        if kind in ("string", "raw"):
            operands.append(("const", _unquote(kind, text, line)))
        elif kind == "number":
            operands.append(("const", int(text)))
        elif kind == "var":
            name, *fields = text.split(".")
            operands.append(("var", name, fields))
        elif kind == "field":
            operands.append(("field", [f for f in text.split(".") if f]))
        elif (kind, text) == ("ident", "nil") and not operands:
            raise GoTemplateError(f"line {line}: nil is not a command")
        elif kind == "ident" and text in CONSTANTS:
            operands.append(("const", CONSTANTS[text]))
        elif kind == "ident" and text in FUNCTIONS and not operands:
            operands.append(("func", text))
        else:
            raise GoTemplateError(f"line {line}: unexpected {text!r} (unknown function or keyword in this position)")
        i += 1
    return operands


# --- execution -----------------------------------------------------------------------------------


class _Scope:
    def __init__(self, parent: _Scope | None = None):
        self.vars, self.parent = {}, parent

    def owner(self, name: str) -> dict:
        """The variables of the innermost scope that declares name."""
        scope = self
        while scope is not None and name not in scope.vars:
            scope = scope.parent
        if scope is None:
            raise GoTemplateError(f"undefined variable: {name}")
        return scope.vars


def _run(nodes: list, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            value = _eval_pipe(node[1], dot, scope)
            if not node[1][1]:  # an action that declares or assigns prints nothing
                out.append(_to_str(value))
        elif kind == "range":
            _run_range(node, dot, scope, out)
        else:
            _run_branches(kind, node[1], node[2], dot, scope, out)


def _run_branches(kind: str, branches: list, else_body, dot, scope: _Scope, out: list[str]) -> None:
    inner = _Scope(scope)
    for pipe, body in branches:
        value = _eval_pipe(pipe, dot, inner)
        if _truth(value):
            _run(body, value if kind == "with" else dot, inner, out)
            return
    if else_body is not None:
        _run(else_body, dot, inner, out)


def _run_range(node: tuple, dot, scope: _Scope, out: list[str]) -> None:
    _, (names, mode, commands), body, else_body = node
    items = _eval_pipe(([], None, commands), dot, scope)
    if isinstance(items, dict):
        pairs = [(k, items[k]) for k in sorted(items)]
    elif isinstance(items, (list, tuple)):
        pairs = list(enumerate(items))
    elif items is None:
        pairs = []
    else:
        raise GoTemplateError(f"range can't iterate over {_to_str(items)!r}")
    if mode == "assign":
        raise GoTemplateError("range variables must be declared with :=")
    for key, element in pairs:
        inner = _Scope(scope)
        values = [element] if len(names) == 1 else [key, element]
        inner.vars.update(zip(names, values))
        _run(body, element, inner, out)
    if not pairs and else_body is not None:
        _run(else_body, dot, _Scope(scope), out)


def _eval_pipe(pipe: tuple, dot, scope: _Scope):
    names, mode, commands = pipe
    value, piped = None, False
    for command in commands:
        value, piped = _eval_command(command, dot, scope, value if piped else _NOTHING), True
    for name in names:
        (scope.vars if mode == "declare" else scope.owner(name))[name] = value
    return value


_NOTHING = object()


def _eval_command(operands: list, dot, scope: _Scope, piped):
    first = operands[0]
    if first[0] != "func":
        if len(operands) > 1 or piped is not _NOTHING:
            raise GoTemplateError(f"can't give an argument to a non-function ({first[0]} {first[1]!r})")
        return _eval_operand(first, dot, scope)
    args = [lambda o=o: _eval_operand(o, dot, scope) for o in operands[1:]]
    if piped is not _NOTHING:
        args.append(lambda: piped)
    name = first[1]
    if name in ("and", "or"):  # Go 1.18+: short-circuit, returning the deciding argument itself
        if not args:
            raise GoTemplateError(f"{name}: missing arguments")
        for arg in args:
            value = arg()
            if _truth(value) != (name == "and"):
                return value
        return value
    return FUNCTIONS[name](*[arg() for arg in args])


def _eval_operand(operand: tuple, dot, scope: _Scope):
    kind = operand[0]
    if kind == "const":
        return operand[1]
    if kind == "pipe":
        return _eval_pipe(operand[1], dot, scope)
    value, fields = (scope.owner(operand[1])[operand[1]], operand[2]) if kind == "var" else (dot, operand[1])
    for field in fields:
        value = _field(value, field)
    return value


def _field(value, name: str):
    if isinstance(value, dict):
        return value.get(name)
    if value is None:
        return None
    raise GoTemplateError(f"can't evaluate field {name} in type {type(value).__name__}")


# --- values and functions ------------------------------------------------------------------------


def _truth(value) -> bool:
    return bool(value) if isinstance(value, (type(None), bool, int, float, str, list, tuple, dict)) else True


def _to_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_to_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_to_str(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    raise GoTemplateError(f"non-comparable value {_to_str(value)!r}")


def _comparable(a, b) -> None:
    if _kind(a) != _kind(b):
        raise GoTemplateError(f"incompatible types for comparison: {_to_str(a)!r} and {_to_str(b)!r}")


def _eq(first, *others) -> bool:
    if not others:
        raise GoTemplateError("eq: missing argument for comparison")
    for other in others:
        if first is None or other is None:
            if first is other:
                return True
            continue
        _comparable(first, other)
        if first == other:
            return True
    return False


def _len(value) -> int:
    if not isinstance(value, (str, list, tuple, dict)):
        raise GoTemplateError(f"len of {_to_str(value)!r}: not a string, slice or map")
    return len(value.encode("utf-8")) if isinstance(value, str) else len(value)  # Go counts bytes


def _index(value, *keys):
    for key in keys:
        value = value.encode("utf-8") if isinstance(value, str) else value  # Go indexes a string's bytes
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, (list, tuple, bytes)) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            raise GoTemplateError(f"index {key!r} out of range or not indexable")
    return value


def _slice(value, *bounds):
    if not isinstance(value, (str, list, tuple)) or len(bounds) > 2:
        raise GoTemplateError("slice: needs a string or a slice and at most two indexes")
    items = value.encode("utf-8") if isinstance(value, str) else value  # Go slices a string's bytes
    start, end = (list(bounds) + [0, len(items)][len(bounds) :])[:2]
    if not (0 <= start <= end <= len(items)):
        raise GoTemplateError(f"slice: indexes {start}:{end} out of range for length {len(items)}")
    return items[start:end].decode("utf-8", errors="replace") if isinstance(value, str) else items[start:end]


def _print(*args) -> str:
    text = ""
    for i, arg in enumerate(args):  # fmt.Sprint: a space only between two operands that are not strings
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            text += " "
        text += _to_str(arg)
    return text


def _printf(fmt: str, *args) -> str:
    if unsupported := set(re.findall(r"%([^%svdq])", fmt)):
        raise GoTemplateError(f"printf: verbs {sorted(unsupported)} are not supported (only %s %v %d %q %%)")
    queue = list(args)

    def verb(m: re.Match) -> str:
        if m.group() == "%%":
            return "%"
        if not queue:
            return f"%!{m.group()[1]}(MISSING)"
        value = queue.pop(0)
        return {
            "q": lambda: '"' + _to_str(value).replace("\\", "\\\\").replace('"', '\\"') + '"',
            "d": lambda: str(int(value)),
        }.get(m.group()[1], lambda: _to_str(value))()

    text = re.sub(r"%.", verb, fmt)
    return text + "".join(f"%!(EXTRA {_to_str(v)})" for v in queue)


FUNCTIONS = {
    "and": None,
    "or": None,
    "not": lambda value: not _truth(value),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": _print,
    "printf": _printf,
}
