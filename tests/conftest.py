"""Shared fixtures. Tests never touch the network; token caches go to a per-session temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# 320 KB of tiny Shakespeare (public domain) committed with the tests: they never read ../shared (tests/fixtures/)
SHAKESPEARE = ROOT / "tests" / "fixtures" / "shakespeare.txt"
PY = sys.executable
# only bench/ may read the shared data folder beside the checkout; a test that opens a file there fails
_SHARED_DIRS = {str(ROOT.parent / "shared"), os.environ.get("MICROGPT_SHARED") or ""}  # shared-guard
FORBIDDEN_DIRS = tuple(os.path.abspath(d) + os.sep for d in _SHARED_DIRS if d)
# opt-in: llama.cpp running our GGUF exports needs llama-cpp-python, a ~15-minute C++ build that is not a dev
# dependency; `make test-llamacpp` builds it once (scripts/llamacpp_wheel.sh) and sets MICROGPT_LLAMACPP=1
collect_ignore_glob = [] if os.environ.get("MICROGPT_LLAMACPP") == "1" else ["llamacpp/*"]


class SharedFolderRead(RuntimeError):
    """Raised when a test opens a file in the shared data folder: tests must stand on their own."""


def _no_shared_reads(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.abspath(path).startswith(FORBIDDEN_DIRS):
            msg = f"a test opened {path}: tests must not read ../shared; use tests/fixtures/"  # shared-guard
            raise SharedFolderRead(msg)


sys.addaudithook(_no_shared_reads)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("microgpt-cache")
    os.environ["MICROGPT_CACHE"] = str(cache)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    yield cache


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return SHAKESPEARE


@pytest.fixture
def small_text(tmp_path) -> Path:
    """The first 60 KB of the Shakespeare fixture: enough for nano-model runs, quick to tokenize."""
    p = tmp_path / "small.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


def compose(overrides: list[str], output_dir: str | Path | None = None):
    """Compose conf/train.yaml with overrides, the way train.py does (no run dir is created)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    ov = list(overrides)
    if output_dir is not None:
        ov.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="train", overrides=ov)


def run_cli(
    args: list[str], timeout: float = 300, cwd: Path = ROOT, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python <args>` in a subprocess with a timeout; returns the completed process (text mode)."""
    # one thread per process: tiny models gain nothing from a second one, and multi-process tests
    # would oversubscribe the cores
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # a session of its own, so a timeout kills every rank it started, not just the direct child
    p = subprocess.Popen(
        [PY, *args], cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
