"""Sweeps: a summary of a multirun directory. (The SLURM pre-flight is microgpt.slurm, the values a sweeper
minimises microgpt.training.objective; both names stay importable from here.)

    python -m microgpt.sweep multirun/2026-11-22/18-00-00          # rich table, best job marked
    python -m microgpt.sweep multirun/2026-11-22/18-00-00 --json   # the same as JSON

Each job is a Hydra job directory (`<sweep dir>/<num>/.hydra/overrides.yaml`) and, for the SLURM launcher,
the submitit folder that ran it (`<sweep dir>/.submitit/<slurm id>/`). A job is

- ok       the job's result file says the task returned (without one: metrics.csv reached max_steps)
- failed   the result file says it failed (with its error line) or was stopped by a signal; its process died
           without writing a result; its log ends in an error; or SLURM says FAILED, CANCELLED, TIMEOUT, ...
- running  still queued or running (SLURM says so, or nothing says it ended); `pending` while queued

Every job writes `<sweep dir>/.results/<num>.json` (microgpt.job_results) when it starts and when it ends; these
JSON files are the results read here (submitit's result pickles are never loaded: unpickling runs code).
A failed job whose directory was removed (train.py cleans up after bad input) is still listed, from its
result file or submitit folder. Exit status: 0 when at least one job is ok, 1 when none is, 2 when DIR holds
no sweep.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from microgpt.slurm import SLURM_TIMEOUT_S, SlurmCheck, SlurmUnavailableError, check_slurm  # noqa: F401
from microgpt.training.objective import model_bytes, objective  # noqa: F401

_ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
_QUEUED = {"PENDING", "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass
class Job:
    num: int | None  # hydra.job.num
    overrides: list[str] = field(default_factory=list)
    status: str = "running"  # ok | failed | running | pending
    val_loss: float | None = None  # last logged val_loss (metrics.csv)
    best_val_loss: float | None = None  # lowest logged val_loss
    steps: int | None = None  # optimizer steps reached (last logged step + 1)
    job_id: str | None = None  # SLURM job id (array jobs: ARRAY_TASK)
    dir: str | None = None
    log: str | None = None  # the job's stderr (submitit), where the error is
    note: str = ""
    best: bool = False


# ---- reading one job ---------------------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.csv -> {'val_loss': last, 'best_val_loss': min, 'steps': last step + 1}; empty if unreadable."""
    if not path.is_file():
        return {}
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    vals = [float(r["val_loss"]) for r in rows if r.get("val_loss") not in (None, "")]
    steps = [int(float(r["step"])) for r in rows if r.get("step") not in (None, "")]
    out: dict[str, Any] = {}
    if vals:
        out["val_loss"] = vals[-1]
        out["best_val_loss"] = (
            min(v for v in vals if not math.isnan(v)) if any(not math.isnan(v) for v in vals) else None
        )
    if steps:
        out["steps"] = max(steps) + 1
    return out


def _yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception:  # a half-written file while the job starts
        return None


def _job_from_dir(job_dir: Path) -> Job:
    ov = _yaml(job_dir / ".hydra" / "overrides.yaml")
    hy = _yaml(job_dir / ".hydra" / "hydra.yaml")
    num = OmegaConf.select(hy, "hydra.job.num", default=None) if hy is not None else None
    job_id = OmegaConf.select(hy, "hydra.job.id", default=None) if hy is not None else None
    job = Job(num=int(num) if num is not None else None, overrides=[str(o) for o in (ov or [])], dir=str(job_dir))
    if job_id is not None and re.fullmatch(r"\d+(_\d+)?", str(job_id)):
        job.job_id = str(job_id)
    m = read_metrics(job_dir / "metrics.csv")
    job.val_loss, job.best_val_loss, job.steps = m.get("val_loss"), m.get("best_val_loss"), m.get("steps")
    # a resumed run keeps the log of the steps before the resume in metrics.before-*.csv
    earlier = [read_metrics(p).get("best_val_loss") for p in job_dir.glob("metrics.before-*.csv")]
    lows = [v for v in (job.best_val_loss, *earlier) if v is not None]
    job.best_val_loss = min(lows) if lows else None
    return job


