"""What keeps a training run safe to kill, resume and repeat (docs/reliability.md):

- `claim_run_dir`: one run per run directory (a lock file with PID and host; a dead owner's lock is taken over),
  and no silent mixing of two runs (a non-empty run dir needs `ckpt_path=...` or `overwrite=true`);
- `newest_valid_checkpoint`: `ckpt_path=last` resumes from the newest checkpoint that loads (last, hpc, best);
- `SafetyCallback`: SIGTERM/SIGINT save a resumable checkpoint at the next step boundary and stop with
  exit status 143/130; training always ends with a validation (so short runs get val_loss and best.ckpt);
  the end-of-run sample is generated on every rank (sharded models need all of them);
- `prepare_trainer`: checkpoints written atomically (microgpt.io.atomic), stale temp files removed.

train.py calls these in a few lines; the logic lives here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from microgpt.errors import ConfigError, MicroGPTError
from microgpt.io.atomic import atomic_write, pid_alive, remove_stale_temps

log = logging.getLogger("microgpt")

LOCK_NAME = ".microgpt.lock"
# what Hydra itself writes into a run dir before the task starts: not evidence of an earlier run
_HYDRA_OWN = {".hydra", "train.log", LOCK_NAME}


# ---- settings ------------------------------------------------------------------------------------------------


def check_settings(cfg: DictConfig) -> None:
    """Settings train.py's own checks do not cover: types Hydra leaves as strings, and contradictory values."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}; pass e.g. seed=1337")
    overwrite = cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be true or false, got {overwrite!r}")
    trainer = cfg.get("trainer") or {}
    vci, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if isinstance(vci, bool) or (vci is not None and not isinstance(vci, (int, float))):
        raise ConfigError(f"trainer.val_check_interval must be a number of steps, got {vci!r}")
    if isinstance(vci, (int, float)) and vci <= 0:
        raise ConfigError(f"trainer.val_check_interval must be > 0, got {vci}")
    if isinstance(vci, int) and isinstance(max_steps, int) and 0 < max_steps < vci:
        log.warning(
            "trainer.val_check_interval=%d is more than trainer.max_steps=%d: validating (and saving best.ckpt) "
            "only at the end of training",
            vci,
            max_steps,
        )


# ---- the run directory -------------------------------------------------------------------------------------


def launched_rank_zero() -> bool:
    """Is this the first process of the job? Decided from the launcher's environment, before a Trainer exists
    (Lightning's spawned ranks get LOCAL_RANK, srun/torchrun tasks SLURM_PROCID/RANK)."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _leftovers(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name not in _HYDRA_OWN and not p.name.startswith("."))


def _lock_owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _take_lock(lock: Path) -> None:
    """Create the lock atomically (O_EXCL); a lock whose owner is dead (same host, or the same SLURM job
    requeued) is replaced. Raises ConfigError naming the live owner."""
    me = _lock_owner()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                return  # ours (run() called twice in one process)
            same_host = owner.get("host") == me["host"]
            requeued = me["slurm_job_id"] is not None and owner.get("slurm_job_id") == me["slurm_job_id"]
            dead = requeued or (same_host and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]))
            if not owner or dead:
                log.warning(
                    "run dir lock %s was left by a process that is gone (%s); taking it over",
                    lock,
                    f"PID {owner.get('pid')} on {owner.get('host')}" if owner else "unreadable",
                )
                lock.unlink(missing_ok=True)
                continue
            raise ConfigError(
                f"run dir {lock.parent} is in use by another run (PID {owner.get('pid')} on {owner.get('host')}, "
                f"started {owner.get('started')}); wait for it, pick another hydra.run.dir, or delete {lock} "
                "if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise ConfigError(f"cannot take the run dir lock {lock}; delete it if no run uses {lock.parent}")


def claim_run_dir(cfg: DictConfig, out_dir: Path):
    """On the first process: refuse a run dir that another live run holds, and a non-empty one unless this run
    resumes (ckpt_path) or says overwrite=true. Returns a function that releases the lock (a no-op elsewhere)."""
    if not launched_rank_zero():
        return lambda: None
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    _take_lock(lock)

    def release() -> None:
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass

    try:
        left = _leftovers(out_dir)
        hpc = any(out_dir.glob("hpc_ckpt_*.ckpt"))  # a requeued SLURM job: Lightning resumes from it itself
        if left and cfg.get("ckpt_path") is None and not cfg.get("overwrite", False) and not hpc:
            shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
            raise ConfigError(
                f"run dir {out_dir} already holds an earlier run ({shown}); resume it with ckpt_path=last, "
                "pick a new hydra.run.dir, or pass overwrite=true to train afresh over it"
            )
        if left and cfg.get("overwrite", False) and cfg.get("ckpt_path") is None:
            # a fresh run must not inherit the old run's checkpoints (a stale best.ckpt would make Lightning
            # write best-v1.ckpt beside it) nor its metrics
            import shutil

            for name in ("checkpoints", "metrics.csv"):
                p = out_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            for p in out_dir.glob("metrics.before-*.csv"):
                p.unlink()
            log.warning("overwrite=true: removed the earlier run's checkpoints and metrics in %s", out_dir)
    except BaseException:
        release()
        raise
    return release


# ---- finding a checkpoint to resume ------------------------------------------------------------------------


def checkpoint_is_valid(path: Path) -> tuple[bool, str]:
    """Does this checkpoint load? (a file: torch.load weights-only, memory-mapped; a sharded dir: its metadata)"""
    if path.is_dir():
        from microgpt.io.consolidate import is_sharded_checkpoint

        return (True, "") if is_sharded_checkpoint(path) else (False, "not a checkpoint directory")
    try:
        if path.stat().st_size == 0:
            return False, "empty (0 bytes)"
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            return False, "not a Lightning checkpoint"
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, msg[:120]
    return True, ""


def checkpoint_candidates(out_dir: Path) -> list[Path]:
    """Every checkpoint a run dir may resume from, newest first: last.ckpt, SLURM's hpc_ckpt_N.ckpt, best*.ckpt
    and any other .ckpt in checkpoints/."""
    ckdir = out_dir / "checkpoints"
    found = {out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")}
    if ckdir.is_dir():
        found |= {p for p in ckdir.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")}
    found = {p for p in found if p.exists()}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_valid_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint in the run dir that loads; says which one, and why newer ones were skipped."""
    skipped = []
    for p in checkpoint_candidates(out_dir):
        ok, why = checkpoint_is_valid(p)
        if ok:
            if skipped:
                log.warning(
                    "ckpt_path=last: skipped %s; resuming from %s (the newest checkpoint that loads)",
                    "; ".join(skipped),
                    p,
                )
            else:
                log.info("ckpt_path=last: resuming from %s", p)
            return p
        skipped.append(f"{p.name} ({why})")
    if skipped:
        log.warning(
            "ckpt_path=last: no checkpoint in %s loads (%s); starting from scratch", out_dir, "; ".join(skipped)
        )
    return None


