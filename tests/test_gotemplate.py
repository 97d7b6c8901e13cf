"""The Go text/template renderer against known Go behaviour (outputs as Go's text/template gives them)."""

from __future__ import annotations

import pytest

from lm.gotemplate import GoTemplateError, Template, render


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{{23 -}} < {{- 45}}", "23<45"),  # the example in Go's text/template docs
        ("a \n\t{{- 1 }} \n b", "a1 \n b"),
        ("a {{ 1 -}} \n\r\t b", "a 1b"),
        ("a{{/* a comment */}}b", "ab"),
        ("a \n{{- /* a comment */ -}}\n b", "ab"),
        ("{{ `raw\\n{{` }}", "raw\\n{{"),
        ('{{ "tab\\tnew\\nquote\\"\\u00e9" }}', 'tab\tnew\nquote"é'),
        ("{{ -3 }}{{ true }}{{ eq .Missing nil }}", "-3truetrue"),
    ],
)
def test_text_trim_comments_and_literals(source, expected):
    assert render(source, {}) == expected


def test_range_with_index_and_element():
    data = {"M": [{"Name": "a"}, {"Name": "b"}], "Title": "T"}
    assert (
        render("{{ range $i, $m := .M }}{{ $i }}={{ $m.Name }}/{{ .Name }}/{{ $.Title }} {{ end }}", data)
        == "0=a/a/T 1=b/b/T "
    )
    assert render("{{ range $m := .M }}{{ $m.Name }}{{ end }}", data) == "ab"


@pytest.mark.parametrize("items, expected", [([1, 2], "[1][2]"), ([], "empty"), (None, "empty")])
def test_range_else(items, expected):
    assert render("{{ range .Items }}[{{ . }}]{{ else }}empty{{ end }}", {"Items": items}) == expected


@pytest.mark.parametrize("role, expected", [("user", "U"), ("assistant", "A"), ("tool", "other")])
def test_if_else_if_else(role, expected):
    source = '{{ if eq .Role "user" }}U{{ else if eq .Role "assistant" }}A{{ else }}other{{ end }}'
    assert render(source, {"Role": role}) == expected


@pytest.mark.parametrize("value, expected", [("a", "yes"), ("c", "yes"), ("d", "no")])
def test_eq_takes_several_arguments(value, expected):
    assert render('{{ if eq .X "a" "b" "c" }}yes{{ else }}no{{ end }}', {"X": value}) == expected


def test_variables_declare_and_assign_across_range():
    source = '{{ $s := "none" }}{{ range .M }}{{ $s = . }}{{ end }}{{ $s }}{{ $x := 5 }}{{ $x }}'
    assert render(source, {"M": ["a", "b"]}) == "b5"


def test_missing_fields_are_empty_and_false():
    source = "[{{ .Nope }}][{{ .A.B.C }}]{{ if .Nope }}yes{{ else }}no{{ end }}{{ if not .Nope }}!{{ end }}"
    assert render(source, {"A": {}}) == "[][]no!"


def test_with_sets_dot_and_has_else():
    source = "{{ with .A }}<{{ .B }}>{{ else }}none{{ end }}"
    assert render(source, {"A": {"B": "x"}}) == "<x>"
    assert render(source, {"A": {}}) == "none"
    assert render("{{ with $v := .A }}{{ $v }}{{ end }}", {"A": "y"}) == "y"


def test_and_or_return_the_deciding_argument():
    assert (
        render('{{ and 1 0 }}|{{ and 1 2 }}|{{ or 0 "" "z" }}|{{ or 0 "" }}|{{ not "" }}|{{ ne 1 2 }}', {})
        == "0|2|z||true|true"
    )


def test_len_slice_index_print_printf_and_pipelines():
    data = {"M": ["a", "b", "c"], "D": {"k": "v"}}
    assert (
        render('{{ len .M }} {{ index .M 1 }} {{ slice .M 1 }} {{ slice .M 0 2 }} {{ index .D "k" }}', data)
        == "3 b [b c] [a b] v"
    )
    assert (
        render('{{ printf "%s-%d-%q" "a" 3 "b" }}|{{ print 1 2 "a" 3 }}|{{ "x" | printf "<%s>" }}|{{ .M | len }}', data)
        == 'a-3-"b"|1 2a3|<x>|3'
    )


def test_ollamas_last_message_idiom():
    source = (
        "{{ range $i, $_ := .M }}{{ $last := eq (len (slice $.M $i)) 1 }}"
        "{{ . }}{{ if $last }}!{{ else }},{{ end }}{{ end }}"
    )
    assert render(source, {"M": ["a", "b", "c"]}) == "a,b,c!"


def test_a_parsed_template_renders_many_times():
    template = Template("{{ .X }}")
    assert [template.render({"X": n}) for n in (1, 2)] == ["1", "2"]


@pytest.mark.parametrize(
    "source, message",
    [
        ('{{ template "x" }}', "not supported"),
        ("{{ range .M }}{{ break }}{{ end }}", "not supported"),
        ("{{ foo }}", "unknown function"),
        ("{{ if .A }}open", "missing {{end}}"),
        ("{{ end }}", "unexpected {{end}}"),
        ("{{ else }}", "unexpected {{else}}"),
        ("{{ 1.5 }}", "unexpected"),
        ("{{ .A", "unclosed action"),
        ("{{/* never closed }}", "unclosed comment"),
        ('{{ "\\q" }}', "unknown escape"),
        ('{{ eq 1 "a" }}', "incompatible types"),
        ("{{ $nope }}", "undefined variable"),
        ("{{ (len .M).X }}", "not supported"),
        ("{{ .A 1 }}", "non-function"),
        ("{{ }}", "empty action"),
        ("{{ nil }}", "nil is not a command"),
        ('{{ printf "%5.2f" 1 }}', "not supported"),
    ],
)
def test_unknown_or_invalid_syntax_raises(source, message):
    with pytest.raises(GoTemplateError, match=message.replace("{", r"\{").replace("(", r"\(")):
        render(source, {"A": "x", "M": [1]})