def _max_steps(job: Job) -> int | None:
    if job.dir is None:
        return None
    cfg = _yaml(Path(job.dir) / ".hydra" / "config.yaml")
    v = OmegaConf.select(cfg, "trainer.max_steps", default=None) if cfg is not None else None
    return v if isinstance(v, int) else None


def _error_line(log: Path) -> str:
    """The most telling line of a job's stderr: microgpt's `error: ...`, an exception, or SLURM's own."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for pat in (
        r"^error: ",
        r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b.*",
        r"\*\*\* JOB .* \*\*\*",
        r"Exited with exit code",
    ):
        hits = [ln for ln in lines if re.search(pat, ln)]
        if hits:
            return hits[-1][:300]
    return ""


def _apply_result(job: Job, doc: dict[str, Any]) -> bool:
    """Set the job's status from its result file; False when the file does not settle it (still running)."""
    status = doc.get("status")
    if status == "ok":
        job.status, job.note = "ok", ""
        return True
    if status in ("failed", "stopped"):
        job.status = "failed"
        job.note = str(doc.get("error") or f"the job {status}")[:300]
        if status == "stopped":
            job.note += "; resume it with ckpt_path=last in its run dir"
        return True
    pid, host = doc.get("pid"), doc.get("host")
    if status == "running" and isinstance(pid, int) and host == socket.gethostname():
        from microgpt.io.atomic import pid_alive

        if not pid_alive(pid):
            job.status = "failed"
            job.note = f"its process (PID {pid}) ended without writing a result: killed, or crashed hard"
            return True
    return False


# ---- finding the jobs of a sweep ---------------------------------------------------------------------------


def _submitit_tasks(sweep_dir: Path) -> dict[str, Path]:
    """{slurm job id: its submitit folder} for every job submitted from this sweep dir."""
    root = sweep_dir / ".submitit"
    out = {}
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and re.fullmatch(r"\d+(_\d+)?", d.name) and any(d.glob("*_submitted.pkl")):
                out[d.name] = d
    return out


def _array_nums(ids: list[str]) -> dict[str, int]:
    """Hydra launches each batch as one array (a one-job batch as a plain job), numbering jobs in order:
    num = jobs in the earlier arrays + task index."""
    arrays: dict[int, dict[str, int]] = {}
    for i in ids:
        a, _, t = i.partition("_")
        arrays.setdefault(int(a), {})[i] = int(t or 0)
    nums, offset = {}, 0
    for a in sorted(arrays):
        for i, t in arrays[a].items():
            nums[i] = offset + t
        offset += max(arrays[a].values()) + 1
    return nums


