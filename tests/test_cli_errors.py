"""Bad input on the command line: one `error:` line naming what to fix, exit status 2, and nothing written.

Each case is a real `python train.py ...` (or `-m microgpt.generate/evaluate`) subprocess that differs
from a working command in one setting or one input file. The subprocesses cost seconds of imports each,
so a module fixture starts all selected cases at once on a small thread pool; each test then checks its
own result.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CONF, run_cli

pytestmark = pytest.mark.slow

TIMEOUT = 300
BUILTIN_ATTENTION = ("mha", "gqa", "mqa", "sliding")


@dataclass(frozen=True)
class Case:
    """`overrides` change a working nano run on a small text; `{d}` is the folder holding the input files."""

    overrides: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # what the error line must mention (after formatting with d=...)
    module: str | None = None  # run `python -m MODULE` instead of train.py (no base overrides then)
    hydra_group: str | None = None  # an unknown option of this group: Hydra's own error, not ours
    kind: str = "error"


CASES: dict[str, Case] = {
    # composition: Hydra's own error, on one line with the options that exist
    "unknown-preset": Case(("model=bogus",), hydra_group="model"),
    "unknown-plugin": Case(("+plugin=bogus",), hydra_group="plugin"),
    "unknown-strategy": Case(("strategy=horovod",), hydra_group="strategy"),
    "unknown-top-level-key": Case(("foo=1",), ("foo", "+foo=1")),
    # the model
    "unknown-attention": Case(("model.attention=bogus",), ("bogus", "attention", *BUILTIN_ATTENTION)),
    "unknown-model-key": Case(("+model.n_layerz=3",), ("n_layerz",)),
    "embd-not-divisible-by-heads": Case(("model.n_embd=100", "model.n_head=3"), ("n_embd", "n_head")),
    "heads-not-divisible-by-kv-heads": Case(
        ("model.n_head=4", "model.n_kv_head=3", "model.attention=gqa"), ("n_head", "n_kv_head")
    ),
    # training settings
    "lr-zero": Case(("optimizer.lr=0",), ("optimizer.lr",)),
    "lr-negative": Case(("optimizer.lr=-1",), ("optimizer.lr",)),
    "batch-size-zero": Case(("data.batch_size=0",), ("data.batch_size",)),
    "max-steps-zero": Case(("trainer.max_steps=0",), ("trainer.max_steps",)),
    "seed-not-an-integer": Case(("seed=abc",), ("seed", "abc")),
    "val-check-interval-zero": Case(("trainer.val_check_interval=0",), ("trainer.val_check_interval",)),
    # where the run goes: /sys is read-only (for root too)
    "read-only-run-dir": Case(("hydra.run.dir=/sys/microgpt-run",), ("/sys/microgpt-run",)),
    # data files
    "missing-file": Case(("data.path={d}/missing.txt",), ("{d}/missing.txt",)),
    "empty-file": Case(("data.path={d}/empty.txt",), ("{d}/empty.txt",)),
    "binary-file": Case(("data.path={d}/binary.txt",), ("{d}/binary.txt",)),
    "latin1-file": Case(("data.path={d}/latin1.txt",), ("{d}/latin1.txt",)),
    "shorter-than-a-block": Case(("data.path={d}/short.txt",), ("block_size",)),
    # checkpoints
    "missing-checkpoint": Case(("ckpt_path=/nonexistent.ckpt",), ("/nonexistent.ckpt",)),
    "corrupt-checkpoint": Case(("ckpt_path={d}/corrupt.ckpt",), ("{d}/corrupt.ckpt",)),
    "resume-different-shape": Case(("model.n_embd=64",), ("n_embd",), kind="resume"),
    # the other CLIs
    "generate-missing-checkpoint": Case(("ckpt=/nonexistent",), ("/nonexistent",), module="microgpt.generate"),
    "generate-no-checkpoint": Case((), ("ckpt=",), module="microgpt.generate"),
    "generate-device-unavailable": Case(
        ("ckpt=/nonexistent", "device=cuda:99"), ("cuda:99",), module="microgpt.generate"
    ),
    "generate-max-new-tokens-not-a-number": Case(
        ("ckpt=/nonexistent", "max_new_tokens=abc"), ("max_new_tokens", "abc"), module="microgpt.generate"
    ),
    "generate-temperature-nan": Case(
        ("ckpt=/nonexistent", "temperature=nan"), ("temperature",), module="microgpt.generate"
    ),
    "generate-temperature-negative": Case(
        ("ckpt=/nonexistent", "temperature=-1"), ("temperature", "-1"), module="microgpt.generate"
    ),
    "generate-top-k-negative": Case(("ckpt=/nonexistent", "top_k=-1"), ("top_k", "-1"), module="microgpt.generate"),
    "generate-num-samples-zero": Case(
        ("ckpt=/nonexistent", "num_samples=0"), ("num_samples",), module="microgpt.generate"
    ),
    "generate-missing-prompt-file": Case(
        ("ckpt=/nonexistent", "prompt_file={d}/missing.txt"), ("{d}/missing.txt",), module="microgpt.generate"
    ),
    "generate-prompt-hydra-cannot-lex": Case(
        ("ckpt=/nonexistent", "prompt=it's"), ("prompt=it's", "prompt_file=", "prompt=-"), module="microgpt.generate"
    ),
    "export-no-out": Case(("ckpt={d}/corrupt.ckpt",), ("out",), module="microgpt.export"),
    "report-read-only-out": Case(
        ("model={d}/corrupt.ckpt", "out=/sys/microgpt-report", "png=false"),
        ("/sys/microgpt-report",),
        module="microgpt.report",
    ),
    "consolidate-read-only-out": Case(
        ("ckpt={d}/sharded", "out=/sys/microgpt/c.ckpt"), ("/sys/microgpt",), module="microgpt.consolidate"
    ),
    "evaluate-corrupt-checkpoint": Case(
        ("ckpt={d}/corrupt.ckpt", "data=text", "data.path={d}/small.txt"),
        ("{d}/corrupt.ckpt",),
        module="microgpt.evaluate",
    ),
}


@dataclass
class Result:
    proc: subprocess.CompletedProcess
    case_dir: Path
    first: subprocess.CompletedProcess | None = None  # resume: the run that wrote the checkpoint
    ckpts_before: dict[str, str] = field(default_factory=dict)
    ckpts_after: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return f"--- rc={self.proc.returncode}\n--- stdout:\n{self.proc.stdout}\n--- stderr:\n{self.proc.stderr}"


def _merge(base: list[str], overrides: list[str]) -> list[str]:
    """Hydra overrides: a later `key=value` replaces the earlier one for the same key."""
    out = {o.partition("=")[0]: o for o in base}
    for o in overrides:
        out[o.partition("=")[0]] = o
    return list(out.values())


def _checkpoints(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and (p.suffix == ".ckpt" or "checkpoints" in p.relative_to(run_dir).parts)
    }


def _train_args(d: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    base = ["model=nano", "debug=fast", "data=text", f"data.path={d}/small.txt", f"hydra.run.dir={run_dir}"]
    return ["train.py", *_merge(base, overrides)]


def _run_case(name: str, case: Case, d: Path) -> Result:
    case_dir = d / "cases" / name
    case_dir.mkdir(parents=True)
    overrides = [o.format(d=d) for o in case.overrides]
    env = {"OMP_NUM_THREADS": "1"}
    if case.module:
        # run from an empty folder: generate/evaluate must leave nothing behind in the working directory
        proc = run_cli(["-m", case.module, *overrides], timeout=TIMEOUT, cwd=case_dir, env=env)
        return Result(proc, case_dir)
    run_dir = case_dir / "run"
    if case.kind == "resume":
        first = run_cli(_train_args(d, run_dir, ["trainer.max_steps=2"]), timeout=TIMEOUT, env=env)
        before = _checkpoints(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        args = _train_args(d, run_dir, ["trainer.max_steps=4", f"ckpt_path={ckpt}", *overrides])
        proc = run_cli(args, timeout=TIMEOUT, env=env)
        return Result(proc, case_dir, first, before, _checkpoints(run_dir))
    return Result(run_cli(_train_args(d, run_dir, overrides), timeout=TIMEOUT, env=env), case_dir)


def _write_inputs(d: Path, shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    (d / "small.txt").write_text(text[:20_000], encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    # long enough that being binary / not UTF-8 is the only thing wrong with them
    (d / "binary.txt").write_bytes(text[:5_000].encode("utf-8") + b"\x00\x01\x02\xff\x00" + text[5_000:10_000].encode())
    (d / "latin1.txt").write_bytes(("Café, naïve façade; señor.\n" * 400).encode("latin-1"))
    (d / "short.txt").write_text("hello world\n", encoding="utf-8")  # 12 chars < block_size + 1 = 33
    (d / "corrupt.ckpt").write_bytes(random.Random(0).randbytes(4096))
    (d / "sharded").mkdir()
    (d / "sharded" / ".metadata").write_bytes(b"")  # looks like an FSDP (distcp) checkpoint directory


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, shakespeare) -> dict[str, Future]:
    selected = {
        item.callspec.params["cli_case"]
        for item in request.session.items
        if hasattr(item, "callspec") and "cli_case" in item.callspec.params
    }
    d = tmp_path_factory.mktemp("cli-errors")
    _write_inputs(d, shakespeare)
    # the resume case runs two processes in a row: start it first
    order = sorted(selected, key=lambda n: CASES[n].kind != "resume")
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    futures = {name: pool.submit(_run_case, name, CASES[name], d) for name in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _assert_one_error_line(r: Result, names: list[str]) -> str:
    out = r.proc.stdout + r.proc.stderr
    assert r.proc.returncode == 2, r.output
    assert "Traceback" not in out, r.output
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    assert lines[0] in r.proc.stderr.splitlines(), r.output  # errors go to stderr
    for n in names:
        assert n in lines[0], f"the error line does not name {n!r}:\n{r.output}"
    return lines[0]


def _assert_hydra_unknown_option(r: Result, group: str, bad: str) -> None:
    """Hydra's message, on one line: what was not found and every option of the group."""
    line = _assert_one_error_line(r, [f"Could not find '{group}/{bad}'"])
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, f"conf/{group}/ holds no options"
    m = re.search(rf"available options in '{re.escape(group)}': (.*)$", line)
    assert m, r.output
    assert sorted(m.group(1).split(", ")) == options, r.output


