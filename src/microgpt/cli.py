"""Shared CLI plumbing: where the configs live, and turning bad input into one error line."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from microgpt import lean_imports
from microgpt.errors import MicroGPTError

# every command imports this module before Lightning: torchmetrics then skips transformers/scipy/matplotlib
lean_imports.install()

# configs live at the repository root (`conf/`), next to `src/`; MICROGPT_CONF overrides
CONF_DIR = Path(os.environ.get("MICROGPT_CONF", Path(__file__).resolve().parents[2] / "conf"))


def quiet_env() -> None:
    # torchao probes for CUDA kernels it can't use on CPU and says so at import; nothing is wrong
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    # Lightning warns on every run of a machine where SLURM is installed but this is not a SLURM job
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # the CSV logger writes metrics.csv into the Hydra run dir, which already holds .hydra/ and train.log by design
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    from microgpt.console import quiet

    quiet()  # known third-party noise (see microgpt.console)
    one_line_hydra_errors()


def exit_on_error(fn: Callable) -> Callable:
    """Run fn; bad input (a MicroGPTError, a missing mandatory setting, an unwritable or full disk) becomes
    `error: <one line>` on stderr and exit status 2. SIGTERM/SIGINT after a saved checkpoint exit 143/130 with
    the command that resumes. In a multirun a failed job is recorded (microgpt.job_results) and the sweep goes
    on to the next job; the multirun exits non-zero at the end."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from microgpt import job_results

        job = job_results.current_job()
        if job is not None:
            job.started()
        try:
            ret = fn(*args, **kwargs)
        except BaseException as e:
            stopped = getattr(e, "exit_code", None) is not None and hasattr(e, "signum")
            line = error_line(e)
            if stopped:  # StoppedBySignal: a resumable checkpoint was saved
                from microgpt.training.safety import resume_command

                if getattr(e, "rank_zero", True):  # once, not from every rank
                    print(f"{e}\nresume with: {resume_command(_run_dir())}", file=sys.stderr, flush=True)
                if job is not None:
                    job.finished("stopped", error=str(e))
                sys.exit(e.exit_code)
            if job is not None:
                job.finished("failed", error=line or f"{type(e).__name__}: {e}")
                if line is not None:
                    print(line, file=sys.stderr, flush=True)
                elif isinstance(e, Exception):
                    traceback.print_exc()  # a bug, not bad input: its traceback goes to the job's log
                if isinstance(e, Exception):
                    # Hydra records the job as failed and runs the next one (sys.exit would end the sweep)
                    raise job.failure(line or f"{type(e).__name__}: {e}") from (None if line else e)
                raise
            if line is None:
                raise
            print(line, file=sys.stderr, flush=True)
            sys.exit(2)
        if job is not None:
            job.finished("ok", value=ret)
        return ret

    return wrapper


def _run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path.cwd()


_BAD_DISK = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def error_line(e: BaseException) -> str | None:
    """`error: <problem>; <fix>` for bad input, None for anything else (a bug: its traceback is shown)."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(e, MicroGPTError):
        return f"error: {e}"
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "a setting"
        return f"error: {key} is required and has no value; pass {key}=..."
    if isinstance(e, OSError) and e.errno in _BAD_DISK:
        where = e.filename or "a file"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"error: no space left writing {where} ({e.strerror}); free space there or write elsewhere"
        return f"error: cannot write {where} ({e.strerror}); pick a writable location"
    return None


# ---- Hydra's own errors (unknown option, key, or override syntax): one line and exit 2 ---------------------


def _hydra_one_line(ex: BaseException) -> str | None:
    from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException

    if isinstance(ex, MissingConfigException):
        # "Could not find 'model/huge'\n\nAvailable options in 'model':\n\tbase\n\t..."
        text = str(ex).strip()
        head = text.splitlines()[0].rstrip(".")
        lines = text.splitlines()
        for i, ln in enumerate(lines):
            m = re.match(r"Available options in '([^']+)':", ln.strip())
            if m:
                names = []
                for opt in lines[i + 1 :]:
                    if not opt[:1].isspace():
                        break
                    names.append(opt.strip())
                return f"error: {head}; available options in '{m.group(1)}': {', '.join(names)}"
        return f"error: {' '.join(ln.strip() for ln in text.splitlines() if ln.strip())}"
    if isinstance(ex, HydraException) and not isinstance(ex, InstantiationException):
        parts = [str(ex)] + ([str(ex.__cause__)] if ex.__cause__ is not None else [])
        lines = [ln.strip() for p in parts for ln in p.splitlines() if ln.strip() and not ln.startswith("    ")]
        lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
        line = "error: " + "; ".join(dict.fromkeys(ln.rstrip(".") for ln in lines))
        if isinstance(ex, OverrideParseException):
            line += "; quote the value for Hydra inside the shell's quotes ('key=\"it'\\''s\"'), or for a prompt use prompt_file=PATH or prompt=- (stdin)"
        return line
    return None


def one_line_hydra_errors() -> None:
    """Hydra reports a bad override, an unknown config option and an unwritable run dir in 3-13 lines with exit
    status 1 (hydra._internal.utils.run_and_report, which hydra.main calls). Wrap it: those become one
    `error:` line (the choices listed) and exit 2; HYDRA_FULL_ERROR=1 keeps Hydra's own report."""
    from hydra._internal import utils as hu

    original = getattr(hu.run_and_report, "__wrapped_original__", hu.run_and_report)

    def run_and_report(func):
        try:
            return func()
        except Exception as ex:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            from microgpt.job_results import JobFailed

            if isinstance(ex, JobFailed):  # a multirun with failed jobs: every job ran; say so and exit 1
                print(str(ex), file=sys.stderr, flush=True)
                sys.exit(1)
            line = _hydra_one_line(ex) or error_line(ex)
            if line is None and isinstance(ex, OSError) and ex.filename:
                # Hydra could not create the run dir or write its files into it (before any job ran)
                line = f"error: cannot create or write {ex.filename} ({ex.strerror}); pick a writable hydra.run.dir"
            if line is not None:
                print(line, file=sys.stderr, flush=True)
                sys.exit(2)

            def again(err: Exception = ex):
                raise err

            return original(again)

    run_and_report.__wrapped_original__ = original
    hu.run_and_report = run_and_report