def _basic_sweep_overrides(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job, recomputed the way Hydra's basic sweeper made them (multirun.yaml)."""
    cfg = _yaml(sweep_dir / "multirun.yaml")
    if cfg is None or "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]))
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return [list(job) for batch in batches for job in batch]
    except Exception:
        return None


def _sweep_dirs(root: Path) -> list[Path]:
    """root, and every sweep dir below it (a folder with multirun.yaml, .submitit/ or job dirs)."""
    dirs = {root} | {p.parent for p in root.rglob("multirun.yaml")} | {p.parent for p in root.rglob(".submitit")}
    dirs |= {p.parent.parent.parent for p in root.rglob(".hydra/overrides.yaml") if ".submitit" not in p.parts}
    return sorted(d for d in dirs if d == root or root in d.parents)


def find_jobs(root: str | Path, query_slurm: bool = True) -> list[Job]:
    """Every job of the sweep(s) under root, with status, val loss and overrides."""
    root = Path(root)
    jobs: list[Job] = []
    for sweep_dir in _sweep_dirs(root):
        job_dirs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
        if sweep_dir == root and (root / ".hydra" / "overrides.yaml").is_file():
            job_dirs.append(root)  # DIR is a single run
        found = [_job_from_dir(d) for d in job_dirs]
        tasks = _submitit_tasks(sweep_dir)
        nums = _array_nums(list(tasks))
        known = {j.job_id for j in found if j.job_id}
        orphans = sorted(set(tasks) - known, key=lambda i: nums[i])
        if orphans:  # submitted, but no job dir (not started yet, or removed after a failure)
            planned = _basic_sweep_overrides(sweep_dir) or []
            for jid in orphans:
                n = nums[jid]
                found.append(Job(num=n, overrides=planned[n] if n < len(planned) else [], job_id=jid))
        from microgpt.job_results import read_results

        results = read_results(sweep_dir)
        by_num = {j.num: j for j in found if j.num is not None}
        for n, doc in sorted(results.items()):
            if n not in by_num:  # its job dir was removed (bad input) or lies elsewhere
                out = doc.get("output_dir")
                job = Job(num=n, overrides=[str(o) for o in doc.get("overrides") or []])
                job.dir = out if out and Path(out).is_dir() else None
                if doc.get("slurm_job_id") in tasks:
                    job.job_id = doc["slurm_job_id"]
                found.append(job)
                by_num[n] = job
        for j in found:
            if j.job_id not in tasks:  # the basic launcher numbers its jobs "0", "1", ...: not SLURM ids
                j.job_id = None
            if j.job_id in tasks:
                err = tasks[j.job_id] / f"{j.job_id}_0_log.err"
                j.log = str(err) if err.exists() else None
            doc = results.get(j.num) if j.num is not None else None
            if doc is not None and _apply_result(j, doc):
                continue
            if j.job_id in tasks:
                j.status = "running"  # settled below by SLURM's state or the log
            elif doc is not None and doc.get("status") == "running":
                j.status, j.note = "running", f"running (PID {doc.get('pid')} on {doc.get('host')})"
            else:
                _status_from_files(j)
        jobs.extend(sorted(found, key=lambda j: (j.num is None, j.num or 0, j.dir or "")))
    unsettled = [j for j in jobs if j.status == "running" and j.job_id]
    states = _slurm_states([j.job_id for j in unsettled]) if query_slurm else {}
    for j in unsettled:
        _settle(j, states.get(j.job_id))
    return jobs


def _settle(job: Job, state: str | None) -> None:
    """A job with no result yet: SLURM's state when it answered, else its log."""
    why = _error_line(Path(job.log)) if job.log else ""
    if state is None:  # no cluster to ask (e.g. a copied sweep dir): an error in the log means it ended
        if why and "REQUEUE" not in why:
            job.status, job.note = "failed", why
    elif state in _QUEUED:
        job.status, job.note = "pending", f"SLURM: {state}"
    elif state in _ACTIVE:
        job.status, job.note = "running", "" if state == "RUNNING" else f"SLURM: {state}"
    else:  # FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, ... or COMPLETED with no result
        job.status = "failed"
        job.note = (
            f"SLURM: {state}" + ("; no result written" if state == "COMPLETED" else "") + (f"; {why}" if why else "")
        )


def _status_from_files(job: Job) -> None:
    """No submitit (basic / local launcher): finished when metrics.csv reached trainer.max_steps."""
    max_steps = _max_steps(job)
    if job.steps is not None and max_steps is not None and job.steps >= max_steps:
        job.status = "ok"
    else:
        job.status = "running"
        job.note = "not finished: still running, or stopped before max_steps"


def _run_quiet(cmd: list[str], timeout: float) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return p.stdout if p.returncode == 0 else None


def _slurm_states(ids: list[str], timeout: float = 10.0) -> dict[str, str]:
    """{job id: SLURM state} from sacct (accounting) or squeue; {} when no cluster answers."""
    if not ids:
        return {}
    out = _run_quiet(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)], timeout)
    if not out:
        out = _run_quiet(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)], timeout)
    states = {}
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in ids and state:
            states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def mark_best(jobs: list[Job]) -> Job | None:
    """The ok job with the lowest final val loss gets best=True."""
    ok = [j for j in jobs if j.status == "ok" and j.val_loss is not None and not math.isnan(j.val_loss)]
    for j in jobs:
        j.best = False
    if not ok:
        return None
    best = min(ok, key=lambda j: j.val_loss)
    best.best = True
    return best


