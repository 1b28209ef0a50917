"""Durability (issue 13): checkpoints that survive kill -9 and a full disk, resume that finds a checkpoint that
loads, one run per run dir, SIGTERM/SIGINT that save and say how to resume, a validation at the end of every
run, multiruns whose failed jobs do not stop the others, and sweep results read as JSON, never unpickled.

Crashes are real: `python train.py` subprocesses killed with SIGKILL / sent SIGTERM at a known moment (a
callback or an `open` hook on the subprocess's PYTHONPATH writes a marker file when that moment comes).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, compose, run_cli

import microgpt.train as train_mod
from microgpt.errors import ConfigError
from microgpt.io.atomic import TEMP_SUFFIX, DiskFullError, atomic_write

pytestmark = pytest.mark.slow

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "print_sample=false"]

# An `open` hook for a training subprocess (imported before train.py runs). Once a complete last.ckpt exists,
# the next open-for-write of last.ckpt (or of a temp file named after it) does, after the real open (which
# truncates when it is the target itself):
#   HOOK=hang   write HOOK_DIR/writing and sleep: the test kills the process there (kill -9 mid-write)
#   HOOK=full   raise ENOSPC, as a full disk does
HOOK = r"""
import builtins, errno, os, time
from pathlib import Path

_real_open = builtins.open
_mode = os.environ["HOOK"]
_dir = Path(os.environ["HOOK_DIR"])


def _open(file, mode="r", *args, **kwargs):
    f = _real_open(file, mode, *args, **kwargs)
    name = os.path.basename(str(file))
    last = _dir / "run" / "checkpoints" / "last.ckpt"
    armed = (_dir / "armed").exists() and last.is_file() and last.stat().st_size > 0
    if ("w" in mode or "a" in mode) and "last.ckpt" in name and armed:
        if _mode == "hang":
            (_dir / "writing").write_text(str(file))
            time.sleep(120)
        else:
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return f


builtins.open = _open
"""

# a callback for the training subprocesses: after step `arm_at` it writes HOOK_DIR/armed (so the hook fires on
# the next checkpoint write) or signals readiness; `delay` slows steps so a signal lands mid-training
PROBE = r"""
import os, time
from pathlib import Path
import lightning as L