@pytest.mark.parametrize("cli_case", list(CASES))
def test_bad_input_fails_cleanly(cli_case, results):
    case = CASES[cli_case]
    r: Result = results[cli_case].result()
    d = r.case_dir.parents[1]
    if case.kind == "resume":  # the control: the same command without the bad setting trains and saves
        assert r.first.returncode == 0, f"the first (valid) run failed:\n{r.first.stdout}\n{r.first.stderr}"
        assert r.ckpts_before, "the first run wrote no checkpoint"
    if case.hydra_group:
        bad = case.overrides[0].partition("=")[2]
        _assert_hydra_unknown_option(r, case.hydra_group, bad)
    else:
        _assert_one_error_line(r, [n.format(d=d) for n in case.names])

    if case.module:
        assert sorted(p.name for p in r.case_dir.iterdir()) == [], "wrote into the working directory"
    elif case.kind == "resume":
        ckpt = r.case_dir / "run" / "checkpoints" / "last.ckpt"
        assert str(ckpt) in r.proc.stderr, r.output
        # the failed resume must neither delete the earlier run nor write checkpoints
        assert r.ckpts_after == r.ckpts_before, (r.ckpts_before, r.ckpts_after)
    else:
        run_dir = r.case_dir / "run"
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []
        assert not run_dir.exists(), f"a failed run left {run_dir} behind: {left}"
