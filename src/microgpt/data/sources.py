"""Text sources: functions registered in `SOURCE` that return the whole training corpus as one string.

`stdlib` is the default: the running Python's own standard library, so training works with no download.
"""

from __future__ import annotations

import glob
import http.client
import os
import sysconfig
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from microgpt.errors import ConfigError, DataError, first_line
from microgpt.registry import SOURCE

__all__ = [
    "SHAKESPEARE_URL",
    "cache_root",
    "hf_source",
    "read_text_files",
    "resolve_text_paths",
    "shakespeare_source",
    "stdlib_source",
    "text_source",
]

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_SNIFF_BYTES = 8192
# stdlib directories holding tests (and installed packages) rather than library code
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def cache_root() -> Path:
    """Root of microgpt's caches: $MICROGPT_CACHE, else ~/.cache/microgpt."""
    env = os.environ.get("MICROGPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "microgpt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def resolve_text_paths(path: str | os.PathLike) -> list[Path]:
    """A file, a directory (every non-hidden regular file below it, sorted) or a glob pattern -> files."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(p))]
        if not files:
            raise DataError(f"data.path={path} is a directory with no files; pass a text file or a non-empty directory")
        return sorted(files, key=lambda f: f.relative_to(p).as_posix())
    if glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data.path={path} matches no files; check the pattern or pass a file with data.path=...")
        return files
    raise DataError(
        f"data.path={path} does not exist; pass an existing text file, directory or glob with data.path=..."
    )


def _decode_file(f: Path, data: bytes) -> str:
    """UTF-8 text of a file, or a DataError naming what is wrong with it."""
    nul = data.find(b"\0", 0, _SNIFF_BYTES)
    if nul != -1:
        raise DataError(
            f"data file {f} looks binary (NUL byte at offset {nul}); pass text files only with data.path=..."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {f} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "pass a UTF-8 text file with data.path=..."
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 BOM is an encoding marker, not text


def read_text_files(files: list[Path], path: str | os.PathLike) -> str:
    """Read and check files, join them with newlines. Whitespace-only files count as empty."""
    texts = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(
                f"cannot read data file {f} ({e.strerror}); pass a readable file with data.path=..."
            ) from None
        text = _decode_file(f, data)
        if not text.strip():
            if len(files) == 1:
                raise DataError(f"data file {f} is empty; pass a file with text in it with data.path=...")
            continue  # an empty file among many (e.g. an __init__.py) adds nothing
        texts.append(text)
    if not texts:
        raise DataError(f"all {len(files)} files under data.path={path} are empty; pass files with text in them")
    return "\n".join(texts)


@SOURCE.register("text")
def text_source(path: str | None = None) -> str:
    """Local text: a file, a directory (all non-hidden files, recursively, sorted) or a glob pattern."""
    if path is None:
        raise ConfigError("data source 'text' needs data.path=FILE, DIR or GLOB")
    return read_text_files(resolve_text_paths(path), path)


@SOURCE.register("shakespeare")
def shakespeare_source(
    path: str | None = None, cache_dir: str | None = None, url: str = SHAKESPEARE_URL, timeout: float = 10.0
) -> str:
    """Tiny Shakespeare (1.1 MB): `path` if given, else a cached copy, else downloaded once into the cache."""
    if path is not None:
        return text_source(path)
    cached = Path(cache_dir).expanduser() if cache_dir else cache_root() / "downloads"
    cached = cached / "tinyshakespeare.txt"
    if not cached.is_file():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
        except (OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download tiny Shakespeare ({reason}); you are probably offline: "
                "pass a local copy with data.path=/path/to/tinyshakespeare.txt"
            ) from None
        _decode_file(cached, data)  # never cache an error page that is not text
        try:
            atomic_write_bytes(cached, data)
        except OSError as e:
            raise DataError(
                f"cannot write {cached} ({e.strerror}); set data.cache_dir=... or MICROGPT_CACHE to a writable directory"
            ) from None
    return read_text_files([cached], cached)


@SOURCE.register("hf")
def hf_source(
    dataset: str | None = None,
    config: str | None = None,
    split: str = "train",
    data_files: Any = None,
    text_column: str = "text",
    max_rows: int | None = None,
    path: str | None = None,
    cache_dir: str | None = None,
    **load_kwargs: Any,
) -> str:
    """A HF `datasets` dataset's text column, rows joined with newlines: `load_dataset(dataset, config, ...)`.

    `data.path=FILE` alone loads local files with the `text` builder; it works offline. (The option is
    `dataset`, not `name`, because `Registry.build(name, ...)` takes `name` itself.)
    """
    if path is not None:
        dataset = dataset or "text"
        data_files = data_files or path
    if dataset is None:
        raise ConfigError("data source 'hf' needs data.source_options.dataset=NAME (or data.path=FILE for local text)")
    name = dataset
    if max_rows is not None and max_rows <= 0:
        raise ConfigError(f"data.source_options.max_rows must be > 0, got {max_rows}")
    try:
        import datasets
    except ImportError:
        raise DataError("data source 'hf' needs the datasets package: pip install datasets") from None
    if cache_dir is not None:
        load_kwargs["cache_dir"] = str(Path(cache_dir).expanduser() / "hf_datasets")
    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files, **load_kwargs)
    except Exception as e:  # datasets raises many types (hub, file, builder errors); all mean "cannot load"
        first = first_line(e)
        raise DataError(
            f"could not load HF dataset '{name}' ({type(e).__name__}: {first}); "
            "offline, use a local file instead: data=text data.path=..."
        ) from None
    if text_column not in ds.column_names:
        raise DataError(
            f"HF dataset '{name}' has no column '{text_column}'; its columns are {', '.join(ds.column_names)}: "
            "set data.source_options.text_column=..."
        )
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    text = "\n".join(str(t) for t in ds[text_column] if t is not None)
    if not text.strip():
        raise DataError(f"HF dataset '{name}' split '{split}' has no text in column '{text_column}'")
    return text


def _stdlib_files(root: Path) -> list[Path]:
    """Every library *.py file below root, sorted by relative path, without tests or installed packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("test_"):
                files.append(Path(dirpath, fn))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


@SOURCE.register("stdlib")
def stdlib_source(max_bytes: int | None = 4_000_000) -> str:
    """The running Python's standard library source, each file headed by `# file: <relative path>`.

    Real code with no download; deterministic for a given Python install. `max_bytes` caps the UTF-8
    size (the last file is cut to fit); None reads it all (~13 MB).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"data.source_options.max_bytes must be > 0, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for f in _stdlib_files(root):
        try:
            body = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few legacy files are not UTF-8; skipping them keeps the corpus clean
        piece = f"# file: {f.relative_to(root).as_posix()}\n{body}\n".encode()
        if max_bytes is not None and total + len(piece) > max_bytes:
            parts.append(piece[: max_bytes - total].decode("utf-8", errors="ignore"))
            break
        parts.append(piece.decode("utf-8"))
        total += len(piece)
    text = "".join(parts)
    if not text.strip():
        raise DataError(f"no standard library sources found under {root}; use data=text data.path=... instead")
    return text