class Probe(L.Callback):
    def __init__(self, marker: str, at: int = 1, delay: float = 0.0, fail_heads: int = -1):
        self.marker, self.at, self.delay, self.fail_heads = Path(marker), at, delay, fail_heads

    def on_train_start(self, trainer, pl_module):
        if pl_module.model.config.n_head == self.fail_heads:
            raise RuntimeError(f"probe: refusing n_head={self.fail_heads}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at and not self.marker.exists():
            self.marker.write_text(str(trainer.global_step))
        if self.delay:
            time.sleep(self.delay)
"""


@pytest.fixture
def text(tmp_path, small_text) -> Path:
    return small_text


@pytest.fixture
def helpers(tmp_path) -> Path:
    d = tmp_path / "helpers"
    d.mkdir()
    (d / "ckpt_hook.py").write_text(HOOK)
    (d / "rel_probe.py").write_text(PROBE)
    return d


def _env(helpers: Path, **extra: str) -> dict:
    pp = os.pathsep.join([str(helpers), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": pp, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _train_cmd(*args: str, hook: bool = False) -> list[str]:
    if not hook:
        return [PY, "train.py", *args]
    code = "import sys, runpy, ckpt_hook; sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path('train.py', run_name='__main__')"
    return [PY, "-c", code, *args]


def _nano(text: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=nano", "data=text", f"data.path={text}", f"hydra.run.dir={run_dir}", *QUIET, *extra]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc={proc.returncode}) before {path.name}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {path} after {timeout}s")
        time.sleep(0.1)


def _popen(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# ---- 6. atomic checkpoint writes ---------------------------------------------------------------------------


def test_kill_9_during_a_cross_filesystem_checkpoint_write_leaves_a_valid_last_ckpt(tmp_path, text, helpers):
    shm = Path("/dev/shm")
    assert shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "needs $TMPDIR on another filesystem"
    run = tmp_path / "run"
    probe = [
        "+callbacks.probe._target_=rel_probe.Probe",
        f"+callbacks.probe.marker={tmp_path / 'armed'}",
        "+callbacks.probe.at=10",
    ]
    args = _nano(text, run, "trainer.max_steps=20", "trainer.val_check_interval=10", *probe)
    env = _env(helpers, HOOK="hang", HOOK_DIR=str(tmp_path), TMPDIR=str(shm))
    proc = _popen(_train_cmd(*args, hook=True), env)
    try:
        _wait_for(tmp_path / "writing", proc)  # inside the write of the step-20 last.ckpt
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    last = run / "checkpoints" / "last.ckpt"
    assert _step(last) == 10, "last.ckpt must still be the complete step-10 checkpoint"
    assert list((run / "checkpoints").glob(f"*{TEMP_SUFFIX}")), "the killed write's temp file should be beside it"

    # resuming removes the dead writer's temp file and continues from the newest complete checkpoint (best.ckpt
    # of step 20 when its write finished before the kill, else last.ckpt of step 10)
    args = _nano(text, run, "trainer.max_steps=25", "trainer.val_check_interval=10", "ckpt_path=last")
    cp = run_cli(["train.py", *args], env=_env(helpers))
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert not list((run / "checkpoints").glob(f"*{TEMP_SUFFIX}"))
    assert _step(last) == 25


def test_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, text, helpers):
    run = tmp_path / "run"
    probe = [
        "+callbacks.probe._target_=rel_probe.Probe",
        f"+callbacks.probe.marker={tmp_path / 'armed'}",
        "+callbacks.probe.at=10",
    ]
    args = _nano(text, run, "trainer.max_steps=20", "trainer.val_check_interval=10", *probe)
    proc = _popen(_train_cmd(*args, hook=True), _env(helpers, HOOK="full", HOOK_DIR=str(tmp_path)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "previous version is kept" in lines[0], err[-3000:]
    assert "Traceback" not in err
    last = run / "checkpoints" / "last.ckpt"
    assert _step(last) == 10
    assert not list((run / "checkpoints").glob(f"*{TEMP_SUFFIX}"))


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    import errno

    p = tmp_path / "report.json"
    atomic_write(p, "old")

    def half_then_full(f):
        f.write(b"new, but only ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="previous version is kept"):
        atomic_write(p, half_then_full)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report.json"]


class _OneRankShardedStrategy:
    """What atomic_sharded_saves needs of a Lightning strategy, for one process; `save_checkpoint` writes a
    DeepSpeed-like directory shard by shard, and can be told to die half-way."""

    local_rank, is_global_zero = 0, True

    def __init__(self):
        self.fail_after = None
        self.barriers: list[str] = []

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        self.barriers.append(name)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        d = Path(filepath)
        (d / "checkpoint").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            if self.fail_after == i:
                raise RuntimeError("killed during the save")
            (d / "checkpoint" / f"shard_{i}.pt").write_text(checkpoint["tag"])
        (d / "latest").write_text("checkpoint")


def test_a_sharded_checkpoint_directory_is_replaced_whole_or_not_at_all(tmp_path):
    from microgpt.io.atomic import atomic_sharded_saves, remove_stale_temps

    strategy = _OneRankShardedStrategy()
    atomic_sharded_saves(strategy)
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"tag": "old"}, last)

    def shards():
        return sorted((f.name, f.read_text()) for f in (last / "checkpoint").iterdir())

    assert shards() == [("shard_0.pt", "old"), ("shard_1.pt", "old"), ("shard_2.pt", "old")]
    strategy.fail_after = 2  # two new shards written, then the save dies: the old directory is untouched
    with pytest.raises(RuntimeError, match="killed during the save"):
        strategy.save_checkpoint({"tag": "new"}, last)
    assert shards() == [("shard_0.pt", "old"), ("shard_1.pt", "old"), ("shard_2.pt", "old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    strategy.fail_after = None
    strategy.save_checkpoint({"tag": "new"}, last)
    assert shards() == [("shard_0.pt", "new"), ("shard_1.pt", "new"), ("shard_2.pt", "new")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp or old copy left
    assert (
        len(strategy.barriers) == 4 + 1 + 4
    )  # two saves wait 4 times (start, saved, renamed, done); the failed one once
    # a temp directory left by a writer killed with SIGKILL (a dead PID) is removed when the next run starts
    dead = tmp_path / f".last.ckpt.999999999{TEMP_SUFFIX}"
    (dead / "checkpoint").mkdir(parents=True)
    assert remove_stale_temps(tmp_path) == [dead] and not dead.exists()


# ---- 7. resume finds a checkpoint that loads; no silent mixing of runs -----------------------------------------


def _cfg(text: Path, run: Path, *extra: str):
    return compose(
        ["model=nano", "data=text", f"data.path={text}", "logger=csv", *QUIET, "trainer.val_check_interval=10", *extra],
        output_dir=run,
    )


def test_ckpt_path_last_skips_a_truncated_last_ckpt_and_says_which_it_used(tmp_path, text, caplog):
    run = tmp_path / "run"
    train_mod.run(_cfg(text, run, "trainer.max_steps=20"))
    ck = run / "checkpoints"
    assert _step(ck / "best.ckpt") in (10, 20)
    best_step = _step(ck / "best.ckpt")
    data = (ck / "last.ckpt").read_bytes()
    (ck / "last.ckpt").write_bytes(data[: len(data) // 2])  # a torn write
    with caplog.at_level("INFO", logger="microgpt"):
        result = train_mod.run(_cfg(text, run, "trainer.max_steps=25", "ckpt_path=last"))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped last.ckpt" in said and f"resuming from {ck / 'best.ckpt'}" in said, said
    assert result["trainer"].global_step == 25
    assert _step(ck / "last.ckpt") == 25
    assert best_step < 25


def test_resume_after_a_crash_between_best_and_last_leaves_no_stale_best(tmp_path, text):
    run = tmp_path / "run"
    train_mod.run(_cfg(text, run, "trainer.max_steps=10"))
    ck = run / "checkpoints"
    (ck / "last.ckpt").unlink()  # killed after best.ckpt was written, before last.ckpt
    train_mod.run(_cfg(text, run, "trainer.max_steps=20", "ckpt_path=last"))
    assert sorted(p.name for p in ck.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert _step(ck / "last.ckpt") == 20


def test_a_non_empty_run_dir_needs_ckpt_path_or_overwrite(tmp_path, text):
    run = tmp_path / "run"
    train_mod.run(_cfg(text, run, "trainer.max_steps=10"))
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(ConfigError, match=r"already holds an earlier run.*ckpt_path=last.*overwrite=true"):
        train_mod.run(_cfg(text, run, "trainer.max_steps=10", "seed=7"))
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert run.is_dir(), "refusing must not delete the earlier run"

    train_mod.run(_cfg(text, run, "trainer.max_steps=10", "seed=7", "overwrite=true"))
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert sorted(after) == ["best.ckpt", "last.ckpt"] and after["last.ckpt"] != before["last.ckpt"]


# ---- 8. one run per run dir ----------------------------------------------------------------------------------


def test_a_live_runs_lock_refuses_a_second_run_and_a_dead_ones_is_taken_over(tmp_path, text):
    from microgpt.training.safety import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {other.pid}"):
            train_mod.run(_cfg(text, run, "trainer.max_steps=4"))
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == other.pid  # not touched
    finally:
        other.kill()
        other.wait()
    # the same lock, its process now gone: taken over, and released at the end
    result = train_mod.run(_cfg(text, run, "trainer.max_steps=4"))
    assert result["trainer"].global_step == 4
    assert not (run / LOCK_NAME).exists()


# ---- 9. SIGTERM / SIGINT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "code", "strategy"),
    [
        (signal.SIGTERM, 143, "auto"),
        (signal.SIGINT, 130, "auto"),
        pytest.param(
            signal.SIGTERM,
            143,
            "ddp",
        ),
    ],
    ids=["SIGTERM", "SIGINT", "SIGTERM-ddp-2-processes"],
)
def test_signal_saves_a_resumable_checkpoint_exits_128_plus_signal_and_says_how_to_resume(
    tmp_path, text, helpers, sig, code, strategy
):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    probe = [
        "+callbacks.probe._target_=rel_probe.Probe",
        f"+callbacks.probe.marker={ready}",
        "+callbacks.probe.at=3",
        "+callbacks.probe.delay=0.05",
    ]
    dist = [f"strategy={strategy}", "trainer.devices=2"] if strategy != "auto" else []
    proc = _popen(_train_cmd(*_nano(text, run, "trainer.max_steps=100000", *dist, *probe)), _env(helpers))
    _wait_for(ready, proc)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(sig).name
    step = _step(run / "checkpoints" / "last.ckpt")
    assert 3 <= step < 100000
    assert err.count("stopped by") == 1, err[-3000:]  # said once, not by every rank
    assert (
        f"stopped by {name} after step {step}; saved a resumable checkpoint to {run / 'checkpoints' / 'last.ckpt'}"
        in err
    )
    resume = next(ln for ln in err.splitlines() if ln.startswith("resume with: "))[len("resume with: python ") :]
    assert f"hydra.run.dir={run}" in resume and resume.endswith("ckpt_path=last")
    if sig == signal.SIGTERM:  # the printed command resumes (with a reachable end)
        args = [a for a in resume.split() if not a.startswith(("trainer.max_steps", "+callbacks.probe"))]
        cp = run_cli([*args, f"trainer.max_steps={step + 3}"], env=_env(helpers))
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert _step(run / "checkpoints" / "last.ckpt") == step + 3


_SIGNAL_AT = r"""
import os, signal
import lightning as L


class SignalAt(L.Callback):
    # SIGTERM to this process at the end of training step `at`
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_signal_at_a_validation_step_resumes_at_the_same_logged_step(tmp_path, text, helpers):
    """The step's validation finishes (one val batch), then the signal checkpoint is saved; on resume Lightning
    takes such a checkpoint for one saved at that validation's end. metrics.csv must go on at the step where
    training stopped (it went on one step too high), with the losses of an uninterrupted run."""
    (helpers / "signal_at.py").write_text(_SIGNAL_AT)
    common = ["data.eval_batches=1", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1"]
    ref = tmp_path / "ref"
    cp = run_cli(["train.py", *_nano(text, ref, *common, "trainer.max_steps=30")], env=_env(helpers))
    assert cp.returncode == 0, cp.stderr[-3000:]
    run = tmp_path / "run"
    stop = ["+callbacks.sig._target_=signal_at.SignalAt", "+callbacks.sig.at=20"]
    cp = run_cli(["train.py", *_nano(text, run, *common, "trainer.max_steps=30", *stop)], env=_env(helpers))
    assert cp.returncode == 143, cp.stderr[-3000:]
    assert _step(run / "checkpoints" / "last.ckpt") == 20
    cp = run_cli(["train.py", *_nano(text, run, *common, "trainer.max_steps=30", "ckpt_path=last")], env=_env(helpers))
    assert cp.returncode == 0, cp.stderr[-3000:]

    def train_losses(d: Path) -> dict[int, float]:
        rows = csv.DictReader((d / "metrics.csv").open(newline=""))
        return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}

    resumed, whole = train_losses(run), train_losses(ref)
    assert sorted(resumed) == list(range(20, 30)), sorted(resumed)  # the 21st step is logged as step 20
    assert all(resumed[k] == pytest.approx(whole[k], abs=1e-6) for k in resumed)


# ---- 12. a validation at the end of every run ------------------------------------------------------------------


def test_a_run_shorter_than_val_check_interval_still_validates_and_saves_best(tmp_path, text):
    run = tmp_path / "run"
    cfg = compose(["model=nano", "data=text", f"data.path={text}", *QUIET, "trainer.max_steps=7"], output_dir=run)
    assert cfg.trainer.val_check_interval > 7  # the shipped default
    result = train_mod.run(cfg)
    assert result["val_loss"] == result["val_loss"]  # not NaN
    assert _step(run / "checkpoints" / "best.ckpt") == 7 and _step(run / "checkpoints" / "last.ckpt") == 7
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    vals = [r.split(",") for r in rows[1:] if r.split(",")[header.index("val_loss")]]
    assert [int(r[header.index("step")]) for r in vals] == [6]  # once, after the last (7th) step


# ---- 10 + 4. multiruns: failed jobs are recorded, the others run; results are JSON ----------------------------


def test_a_multirun_with_failing_jobs_runs_every_job_and_the_summary_shows_them(tmp_path, text, helpers):
    sweep = tmp_path / "sweep"
    probe = [
        "+callbacks.probe._target_=rel_probe.Probe",
        f"+callbacks.probe.marker={tmp_path / 'm'}",
        "+callbacks.probe.fail_heads=1",
    ]
    args = [
        "-m",
        "model=nano",
        "data=text",
        f"data.path={text}",
        *QUIET,
        "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}",
        *probe,
    ]
    # n_head=3 does not divide n_embd=32 (bad input: one error line); n_head=1 raises in a callback (a traceback)
    cp = run_cli(["train.py", *args, "model.n_head=3,1,4"], env=_env(helpers))
    assert cp.returncode != 0, "a multirun with failed jobs must not exit 0"
    last = cp.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "multirun job #0" in last and "microgpt.sweep" in last, cp.stderr[-3000:]
    results = {int(p.stem): json.loads(p.read_text()) for p in (sweep / ".results").glob("*.json")}
    assert {n: r["status"] for n, r in results.items()} == {0: "failed", 1: "failed", 2: "ok"}
    assert "n_head" in results[0]["error"] and "RuntimeError: probe: refusing n_head=1" in results[1]["error"]
    assert (sweep / "2" / "checkpoints" / "last.ckpt").is_file()  # the job after the failures ran

    out = subprocess.run(
        [PY, "-m", "microgpt.sweep", str(sweep), "--json", "--no-slurm"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [(j["num"], j["status"]) for j in doc["jobs"]] == [(0, "failed"), (1, "failed"), (2, "ok")]
    assert doc["best"] == 2 and "n_head" in doc["jobs"][0]["note"]


def test_a_job_whose_process_died_without_a_result_is_failed_not_running(tmp_path):
    from microgpt.sweep import find_jobs

    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 0\n    id: '0'\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (sweep / ".results").mkdir()
    doc = {"num": 0, "status": "running", "pid": dead.pid, "host": socket.gethostname(), "overrides": ["seed=1"]}
    (sweep / ".results" / "0.json").write_text(json.dumps(doc))
    [job] = find_jobs(sweep, query_slurm=False)
    assert job.status == "failed" and f"PID {dead.pid}" in job.note


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_the_sweep_summary_never_unpickles_a_result_file(tmp_path):
    from microgpt.sweep import find_jobs

    sweep = tmp_path / "sweep"
    sub = sweep / ".submitit" / "7_0"
    sub.mkdir(parents=True)
    marker = tmp_path / "ran"
    (sub / "7_0_submitted.pkl").write_bytes(b"")
    (sub / "7_0_0_log.err").write_text("")
    (sub / "7_0_0_result.pkl").write_bytes(pickle.dumps(("success", _Payload(str(marker)))))
    find_jobs(sweep, query_slurm=False)
    assert not marker.exists(), "microgpt.sweep ran code from a result pickle"


# ---- 13. prompts Hydra's lexer cannot take: prompt_file= and prompt=- ---------------------------------------


def test_generate_reads_the_prompt_from_a_file_or_stdin_whatever_its_characters(tmp_path, text):
    prompt = 'it\'s ~€ @home: "quoted", x=1\n'
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text.read_text(encoding="utf-8") + prompt * 50, encoding="utf-8")
    run = tmp_path / "run"
    train_mod.run(
        compose(["model=nano", "data=text", f"data.path={corpus}", *QUIET, "trainer.max_steps=2"], output_dir=run)
    )
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    common = ["-m", "microgpt.generate", f"ckpt={run}", "max_new_tokens=20", "temperature=0"]
    from_file = run_cli([*common, f"prompt_file={tmp_path / 'prompt.txt'}"], cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    p = subprocess.run(
        [PY, *common, "prompt=-"],
        input=prompt,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert from_file.stdout.startswith(prompt) and len(from_file.stdout) > len(prompt)
    assert p.stdout == from_file.stdout  # greedy: the same prompt gives the same continuation
    # the same text as prompt=... fails in Hydra's lexer (documented); with both given, one line says to pick one
    both = run_cli([*common, "prompt=x", f"prompt_file={tmp_path / 'prompt.txt'}"], cwd=tmp_path)
    assert both.returncode == 2 and both.stderr.strip().startswith("error: pass either prompt="), both.stderr


# ---- exports on a full disk -----------------------------------------------------------------------------------

_FULL_DISK_EXPORT = """
import errno, runpy, sys
import safetensors.torch as st

def full(tensors, filename, metadata=None):  # half a file, then the disk is full
    with open(filename, "wb") as f:
        f.write(b"\\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device", filename)

st.save_file = full
sys.argv = ["microgpt.export", *sys.argv[1:]]
runpy.run_module("microgpt.export", run_name="__main__")
"""


def test_an_export_that_fills_the_disk_is_one_error_line_and_keeps_the_previous_export(tmp_path, text):
    run = tmp_path / "run"
    train_mod.run(compose(["model=nano", "data=text", f"data.path={text}", *QUIET, "trainer.max_steps=3"], run))
    out = tmp_path / "export"
    ok = run_cli(["-m", "microgpt.export", f"ckpt={run}", "format=safetensors", f"out={out}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cp = subprocess.run(
        [PY, "-c", _FULL_DISK_EXPORT, f"ckpt={run}", "format=safetensors", f"out={out}", "overwrite=true"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert cp.returncode == 2, cp.stderr[-2000:]
    lines = [ln for ln in cp.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "Traceback" not in cp.stderr, cp.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, byte for byte
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp directory
