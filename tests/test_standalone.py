"""The test suite stands on its own: no test reads ../shared (only bench/ may), so `make test` passes on a
fresh clone. Two guards: a static scan of every test module's code (strings and names, not comments) and
conftest's audit hook, which makes opening any file under ../shared (or $MICROGPT_SHARED) raise."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
from conftest import ROOT, SHAKESPEARE

TESTS = ROOT / "tests"
# a path with a `shared` component ("../shared", "shared/data/x.txt", Path / "shared"), or the env variable
SHARED_PATH = re.compile(r"(^|[/\\])shared([/\\]|$)")
MARKER = "shared-guard"  # conftest's own guard names the folder it forbids


def shared_references(source: str) -> list[str]:
    """`line: token` for each string or name in `source` that points at the shared folder."""
    found = []
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.STRING, tokenize.NAME, getattr(tokenize, "FSTRING_MIDDLE", -1)):
            continue
        if MARKER in lines[tok.start[0] - 1]:
            continue
        text = tok.string
        if tok.type == tokenize.STRING:
            text = re.sub(r"^[rbufRBUF]*('''|\"\"\"|'|\")|('''|\"\"\"|'|\")$", "", text)
        is_path = tok.type != tokenize.NAME and SHARED_PATH.search(text)
        if "MICROGPT_SHARED" in text or is_path:
            found.append(f"{tok.start[0]}: {tok.string}")
    return found


def test_the_scan_finds_every_way_of_naming_the_shared_folder():
    bad = {
        'p = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"': 1,
        "open('../shared/data/tinyshakespeare.txt')": 1,
        'os.environ.get("MICROGPT_SHARED")': 1,
        'x = f"{ROOT}/shared/data"': 1,
        "MICROGPT_SHARED = 1": 1,
    }
    for src, n in bad.items():
        assert len(shared_references(src + "\n")) == n, src
    fine = [
        "# values from ../shared/BENCHMARKS.md\nx = 1\n",  # a comment citing a source reads nothing
        'shared = make_model("mha")\n',  # a variable about shared weights
        '"""Shared fixtures; the config is shared."""\n',
    ]
    for src in fine:
        assert shared_references(src) == [], src


def test_no_test_module_references_the_shared_folder():
    offenders = {
        str(p.relative_to(ROOT)): refs
        for p in sorted(TESTS.rglob("*.py"))
        if p != Path(__file__)  # this module's strings are the scan's own examples
        and (refs := shared_references(p.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"tests must use tests/fixtures/, not ../shared: {offenders}"


def test_opening_a_file_under_the_shared_folder_fails_the_test(tmp_path):
    with pytest.raises(RuntimeError, match="tests must not read ../shared"):
        open(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt", encoding="utf-8")  # noqa: SIM115
    # a file elsewhere opens as usual
    (tmp_path / "ok.txt").write_text("ok", encoding="utf-8")
    assert (tmp_path / "ok.txt").read_text(encoding="utf-8") == "ok"


def test_the_corpus_fixture_is_in_the_repository_and_has_its_stated_content():
    assert SHAKESPEARE.is_relative_to(TESTS)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    # the numbers tests/fixtures/README.md states (counted once with `wc -c` and a set of its characters)
    assert len(text) == 320_060 and len(set(text)) == 63
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n")
    assert text.endswith("By all my hopes, most falsely doth he lie.\n")
