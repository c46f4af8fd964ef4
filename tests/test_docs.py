"""The documentation: README.md stays a short front door, every link in README.md and
docs/*.md resolves, and docs/errors.md lists exactly the errors tests/test_bad_inputs.py checks
(and tests/test_distill_inputs.py's ``DISTILL_BAD``).

The error check runs every case of test_bad_inputs.py's ``BAD`` / ``TL_BAD`` tables (tiny CPU
tensors) and compares the messages they actually produce with the message column of the tables
in docs/errors.md, both ways:

- every documented message is what some case produces (``...`` in the docs stands for the
  elided rest), with the documented error type; a message no table case produces must at
  least be matched by a ``pytest.raises(match=...)`` elsewhere in test_bad_inputs.py;
- every case's expected message (its regex) matches a documented message, with that type.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
ERRORS = os.path.join(REPO, "docs", "errors.md")
BAD_INPUTS = os.path.join(REPO, "tests", "test_bad_inputs.py")
#: distill_loss's case table (``DISTILL_BAD``, run through its ``call_bad``), checked like BAD
DISTILL_INPUTS = os.path.join(REPO, "tests", "test_distill_inputs.py")
DOC_FILES = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

README_MAX_LINES = 250
INSTALL_DEMO = 'pip install torch==2.13.0 && pip install -e ".[demo]" && python -m grpo_kernels.demo'
INSTALL_TESTS = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -m "not slow"'


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked out."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


# ------------------------------------------------------------------ README


def test_readme_is_a_short_front_door_starting_with_the_two_commands():
    text = read(README)
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    first = FENCE.search(text)
    assert first is not None, "README.md has no code block"
    assert text[: first.start()].count("\n") <= 3, "the commands block must come first, right after the title"
    commands = [line.strip() for line in first.group(0).splitlines()]
    assert INSTALL_DEMO in commands, f"README.md's first code block lacks {INSTALL_DEMO!r}"
    assert INSTALL_TESTS in commands, f"README.md's first code block lacks {INSTALL_TESTS!r}"
    assert commands.index(INSTALL_DEMO) < commands.index(INSTALL_TESTS), "the demo command comes first"


# ------------------------------------------------------------------ links


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set:
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", read(path)), re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_relative_links_point_to_existing_files_and_headings(doc):
    text = read(doc)
    targets = LINK.findall(without_code(text))
    broken = []
    for target in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {rel(dest)}")
        elif not os.path.commonpath([REPO, dest]) == REPO:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_named_repository_files_exist(doc):
    """A .md file named anywhere (code included), or a repository file path in backticks
    (`tests/test_parity.py`), must exist: the docs refer to nothing outside the repository."""
    text = read(doc)
    missing = []
    for name in sorted(set(re.findall(r"(?<![\w/.-])([\w./-]*\w\.md)\b", text))):
        here, root = os.path.join(os.path.dirname(doc), name), os.path.join(REPO, name)
        if not (os.path.exists(here) or os.path.exists(root)):
            missing.append(name)
    for name in sorted(set(re.findall(r"`((?:grpo_kernels|tests|bench|csrc|docs|\.ci)/[\w/.-]*\.\w+)`", text))):
        if not os.path.exists(os.path.join(REPO, name)):
            missing.append(name)
    assert not missing, f"{rel(doc)} names files that do not exist: {missing}"


# ------------------------------------------------------------------ docs/errors.md vs tests/test_bad_inputs.py


def cells(line: str) -> list:
    """The cells of a markdown table row; a '|' inside a code span does not split."""
    out, cur, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def documented_errors(text: str) -> list:
    """(row, error cell, [messages]) for every row of a table with 'error' and 'message' columns;
    the messages are the code spans of the message cell."""
    rows, header = [], None
    for line in FENCE.sub("", text).splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = [c.lower() for c in row]
        elif not set(line) <= set("|-: ") and "error" in header and "message" in header:
            rows.append((line, row[header.index("error")], re.findall(r"`([^`]+)`", row[header.index("message")])))
    return rows


def wildcard(message: str) -> str:
    """A documented message as a regex: literal, except that ``...`` stands for any text."""
    return re.escape(message).replace(re.escape("..."), ".+?")


@pytest.fixture(scope="module")
def bad_inputs():
    """A private copy of tests/test_bad_inputs.py (loaded by path, so its DEVICE can be set
    to the CPU without touching the module pytest collects)."""
    spec = importlib.util.spec_from_file_location("_test_docs_bad_inputs", BAD_INPUTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for table in ("BAD", "TL_BAD"):
        assert isinstance(getattr(mod, table, None), list), f"tests/test_bad_inputs.py has no case table {table}"
    mod.DEVICE = "cpu"  # the messages in the docs name the CPU
    spec = importlib.util.spec_from_file_location("_test_docs_distill", DISTILL_INPUTS)
    mod.DISTILL = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod.DISTILL)
    mod.DISTILL_BAD = mod.DISTILL.DISTILL_BAD
    return mod


def produced(mod) -> dict:
    """{case id: (exception type, message)} of every table case, run as test_bad_inputs runs it."""
    out = {}

    def run(key, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- whatever it raises is what the docs must say
            out[key] = (type(e), str(e))

    for name, make, _, _ in mod.BAD:
        b = mod.batch(device="cpu")
        run(("BAD", name), lambda: mod.call(b, **make(b)))
    for name, make, _, _ in mod.TL_BAD:
        b = mod.batch(device="cpu")
        args = dict(hidden=b["hidden"], weight=b["weight"], targets=b["targets"])
        kw = make(b)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        run(("TL_BAD", name), lambda: mod.token_logprobs(args["hidden"], args["weight"], args["targets"], **kw))
    for name, overrides, _, _ in mod.DISTILL_BAD:
        run(("DISTILL_BAD", name), lambda: mod.DISTILL.call_bad(overrides))
    return out


def other_match_patterns() -> list:
    """The ``match=`` regexes of pytest.raises calls in tests/test_bad_inputs.py (outside the tables)."""
    out = []
    for node in ast.walk(ast.parse(read(BAD_INPUTS))):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "match" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    out.append(kw.value.value)
    return out


def test_every_documented_error_message_is_one_a_test_produces(bad_inputs):
    rows = documented_errors(read(ERRORS))
    assert len(rows) >= 40, f"found only {len(rows)} rows with an error and a message in docs/errors.md"
    actual = produced(bad_inputs)
    others = other_match_patterns()
    wrong = []
    for line, error, messages in rows:
        assert messages, f"docs/errors.md row without a `message`: {line}"
        for message in messages:
            producers = [t for t, text in actual.values() if re.fullmatch(wildcard(message), text)]
            if producers:
                if not any(t.__name__ in error for t in producers):
                    wrong.append(f"{message!r}: documented as {error}, raised as "
                                 f"{sorted({t.__name__ for t in producers})}")
            elif not any(re.search(p, message) for p in others):
                wrong.append(f"{message!r}: no case of tests/test_bad_inputs.py produces or asserts it")
    assert not wrong, "docs/errors.md disagrees with tests/test_bad_inputs.py:\n" + "\n".join(wrong)


def test_every_tested_error_is_documented(bad_inputs):
    rows = documented_errors(read(ERRORS))
    missing = []
    for table in ("BAD", "TL_BAD", "DISTILL_BAD"):
        for name, _, exc, pattern in getattr(bad_inputs, table):
            types = [error for _, error, messages in rows if any(re.search(pattern, m) for m in messages)]
            if not any(exc.__name__ in error for error in types):
                missing.append(f"{table} {name}: {exc.__name__} matching {pattern!r}"
                               + (f" (documented only as {types})" if types else ""))
    assert not missing, "tests/test_bad_inputs.py cases not listed in docs/errors.md:\n" + "\n".join(missing)
