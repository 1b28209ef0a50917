"""Crash-safe file writes: a temp file in the destination directory, fsync, then rename over the target.

A rename within one directory is atomic on POSIX filesystems, so a reader (or a resume after kill -9, a power
cut or a full disk) sees either the whole old file or the whole new one, never a truncated mix. Lightning's
own `_atomic_save` writes its temp file in $TMPDIR and moves it: across filesystems that move is a copy that
truncates the target first. `AtomicCheckpointIO` replaces it for every single-file checkpoint.

Temp files are named `.<target>.<pid>.microgpt-tmp`; `remove_stale_temps` deletes those left by a dead writer.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from microgpt.errors import CheckpointError, MicroGPTError

log = logging.getLogger("microgpt")

TEMP_SUFFIX = ".microgpt-tmp"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(MicroGPTError):
    """No space left where a file was being written; the previous version of the file is kept."""


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], Any], what: str = "file") -> None:
    """Write `data` (bytes, text as UTF-8, or a callable that writes to a binary file object) to `path` so that
    `path` is either its old content or the complete new one. A full disk raises DiskFullError (one line,
    the old file kept); the temp file is always removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise DiskFullError(
                f"no space left on the device writing {what} {path} ({e.strerror}); {kept}. Free space in {path.parent}"
            ) from None
        raise
    _fsync_dir(path.parent)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer left in `directory` (those of live processes on this host are kept)."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.glob(f".*{TEMP_SUFFIX}"):
        pid = p.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():  # a sharded checkpoint directory's (see atomic_sharded_saves)
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info("removed %d unfinished temp file(s) of an earlier, interrupted write in %s", len(removed), d)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _torch_checkpoint_io():
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """TorchCheckpointIO whose save writes a temp file beside the target, fsyncs it and renames it over."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
            if storage_options is not None:
                return super().save_checkpoint(checkpoint, path, storage_options)
            import torch

            try:
                atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint")
            except DiskFullError as e:
                raise CheckpointError(str(e)) from None

    return AtomicCheckpointIO


def __getattr__(name: str):
    if name == "AtomicCheckpointIO":  # built lazily: importing Lightning costs seconds
        cls = _torch_checkpoint_io()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _writes_directories(strategy) -> bool:
    """Does this strategy write sharded checkpoint directories itself (DeepSpeed; FSDP / model parallel with
    sharded state dicts)?"""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return True
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy, "_state_dict_type", "full") == "sharded"
    if isinstance(strategy, ModelParallelStrategy):
        return bool(getattr(strategy, "_save_distributed_checkpoint", True))
    return False


def use_atomic_checkpoints(trainer) -> bool:
    """Give the trainer's strategy an AtomicCheckpointIO when it saves through Lightning's plain TorchCheckpointIO
    (single files: auto, ddp, and the consolidated files of the others); a strategy that writes sharded
    directories itself (DeepSpeed, torch.distributed.checkpoint) saves into a temp directory renamed into place
    (`atomic_sharded_saves`). Returns whether it did either."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None:
        try:
            current = strategy.checkpoint_io
        except Exception:
            return False
    if _writes_directories(strategy):
        atomic_sharded_saves(strategy)
        return True
    if type(current) is not TorchCheckpointIO:
        return False
    from microgpt.io.atomic import AtomicCheckpointIO

    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` (a file or a directory) to `path`; an old `path` is renamed aside first and
    removed after. Between the two renames `path` is missing for an instant, never half-written."""
    import shutil

    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old.{os.getpid()}{TEMP_SUFFIX}")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def atomic_sharded_saves(strategy) -> None:
    """Make a strategy that writes checkpoint *directories* itself (DeepSpeed, FSDP/distcp) write them atomically:
    every rank saves into `.<name>.<pid of rank 0>.microgpt-tmp` beside the target, and once all have finished,
    global rank 0 renames it over the target (on a filesystem that is not shared, each node's first rank renames
    its own copy). Saving in place instead overwrote the old shards one by one, so a kill during the save left
    the old metadata over a mix of old and new shards, which `ckpt_path=last` could not tell from a good one."""
    if getattr(strategy, "_microgpt_atomic_sharded", False):
        return
    inner = strategy.save_checkpoint

    def save_checkpoint(checkpoint, filepath, storage_options=None):
        import shutil

        path = Path(filepath)
        pid = strategy.broadcast(os.getpid(), src=0)  # one temp name for all ranks
        tmp = path.with_name(f".{path.name}.{pid}{TEMP_SUFFIX}")
        first_on_node = strategy.local_rank == 0
        if first_on_node and tmp.exists():  # left by an earlier failed save of this process
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        strategy.barrier("microgpt.atomic_sharded_saves.start")
        try:
            inner(checkpoint, tmp, storage_options)
        except BaseException:
            if first_on_node:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise
        strategy.barrier("microgpt.atomic_sharded_saves.saved")
        if strategy.is_global_zero:
            _swap_into_place(tmp, path)
        strategy.barrier("microgpt.atomic_sharded_saves.renamed")
        if first_on_node and not strategy.is_global_zero and tmp.exists():  # this node's disk is its own
            _swap_into_place(tmp, path)
        strategy.barrier("microgpt.atomic_sharded_saves.done")

    strategy.save_checkpoint = save_checkpoint
    strategy._microgpt_atomic_sharded = True


def check_writable_dir(path: str | os.PathLike, what: str = "out") -> None:
    """Fail early, in one line, when `path` (a directory to be created or written) cannot be written: tried with
    a temp file in its nearest existing ancestor, so nothing is left behind either way."""
    import tempfile

    p = Path(path).expanduser().absolute()
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise MicroGPTError(f"{what}={path}: {base} is not a directory; pass a directory path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise MicroGPTError(f"{what}={path} is not writable ({base}: {e.strerror}); pass a writable {what}=") from None
