"""Data layer: text sources, tokenizers and the TokenDataModule that turns text into batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from microgpt.data import chat_template  # noqa: E402,F401  (registers the "chat" tokenizer for checkpoints)
from microgpt.data.sources import (
    SHAKESPEARE_URL,
    cache_root,
    hf_source,
    read_text_files,
    resolve_text_paths,
    shakespeare_source,
    stdlib_source,
    text_source,
)
from microgpt.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    bits_per_byte,
    build_tokenizer,
    tokenizer_from_dict,
)

if TYPE_CHECKING:
    from microgpt.data.datamodule import RandomWindows, TokenDataModule, ValWindows, batch_seed

_DATAMODULE = ("RandomWindows", "TokenDataModule", "ValWindows", "batch_seed")


def __getattr__(name: str):
    # the datamodule imports Lightning (~3 s): only training and evaluation need it, not load() or generate
    if name in _DATAMODULE:
        from microgpt.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHAKESPEARE_URL",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "RandomWindows",
    "TokenDataModule",
    "Tokenizer",
    "ValWindows",
    "batch_seed",
    "bits_per_byte",
    "build_tokenizer",
    "cache_root",
    "hf_source",
    "read_text_files",
    "resolve_text_paths",
    "shakespeare_source",
    "stdlib_source",
    "text_source",
    "tokenizer_from_dict",
]