# ---- output ------------------------------------------------------------------------------------------------


def _split(ov: str) -> tuple[str, str]:
    k, _, v = ov.partition("=")
    return k, v


def varying_keys(jobs: list[Job]) -> tuple[list[str], list[str]]:
    """(keys whose value differs between jobs, overrides shared by all jobs)."""
    keys: list[str] = []
    for j in jobs:
        for o in j.overrides:
            k = _split(o)[0]
            if k not in keys:
                keys.append(k)
    vary, common = [], []
    for k in keys:
        vals = {dict(map(_split, j.overrides)).get(k) for j in jobs}
        if len(vals) > 1:
            vary.append(k)
        else:
            common.append(f"{k}={vals.pop()}")
    return vary, common


def render(jobs: list[Job], title: str, console=None) -> None:
    """A rich table: one row per job, the overrides that differ between jobs as columns, the best one starred;
    then why each unfinished or failed job is so, and where its log is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    vary, common = varying_keys(jobs)
    table = Table(title=title, caption=("common: " + " ".join(common)) if common else None, caption_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("job", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for k in vary:
        table.add_column(k, overflow="fold")
    table.add_column("val_loss", justify="right", no_wrap=True)
    table.add_column("min val", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    colors = {"ok": "green", "failed": "red", "running": "yellow", "pending": "cyan"}

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for j in jobs:
        ov = dict(map(_split, j.overrides))
        table.add_row(
            "★" if j.best else "",
            "?" if j.num is None else str(j.num),
            j.job_id or "-",
            f"[{colors.get(j.status, 'white')}]{j.status}[/]",
            *[escape(ov.get(k, "?" if not j.overrides else "")) for k in vary],
            num(j.val_loss),
            num(j.best_val_loss),
            "-" if j.steps is None else str(j.steps),
            style="bold" if j.best else None,
        )
    console.print(table)
    for j in jobs:
        if j.note or (j.status == "failed" and j.log):
            console.print(
                f"#{j.num} {j.status}: {escape(j.note)}" + (f"\n   log: {j.log}" if j.log else ""), soft_wrap=True
            )
    counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "running", "pending")}
    best = next((j for j in jobs if j.best), None)
    line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if best is not None:
        line += f"; best: #{best.num} val_loss={best.val_loss:.4f}" + (f" ({best.dir})" if best.dir else "")
    console.print(line, soft_wrap=True)


def summary(root: str | Path, query_slurm: bool = True) -> dict[str, Any]:
    """The --json document: {'sweep_dir', 'jobs': [...], 'best': num or None, 'counts': {status: n}}."""
    jobs = find_jobs(root, query_slurm=query_slurm)
    return _as_dict(root, jobs)


def _as_dict(root: str | Path, jobs: list[Job]) -> dict[str, Any]:
    best = mark_best(jobs)
    return {
        "sweep_dir": str(root),
        "jobs": [asdict(j) for j in jobs],
        "best": None if best is None else best.num,
        "counts": {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "running", "pending")},
    }


def latest_sweep(base: Path = Path("multirun")) -> Path | None:
    runs = sorted((p for p in base.glob("*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microgpt.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help="a multirun sweep dir (default: the newest under ./multirun)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-slurm", action="store_true", help="don't ask sacct/squeue about unfinished jobs")
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else latest_sweep()
    if root is None or not root.is_dir():
        print(
            f"error: sweep dir {args.dir or 'multirun/*/*'} does not exist; pass the dir a multirun wrote",
            file=sys.stderr,
        )
        return 2
    jobs = find_jobs(root, query_slurm=not args.no_slurm)
    if not jobs:
        print(f"error: no sweep jobs under {root} (no */.hydra/overrides.yaml, no .submitit/)", file=sys.stderr)
        return 2
    doc = _as_dict(root, jobs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render(jobs, title=f"sweep {root}")
    return 0 if any(j.status == "ok" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
