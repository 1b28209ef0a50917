"""One small JSON result file per multirun job: `<sweep dir>/.results/<job num>.json`.

Written by the CLI wrapper (microgpt.cli.exit_on_error) when the job starts (`running`, with its PID and host)
and when it ends (`ok` with the value returned to the sweeper, `failed` with its error line, `stopped` on
SIGTERM/SIGINT). `python -m microgpt.sweep` reads these files, never submitit's result pickles: a result file
is data, not code. A job whose file still says `running` but whose process is gone (same host) is `failed`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException

RESULTS_DIR = ".results"


class JobFailed(CompactHydraException):
    """Raised inside a failed multirun job: Hydra records the job as failed and runs the others; the sweep then
    re-raises the first one, which the CLI prints as one line before exiting 1."""


def _sweep_dir(output_dir: Path) -> Path:
    """The sweep dir of a job dir: the nearest ancestor holding multirun.yaml (jobs may be nested), else the parent."""
    for p in output_dir.parents:
        if (p / "multirun.yaml").is_file():
            return p
    return output_dir.parent


@dataclass
class Job:
    num: int
    overrides: list[str]
    output_dir: Path
    path: Path

    def _write(self, doc: dict[str, Any]) -> None:
        from microgpt.training.safety import write_json

        base = {
            "num": self.num,
            "overrides": self.overrides,
            "output_dir": str(self.output_dir),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if base["slurm_job_id"] and os.environ.get("SLURM_ARRAY_TASK_ID"):
            base["slurm_job_id"] += "_" + os.environ["SLURM_ARRAY_TASK_ID"]
        try:
            write_json(self.path, {**base, **doc})
        except Exception as e:  # the record must never hide the job's own outcome
            print(f"warning: cannot write the job result {self.path}: {e}", flush=True)

    def started(self) -> None:
        self._write({"status": "running"})

    def finished(self, status: str, value: Any = None, error: str | None = None) -> None:
        doc: dict[str, Any] = {"status": status}
        if value is not None:
            doc["value"] = value
        if error:
            doc["error"] = error[:500]
        self._write(doc)

    def failure(self, line: str) -> JobFailed:
        return JobFailed(
            f"{line if line.startswith('error:') else 'error: ' + line} (multirun job #{self.num}: "
            f"{' '.join(self.overrides)}); the other jobs ran: python -m microgpt.sweep {self.path.parent.parent}"
        )


def current_job() -> Job | None:
    """This process's multirun job, or None outside a multirun (a plain run, a test calling run() directly)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        from microgpt.training.safety import launched_rank_zero

        if not launched_rank_zero():  # one record per job, written by its first task
            return None
        out = Path(hc.runtime.output_dir)
        num = int(hc.job.num)
        overrides = [str(o) for o in hc.overrides.task]
    except Exception:
        return None
    return Job(num, overrides, out, _sweep_dir(out) / RESULTS_DIR / f"{num}.json")


def read_results(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """{job num: its result document} for a sweep dir; unreadable files (being written) are skipped."""
    out: dict[int, dict[str, Any]] = {}
    d = Path(sweep_dir) / RESULTS_DIR
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            out[int(doc["num"])] = doc
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