# ---- the trainer ----------------------------------------------------------------------------------------------


def prepare_trainer(trainer, out_dir: Path) -> None:
    """Atomic single-file checkpoints; remove the temp files an interrupted save left behind."""
    from microgpt.io.atomic import use_atomic_checkpoints

    use_atomic_checkpoints(trainer)
    if trainer.is_global_zero:
        ck = trainer.checkpoint_callback
        for d in {out_dir, out_dir / "checkpoints", Path(ck.dirpath) if ck is not None and ck.dirpath else out_dir}:
            remove_stale_temps(d)


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a resumable checkpoint; the CLI exits 128 + signal."""

    def __init__(self, signum: int, step: int, path: str | None, rank_zero: bool = True):
        self.signum, self.step, self.path, self.rank_zero = signum, step, path, rank_zero
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"saved a resumable checkpoint to {path}" if path else "no checkpoint could be saved"
        super().__init__(f"stopped by {name} after step {step}; {saved}")


def resume_command(out_dir: Path) -> str:
    """The command that continues this run: the same overrides, this run dir, ckpt_path=last."""
    args: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        args = [
            o
            for o in HydraConfig.get().overrides.task
            if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir", "overwrite")
        ]
    except Exception:
        pass
    quoted = [a if all(c.isalnum() or c in "._-=/:,+" for c in a) else repr(a) for a in args]
    return " ".join(["python train.py", *quoted, f"hydra.run.dir={out_dir}", "ckpt_path=last"])


@contextlib.contextmanager
def _as_lightning_resumes_it(trainer, validated: bool):
    """The loop state a signal checkpoint must hold for Lightning to resume it at the right logging step.

    The signal stops training after a step's validation and after Lightning counted the step for its loggers
    (`_batches_that_stepped`, the `step` of metrics.csv). Lightning resumes a checkpoint whose last batch is
    complete at a validation step as if it had been saved by ModelCheckpoint at that validation's end, before
    that count, and counts the step again: every logged step after the resume would be one too high. So such a
    checkpoint is saved with the count Lightning expects there (one less); the live loop is left as it was.
    """
    loop = trainer.fit_loop.epoch_loop
    count = getattr(loop, "_batches_that_stepped", None)
    total = loop.batch_progress.total
    on_last = total.ready == total.started == total.processed == total.completed
    adjust = validated and on_last and count is not None and count == trainer.global_step
    if adjust:
        loop._batches_that_stepped = count - 1
    try:
        yield
    finally:
        if adjust:
            loop._batches_that_stepped = count


class SafetyCallback(L.Callback):
    """Signals, the end-of-training validation and the end-of-run sample (see the module docstring)."""

    def __init__(self, out_dir: Path, sample: Any = None, tokenizer: Any = None):
        self.out_dir = Path(out_dir)
        self.sample, self.tokenizer = sample, tokenizer
        self.signum: int | None = None
        self.stopped: StoppedBySignal | None = None
        self._old: dict[int, Any] = {}
        self._validated_at = -1  # the global step of the last finished validation during training

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def setup(self, trainer, pl_module, stage: str) -> None:
        # in every training process: one started by a spawning strategy (ddp_spawn) ran train.py's start-up
        # lines on import but not microgpt.training.train.fit, where the launching process resumed its GC
        from microgpt.lean_imports import resume_gc

        resume_gc()

    # -- signals: the handler only records the signal. Lightning stops on `trainer.received_sigterm` (raising
    #    SIGTERMException at the next step boundary), but it reads that flag on each rank separately at several
    #    points, and its own SIGTERM handler runs a collective from inside the handler; a rank that sees the flag
    #    one step before another leaves the other waiting in a collective forever. So the flag is set here, on
    #    every rank at once: alone, as soon as the signal comes; with several ranks, at the end of a step, after
    #    one all-reduce (max) of "did this rank get a signal". One rank receiving it is enough. The checkpoint
    #    is saved in on_exception, on every rank (sharded strategies save collectively).
    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        ck = trainer.checkpoint_callback
        if (
            ck is not None
            and getattr(ck, "save_last", False)
            and not getattr(ck, "last_model_path", "x")
            and ck.dirpath
        ):
            # resumed from a checkpoint saved before the first last.ckpt (best.ckpt, hpc): the last.ckpt beside it
            # belongs to this run; overwrite it rather than writing last-v1.ckpt next to a stale one
            last = Path(ck.dirpath) / f"{ck.CHECKPOINT_NAME_LAST}{ck.FILE_EXTENSION}"
            if last.exists():
                ck.last_model_path = str(last)
        if threading.current_thread() is not threading.main_thread():
            return
        conn = trainer._signal_connector

        def on_signal(signum, frame) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            if self.signum is None:
                self.signum = signum
                if trainer.is_global_zero:
                    print(
                        f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping",
                        file=sys.stderr,
                        flush=True,
                    )
            if trainer.world_size == 1:
                conn.received_sigterm = True  # several ranks: agreed on in on_train_batch_end

        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.getsignal(s)
            signal.signal(s, on_signal)

    def _restore_signals(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_signals()
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signum or signal.SIGTERM
        ck = trainer.checkpoint_callback
        ckdir = Path(ck.dirpath) if ck is not None and ck.dirpath else self.out_dir / "checkpoints"
        path = ckdir / "last.ckpt"
        if ck is not None and hasattr(ck, "last_model_path"):
            # recorded in the saved state, so that the resumed run overwrites last.ckpt instead of adding last-v1
            ck.last_model_path = str(path)
        try:
            with _as_lightning_resumes_it(trainer, validated=self._validated_at == trainer.global_step):
                trainer.save_checkpoint(path)
        except MicroGPTError as e:
            log.error("could not save a checkpoint on %s: %s", signal.Signals(signum).name, e)
            path = None
        self.stopped = StoppedBySignal(signum, trainer.global_step, str(path) if path else None, trainer.is_global_zero)

    # -- always validate (and so checkpoint) at the end: Lightning validates after a step that sets should_stop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            signum = self._agreed_signal(trainer)
            if signum:
                self.signum = self.signum or signum  # a rank the signal did not reach reports the same one
                trainer._signal_connector.received_sigterm = True  # every rank, the same step
        max_steps = trainer.max_steps
        if max_steps is not None and 0 < max_steps <= trainer.global_step:
            # a no-op when this step validates anyway; otherwise the one validation of a short run
            trainer.should_stop = True

    def _agreed_signal(self, trainer) -> int:
        """The largest signal number any rank received (0: none), by one all-reduce every rank joins."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signals()
        if self.sample is None or self.tokenizer is None:
            return
        # every rank generates the same tokens (same weights, same seed): a sharded model's forward is collective
        from microgpt.training.train import print_sample

        print_sample(pl_module.model, self.tokenizer, self.sample, show=trainer.is_global_zero)
        pl_module.train()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(doc, indent=1, default=_jsonable), what="result file")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
