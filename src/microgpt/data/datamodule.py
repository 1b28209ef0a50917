"""TokenDataModule: text -> tokens (cached as memory-mapped files) -> nanoGPT-style random-window batches."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from microgpt.data.sources import atomic_write_bytes, cache_root
from microgpt.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_dict
from microgpt.errors import ConfigError, DataError, MicroGPTError
from microgpt.registry import SOURCE

__all__ = ["RandomWindows", "TokenDataModule", "ValWindows", "batch_seed"]

# bump when the token-file format or a tokenizer's fitting changes, so old cache entries are not reused
_CACHE_VERSION = 1


def batch_seed(seed: int, k: int, rank: int = 0, stream: str = "train") -> int:
    """A 63-bit generator seed that depends only on (seed, stream, rank, k): batch k is reproducible."""
    h = hashlib.blake2b(f"{stream}:{seed}:{rank}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _windows(data: np.ndarray, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = data[i : i+T], y = data[i+1 : i+1+T] for each start i, as int64 (B, T) tensors."""
    idx = starts.numpy()[:, None] + np.arange(block_size + 1)
    w = torch.from_numpy(np.asarray(data)[idx].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class RandomWindows(IterableDataset):
    """Infinite stream of random contiguous windows, like nanoGPT's get_batch.

    Batch k is drawn with its own generator seeded from (seed, rank, k), so it does not depend on what came
    before: a run resumed at batch k sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, start: int = 0):
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start = start

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, k, self.rank))
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=g)
        return _windows(self.data, ix, self.block_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class ValWindows(Dataset):
    """A fixed set of `n_batches` random-window batches: every evaluation sees the same ones."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int):
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.seed = seed

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= j < self.n_batches:
            raise IndexError(j)
        # rank-independent on purpose: Lightning's distributed sampler shares these batches out
        g = torch.Generator().manual_seed(batch_seed(self.seed, j, stream="val"))
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=g)
        return _windows(self.data, ix, self.block_size)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"data.{name} must be > 0, got {value}")


def tokenizer_mismatch(tok: Tokenizer, text: str) -> str:
    """Why a checkpoint's fixed tokenizer cannot encode `text`, with advice that works when the tokenizer
    cannot change (fine-tuning, evaluating): a tokenizer setting would be ignored there."""
    chars = getattr(tok, "chars", None)
    if chars is not None:
        missing = sorted(set(text) - set(chars))
        shown = ", ".join(repr(c) for c in missing[:8]) + (", ..." if len(missing) > 8 else "")
        return (
            f"this text has {len(missing)} character(s) outside the model's char vocabulary of {tok.vocab_size} "
            f"({shown}), and a checkpoint's tokenizer cannot grow; remove or replace them in the text, or train "
            "a new model from scratch with data.tokenizer=byte (which encodes any text)"
        )
    return (
        f"the model's {tok.name} tokenizer (vocab {tok.vocab_size}) cannot encode this text; "
        "use text the model's tokenizer covers, or train a new model instead of starting from this checkpoint"
    )


