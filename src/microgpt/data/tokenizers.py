"""Tokenizers: text <-> token ids, each fully described by a JSON-serialisable dict.

A checkpoint stores `tokenizer.to_dict()`, and `tokenizer_from_dict` rebuilds the same tokenizer with no
other file, so a trained model can always decode its own output.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from microgpt.errors import CheckpointError, ConfigError, DataError
from microgpt.registry import TOKENIZER, UnknownComponentError

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "bits_per_byte",
    "build_tokenizer",
    "tokenizer_from_dict",
]

DEFAULT_BPE_VOCAB = 1024
_REPLACEMENT = "\ufffd"


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list, a numpy array or a 1-D tensor of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        raise ValueError("decode takes a 1-D sequence of ids; decode each row of a batch separately")
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Common interface. Subclasses set `name` and `vocab_size` and implement the four methods below."""

    name: ClassVar[str] = ""
    vocab_size: int
    # a pretrained tokenizer's chat template (Jinja, as in tokenizer_config.json) and its named special
    # tokens ({"eos_token": "<|im_end|>", ...}); None / {} for tokenizers trained here
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}  # noqa: RUF012  (read-only class default)

    def token_id(self, token: str | None) -> int | None:
        """The id of one whole token (a special token's text), or None when the vocabulary lacks it."""
        return None

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id: the special eos_token, else GPT-2's <|endoftext|>, else None."""
        eos = self.token_id(self.special_tokens.get("eos_token"))
        return eos if eos is not None else self.token_id("<|endoftext|>")

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    @classmethod
    @abstractmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> Tokenizer:
        """Build the tokenizer for a corpus (a no-op for fixed vocabularies)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        """Rebuild from `to_dict()`'s output."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description that fully rebuilds this tokenizer."""

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to a 1-D integer array; the fast path used for whole corpora."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    @abstractmethod
    def decode(self, ids: Sequence[int] | Any) -> str:
        """ids -> text."""

    def count_bytes(self, ids: Sequence[int] | Any) -> int:
        """UTF-8 bytes of the text these ids stand for."""
        return len(self.decode(ids).encode("utf-8"))

    def bytes_per_token(self, text: str) -> float:
        """UTF-8 bytes per token on `text`; bits_per_byte = loss_nats / ln 2 / bytes_per_token."""
        n = len(self.encode_array(text))
        return len(text.encode("utf-8")) / max(n, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise ConfigError(f"data.tokenizer_path only applies to data.tokenizer=hf, not '{name}'; remove it")


@TOKENIZER.register("char")
class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    name = "char"

    def __init__(self, chars: str | Iterable[str]):
        chars = "".join(sorted(set(chars)))
        if not chars:
            raise DataError("cannot build a char tokenizer from empty text; pass a non-empty corpus with data.path=...")
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        # sorted code points: vectorised encoding by binary search (Python sorts str by code point)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> CharTokenizer:
        _no_path(cls.name, path)
        return cls(set(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(d["chars"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "chars": self.chars}

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, cps)
        np.minimum(idx, self.vocab_size - 1, out=idx)
        bad = self._codepoints[idx] != cps
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            ch = text[pos]
            raise DataError(
                f"character {ch!r} (U+{ord(ch):04X}) at offset {pos} is not in the char tokenizer's vocabulary "
                f"of {self.vocab_size}; use data.tokenizer=byte (or bpe), which encodes any text"
            )
        return idx.astype(np.int64)

    def decode(self, ids: Sequence[int] | Any) -> str:
        # ids outside the vocabulary (a model with a padded vocab can sample them) decode to U+FFFD
        v = self.vocab_size
        return "".join(self.chars[i] if 0 <= i < v else _REPLACEMENT for i in _as_id_list(ids))


@TOKENIZER.register("byte")
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: vocabulary 256, encodes any text."""

    name = "byte"
    vocab_size = 256

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> ByteTokenizer:
        _no_path(cls.name, path)
        return cls()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": 256}

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | Any) -> str:
        out = bytearray()
        for i in _as_id_list(ids):
            out.extend(bytes((i,)) if 0 <= i < 256 else _REPLACEMENT.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def count_bytes(self, ids: Sequence[int] | Any) -> int:
        return len(ids)  # exact even when a split cuts a multi-byte character


def _encode_chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Cut text into ~`size` pieces before a newline that follows a non-space character.

    No byte-level pre-token spans such a point (letters, digits and punctuation runs stop at whitespace,
    and a whitespace run starts there), so encoding the pieces gives exactly the ids of the whole text,
    while `encode_batch` can use every core and skip the offset bookkeeping of one huge string.
    """
    out, start, n = [], 0, len(text)
    while start < n:
        j = text.find("\n", start + size)
        while j != -1 and text[j - 1].isspace():
            j = text.find("\n", j + 1)
        if j == -1:
            out.append(text[start:])
            break
        out.append(text[start:j])
        start = j
    return out


_PER_CHAR_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents"}


def _chunk_safe(tok: Any) -> bool:
    """Whether encoding newline-cut pieces gives the ids of the whole text (see _encode_chunks): true for
    byte-level BPEs without a prefix space (GPT-2, SmolLM2, Qwen2); false where each piece would gain a
    start-of-text marker (Metaspace / Prepend: SentencePiece-style Llama 2 tokenizers) or anything unknown."""
    spec = json.loads(tok.to_str())

    def kinds(node: Any) -> list[dict]:
        if not isinstance(node, dict):
            return []
        subs = node.get("normalizers") or node.get("pretokenizers") or []
        return [node] + [k for sub in subs for k in kinds(sub)] if subs else [node]

    norms = [n.get("type") for n in kinds(spec.get("normalizer"))]
    pres = kinds(spec.get("pre_tokenizer"))
    byte_level = [p for p in pres if p.get("type") == "ByteLevel"]
    return (
        all(n in _PER_CHAR_NORMALIZERS | {"Sequence"} for n in norms)
        and bool(byte_level)
        and not any(p.get("add_prefix_space") for p in byte_level)
        and not any(p.get("type") == "Metaspace" for p in pres)
    )


class _HFBacked(Tokenizer):
    """A tokenizer wrapping a HF `tokenizers.Tokenizer`, stored as its JSON string (with the chat template
    and named special tokens of a pretrained one, when it has them)."""

    def __init__(self, tok: Any, chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._chunk_ok: bool | None = None  # whether encode_array may cut the text (decided on first use)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _HFBacked:
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_str(d["tokenizer_json"]), d.get("chat_template"), d.get("special_tokens"))

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "vocab_size": self.vocab_size, "tokenizer_json": self.tok.to_str()}
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        if self.special_tokens:
            d["special_tokens"] = dict(self.special_tokens)
        return d

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode_array(self, text: str) -> np.ndarray:
        if self._chunk_ok is None:
            self._chunk_ok = _chunk_safe(self.tok)
        if not self._chunk_ok:  # e.g. SentencePiece-style (Llama 2, TinyLlama): one piece, exactly
            return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        encs = self.tok.encode_batch(_encode_chunks(text), add_special_tokens=False)
        if not encs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    def decode(self, ids: Sequence[int] | Any) -> str:
        return self.tok.decode(_as_id_list(ids), skip_special_tokens=False)


def _byte_level(tok: Any) -> Any:
    from tokenizers import decoders, pre_tokenizers

    # no prefix space: decode(encode(text)) must give back text exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@TOKENIZER.register("bpe")
class BPETokenizer(_HFBacked):
    """Byte-level BPE trained on the corpus with HF `tokenizers` (deterministic for a given text)."""

    name = "bpe"

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import models, pre_tokenizers, trainers

        _no_path(cls.name, path)
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else int(vocab_size)
        if vocab_size < 256:
            raise ConfigError(f"data.vocab_size must be >= 256 for bpe (one token per byte), got {vocab_size}")
        if not text:
            raise DataError("cannot train a bpe tokenizer on empty text; pass a non-empty corpus with data.path=...")
        tok = _byte_level(HFTok(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(_encode_chunks(text), trainer=trainer)
        return cls(tok)


@TOKENIZER.register("hf")
class HFTokenizer(_HFBacked):
    """A pretrained tokenizer from a local directory (`tokenizer.json`, or GPT-2 style vocab.json+merges.txt)."""

    name = "hf"

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import models

        p = Path(path).expanduser()
        if (p / "tokenizer.json").is_file():
            return cls(HFTok.from_file(str(p / "tokenizer.json")), *read_tokenizer_meta(p))
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            tok = _byte_level(HFTok(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt"))))
            if tok.token_to_id("<|endoftext|>") is not None:  # GPT-2's separator is one token, as in transformers
                tok.add_special_tokens(["<|endoftext|>"])
            return cls(tok, *read_tokenizer_meta(p))
        raise DataError(
            f"tokenizer directory {p} has neither tokenizer.json nor vocab.json + merges.txt; "
            "pass a directory holding those files with data.tokenizer_path=..."
        )

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> HFTokenizer:
        if path is None:
            raise ConfigError(
                "data.tokenizer=hf needs data.tokenizer_path=DIR (a directory with tokenizer.json "
                "or vocab.json + merges.txt)"
            )
        return cls.from_dir(path)


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def read_tokenizer_meta(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """(chat template, {bos_token/eos_token/unk_token/pad_token: text}) of an HF tokenizer directory.

    Read as transformers does: chat_template.jinja, else chat_template.json, else tokenizer_config.json's
    "chat_template" (a string, or a list of named templates: the "default" one); special tokens from
    tokenizer_config.json, then special_tokens_map.json. Missing files give (None, {})."""
    p = Path(path)

    def read_json(name: str) -> dict[str, Any]:
        f = p / name
        if not f.is_file():
            return {}
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{f} is damaged ({type(e).__name__}: {e}); copy the base model's file again") from None
        return d if isinstance(d, dict) else {}

    tcfg = read_json("tokenizer_config.json")
    template: Any = None
    if (p / "chat_template.jinja").is_file():
        template = (p / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        template = read_json("chat_template.json").get("chat_template", tcfg.get("chat_template"))
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    special: dict[str, str] = {}
    for source in (read_json("special_tokens_map.json"), tcfg):
        for k in SPECIAL_TOKEN_KEYS:
            text = _token_text(source.get(k))
            if text is not None:
                special[k] = text
    return (template if isinstance(template, str) else None), special


def build_tokenizer(name: str, text: str, vocab_size: int | None = None, path: str | None = None) -> Tokenizer:
    """Fit the tokenizer registered as `name` on `text` (`vocab_size` applies to bpe, `path` to hf)."""
    cls = TOKENIZER.get(name)
    if vocab_size is not None and vocab_size <= 0:
        raise ConfigError(f"data.vocab_size must be > 0, got {vocab_size}")
    return cls.fit(text, vocab_size=vocab_size, path=path)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output (e.g. read from a checkpoint)."""
    if not isinstance(d, dict) or "name" not in d:
        raise CheckpointError(
            "tokenizer record has no 'name'; the checkpoint is damaged or was not written by microgpt"
        )
    try:
        cls = TOKENIZER.get(d["name"])
    except UnknownComponentError as e:
        raise CheckpointError(f"the checkpoint's tokenizer cannot be rebuilt: {e}") from None
    try:
        return cls.from_dict(d)
    except (DataError, CheckpointError):
        raise
    except Exception as e:  # any malformed field: KeyError, TypeError, a JSON error from tokenizers...
        raise CheckpointError(
            f"the checkpoint's '{d['name']}' tokenizer record is damaged ({type(e).__name__}: {e}); "
            "re-save the checkpoint with this microgpt version"
        ) from e


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Convert a mean loss in nats per token into bits per UTF-8 byte (comparable across tokenizers)."""
    return loss_nats / math.log(2) / bytes_per_token