class TokenDataModule(L.LightningDataModule):
    """Reads text from a SOURCE, tokenizes it once (cached), and serves random-window batches.

    Usable without a Trainer: `dm.setup()` then `dm.train_dataloader()`.
    """

    def __init__(
        self,
        source: str = "stdlib",
        path: str | None = None,
        tokenizer: str = "char",
        vocab_size: int | None = None,
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        eval_batches: int = 20,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        seed: int = 1337,
        source_options: dict[str, Any] | None = None,
        tokenizer_obj: Tokenizer | None = None,
        tokenizer_path: str | None = None,
    ):
        super().__init__()
        _positive("batch_size", batch_size)
        _positive("block_size", block_size)
        _positive("eval_batches", eval_batches)
        if eval_batch_size is not None:
            _positive("eval_batch_size", eval_batch_size)
        if vocab_size is not None:
            _positive("vocab_size", vocab_size)
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        SOURCE.get(source)  # fail on an unknown name now, not after minutes of setup
        self.source = source
        self.path = None if path is None else str(path)
        self.tokenizer_name = tokenizer
        self.requested_vocab_size = vocab_size
        self.tokenizer_path = tokenizer_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.eval_batches = eval_batches
        # the val windows' batch size (default: batch_size); a recipe that trains on larger batches can keep
        # the evaluation of a smaller-batch baseline: the same windows, given the same seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root() / "tokens"
        self.seed = int(seed)
        self.source_options = dict(source_options or {})
        self._given_tokenizer = tokenizer_obj

        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.train_tokens: np.memmap | None = None
        self.val_tokens: np.memmap | None = None
        self.bytes_per_token: float | None = None
        self.cache_key: str | None = None
        self.cache_hit: bool | None = None  # False when the last setup had to tokenize
        self._restored: dict[str, Any] | None = None

    # ---- setup ----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Lightning calls this once per node before setup on any rank: fill the caches there, so the
        # other ranks only read them
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return  # idempotent: Lightning calls setup per stage
        text = self._read_text()
        tok = self._tokenizer_for(text)
        tokens = self._tokens(text, tok)
        n = len(tokens)
        n_train = int(n * (1 - self.val_fraction))
        need = self.block_size + 1
        for split, length in (("train", n_train), ("val", n - n_train)):
            if length < need:
                raise DataError(
                    f"corpus too short: the {split} split has {length} tokens but one block needs "
                    f"block_size+1={need}; use more text or a smaller model.block_size"
                )
        self.tokenizer = tok
        self.vocab_size = tok.vocab_size
        self.train_tokens = tokens[:n_train]
        self.val_tokens = tokens[n_train:]
        self.bytes_per_token = tok.count_bytes(self.val_tokens) / len(self.val_tokens)

    def _read_text(self) -> str:
        fn = SOURCE.get(self.source)
        kwargs = dict(self.source_options)
        if self.path is not None:
            kwargs["path"] = self.path
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in kwargs:
            if key not in params and not takes_any:
                if key == "path":
                    raise ConfigError(
                        f"data source '{self.source}' takes no data.path; use data=text data.path=... for your own files"
                    )
                options = ", ".join(k for k in params if k != "cache_dir") or "none"
                raise ConfigError(f"data source '{self.source}' has no option '{key}'; its options are: {options}")
        if "cache_dir" in params and "cache_dir" not in kwargs:
            kwargs["cache_dir"] = str(self.cache_dir)
        text = fn(**kwargs)
        if not isinstance(text, str) or not text:
            raise DataError(f"data source '{self.source}' returned no text; check its data.* settings")
        return text

    def _tokenizer_for(self, text: str) -> Tokenizer:
        given = self._given_tokenizer
        if given is None and self._restored is not None and self._restored.get("tokenizer"):
            given = tokenizer_from_dict(self._restored["tokenizer"])
        if given is not None:
            return given
        if self.tokenizer_name == "bpe":
            return self._cached_fit(text)
        return build_tokenizer(self.tokenizer_name, text, self.requested_vocab_size, path=self.tokenizer_path)

    def _cached_fit(self, text: str) -> Tokenizer:
        """BPE training takes about a second on the default corpus: keep the result next to the tokens."""
        h = hashlib.sha256(text.encode("utf-8"))
        h.update(json.dumps([_CACHE_VERSION, self.tokenizer_name, self.requested_vocab_size]).encode())
        f = self.cache_dir / f"fit-{h.hexdigest()}.json"
        if f.is_file():
            try:
                return tokenizer_from_dict(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError, MicroGPTError):
                pass  # a damaged entry is refitted below
        tok = build_tokenizer(self.tokenizer_name, text, self.requested_vocab_size, path=self.tokenizer_path)
        self._write_cache(f, json.dumps(tok.to_dict()).encode("utf-8"))
        return tok

    def _write_cache(self, f: Path, data: bytes) -> None:
        try:
            atomic_write_bytes(f, data)
        except OSError as e:
            raise DataError(
                f"cannot write the token cache {f} ({e.strerror}); set data.cache_dir=... or MICROGPT_CACHE "
                "to a writable directory"
            ) from None

    def _encode(self, text: str, tok: Tokenizer) -> np.ndarray:
        if self._given_tokenizer is None and not (self._restored or {}).get("tokenizer"):
            return tok.encode_array(text)  # fitted on this very text: it covers it
        # a tokenizer from a checkpoint must cover this text; say so in terms of vocabularies
        try:
            return tok.encode_array(text)
        except DataError:
            raise DataError(tokenizer_mismatch(tok, text)) from None

    def _tokens(self, text: str, tok: Tokenizer) -> np.memmap:
        tok_json = json.dumps(tok.to_dict(), sort_keys=True)
        h = hashlib.sha256(f"microgpt-tokens-v{_CACHE_VERSION}\0".encode())
        h.update(text.encode("utf-8"))
        h.update(b"\0")
        h.update(tok_json.encode("utf-8"))
        key = h.hexdigest()
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
        bin_path = self.cache_dir / f"{key}.bin"
        meta_path = self.cache_dir / f"{key}.json"
        meta = None
        if meta_path.is_file() and bin_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = None
        if (
            meta is not None
            and meta.get("dtype") == dtype.name
            and bin_path.stat().st_size == meta.get("n_tokens", -1) * dtype.itemsize
        ):
            self.cache_hit = True
        else:
            ids = self._encode(text, tok)
            if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                raise DataError(f"tokenizer '{tok.name}' produced ids outside its vocab of {tok.vocab_size}")
            # the .bin first, the .json last: the .json marks a complete entry
            self._write_cache(bin_path, ids.astype(dtype).tobytes())
            meta = {
                "n_tokens": len(ids),
                "dtype": dtype.name,
                "tokenizer": tok.name,
                "vocab_size": tok.vocab_size,
                "text_bytes": len(text.encode("utf-8")),
            }
            self._write_cache(meta_path, json.dumps(meta).encode("utf-8"))
            self.cache_hit = False
        self.cache_key = key
        if meta["n_tokens"] == 0:
            raise DataError("the corpus encodes to no tokens; use more text")
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the datamodule: send settings, not the token arrays (each process re-opens
        # the memory-mapped cache in setup)
        state = self.__dict__.copy()
        state.update(train_tokens=None, val_tokens=None)
        return state

    # ---- loaders --------------------------------------------------------------------------------------

    def _require_setup(self) -> None:
        if self.train_tokens is None:
            self.setup()

    def _trainer_attr(self, name: str, default: int) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, name, default)) if trainer is not None else default

    def train_dataset(self, start: int = 0, rank: int = 0) -> RandomWindows:
        self._require_setup()
        return RandomWindows(self.train_tokens, self.block_size, self.batch_size, self.seed, rank=rank, start=start)

    def val_dataset(self) -> ValWindows:
        self._require_setup()
        return ValWindows(self.val_tokens, self.block_size, self.eval_batch_size, self.eval_batches, self.seed)

    def train_dataloader(self) -> DataLoader:
        # batches already consumed = optimizer steps x micro-batches per step: resume with the next one
        start = self._trainer_attr("global_step", 0) * self._trainer_attr("accumulate_grad_batches", 1)
        ds = self.train_dataset(start=start, rank=self._trainer_attr("global_rank", 0))
        # an explicit generator: otherwise each new iterator draws from torch's global RNG, which is
        # restored on resume, and dropout after a resume would see a different stream
        return DataLoader(
            ds, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available(), generator=torch.Generator()
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset(),
            batch_size=None,
            shuffle=False,
            num_workers=0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )

    def full_val_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping consecutive blocks over the whole val split, for an exact evaluation.

        Every val token after the first is a target exactly once; the tail shorter than block_size comes
        last as a (1, r) batch, so weight losses by `y.numel()`.
        """
        self._require_setup()
        bs = self.batch_size if batch_size is None else batch_size
        _positive("batch_size", bs)
        data, T = self.val_tokens, self.block_size
        n_blocks = (len(data) - 1) // T
        for b in range(0, n_blocks, bs):
            starts = torch.arange(b, min(b + bs, n_blocks)) * T
            yield _windows(data, starts, T)
        tail = len(data) - 1 - n_blocks * T
        if tail > 0:
            w = torch.from_numpy(np.asarray(data[n_blocks * T :], dtype=np.int64))
            yield w[None, :-1].clone(), w[None, 1:].clone()

    # ---- checkpoint state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What data a checkpoint saw: the tokenizer (to rebuild it) and the token cache key."""
        if self.tokenizer is None:
            return dict(self._restored or {})
        return {
            "tokenizer": self.tokenizer.to_dict(),
            "cache_key": self.cache_key,
            "source": self.source,
            "path": self.path,
            "n_train_tokens": len(self.train_tokens),
            "n_val_tokens": len(self.val_tokens),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Before setup: use the checkpoint's tokenizer. After setup: check the data still matches it."""
        self._restored = dict(state_dict)
        saved = state_dict.get("tokenizer")
        if self.tokenizer is None or not saved:
            return
        if saved != self.tokenizer.to_dict():
            old = tokenizer_from_dict(saved)
            raise DataError(
                f"the checkpoint was trained with a {old.name} tokenizer of vocab {old.vocab_size}, but this data "
                f"gives a {self.tokenizer.name} tokenizer of vocab {self.vocab_size}; resume on the same data "
                "and data.tokenizer"
            )
        if state_dict.get("cache_key") not in (None, self.cache_key):
            rank_zero_warn("resuming on different text than the checkpoint was trained on (same tokenizer)")
