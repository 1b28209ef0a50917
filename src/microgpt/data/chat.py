"""`data=chat`: prompt/response and chat JSONL -> padded batches whose loss covers only the replies.

Accepted lines (one JSON object each; docs/chat.md):
    {"prompt": "...", "response": "..."}                      (optional "system")
    {"instruction": "...", "input": "...", "output": "..."}   (Alpaca; "input" may be empty or absent)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Each example is one row of a batch, padded on the right to the longest row; labels are IGNORE_INDEX (-100)
on the prompt, the role markers and the padding. Padding, not packing: with right padding and causal
attention, a real token never attends to a pad (pads come after it), so no attention mask is needed and
every attention variant, the KV cache and positions work unchanged; packing would need a block-diagonal
mask and per-example positions in every attention component (plugins included). Rows are padded only to
the batch's longest, so short examples cost little.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from microgpt.data.chat_template import IGNORE_INDEX, ROLES, ChatFormat, Encoded, with_chat_tokens
from microgpt.data.datamodule import _positive, batch_seed
from microgpt.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_dict
from microgpt.errors import ConfigError, DataError

__all__ = ["ChatDataModule", "Example", "collate", "read_chat_jsonl", "to_messages"]

log = logging.getLogger("microgpt")


def to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    """One parsed JSONL object in any accepted shape -> a list of {"role", "content"} messages."""

    def text(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}; fix that line")
        return value

    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a JSON object; each line must be one {{...}} object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; fix that line")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
                raise DataError(
                    f'{where}: message {j} must be {{"role": system|user|assistant, "content": str}}; fix that line'
                )
            out.append({"role": m["role"], "content": text(f"messages[{j}].content", m["content"])})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where} has no assistant message, so nothing to learn; add one or remove the line")
        return out
    if "prompt" in obj and "response" in obj:
        system = [{"role": "system", "content": text("system", obj["system"])}] if obj.get("system") else []
        return [
            *system,
            {"role": "user", "content": text("prompt", obj["prompt"])},
            {"role": "assistant", "content": text("response", obj["response"])},
        ]
    if "instruction" in obj and "output" in obj:
        prompt = text("instruction", obj["instruction"])
        extra = text("input", obj.get("input") or "")
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": text("output", obj["output"])},
        ]
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(
        f"{where} has keys ({keys}) in no known shape; use prompt/response, instruction/input/output or messages"
    )


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Every line of a JSONL file as a conversation; a blank or malformed line is an error naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"chat data file {p} does not exist; pass a JSONL file with data.path=...")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"chat data file {p} is not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    convs = []
    for n, line in enumerate(lines, 1):
        where = f"{p} line {n}"
        if not line.strip():
            raise DataError(f"{where} is empty; remove blank lines (each line must be one JSON object)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} is not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
            ) from None
        convs.append(to_messages(obj, where))
    if not convs:
        raise DataError(f"chat data file {p} holds no examples; add JSONL lines")
    return convs


class Example:
    """One conversation as model input x and targets y (IGNORE_INDEX where not trained on)."""

    __slots__ = ("x", "y")

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y


def fit_block(enc: Encoded, block_size: int) -> tuple[list[int], list[bool], str | None]:
    """Cut a conversation to at most block_size + 1 ids (x and y are one shorter).

    Too long: drop the oldest ids (the prompt's start); when even the last reply does not fit, keep its
    opening marker and start and drop its end. Returns the ids, the mask and what was cut (None, "prompt", "response").
    """
    ids, scored = enc.ids, enc.scored
    n = block_size + 1
    if len(ids) <= n:
        return ids, scored, None
    keep_from = len(ids) - n
    if keep_from <= enc.last_start - 1:
        return ids[keep_from:], scored[keep_from:], "prompt"
    a = max(enc.last_start - 1, 0)  # the token before the reply: the assistant marker
    return ids[a : a + n], scored[a : a + n], "response"


def encode_examples(fmt: ChatFormat, convs: list, block_size: int, train_on: str) -> tuple[list[Example], dict]:
    examples, cut = [], {"prompt": 0, "response": 0}
    for conv in convs:
        ids, scored, what = fit_block(fmt.encode(conv, train_on), block_size)
        if what:
            cut[what] += 1
        a = np.asarray(ids, dtype=np.int64)
        y = a[1:].copy()
        y[~np.asarray(scored[1:], dtype=bool)] = IGNORE_INDEX
        examples.append(Example(a[:-1], y))
    return examples, cut


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: x with pad_id (never attended to by real tokens), y with IGNORE_INDEX."""
    T = max(len(e.x) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, : len(e.x)] = torch.from_numpy(e.x)
        y[i, : len(e.y)] = torch.from_numpy(e.y)
    return x, y


class ChatTrainStream(IterableDataset):
    """Batch k = batch_size examples drawn with a generator seeded by (seed, rank, k): resumable exactly."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int, rank: int = 0, start: int = 0):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.start = seed, rank, start

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, k, self.rank))
        ix = torch.randint(len(self.examples), (self.batch_size,), generator=g).tolist()
        return collate([self.examples[i] for i in ix], self.pad_id)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class ChatValBatches(Dataset):
    """The val examples in order, batch_size at a time (the same batches at every evaluation)."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, n_batches: int | None = None):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        n = (len(examples) + batch_size - 1) // batch_size
        self.n = n if n_batches is None else min(n, n_batches)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= j < self.n:
            raise IndexError(j)
        return collate(self.examples[j * self.batch_size : (j + 1) * self.batch_size], self.pad_id)


class ChatDataModule(L.LightningDataModule):
    """Chat / instruction JSONL with the loss on the replies only (see the module docstring)."""

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        tokenizer: str = "char",
        vocab_size: int | None = None,
        tokenizer_path: str | None = None,
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        eval_batches: int = 20,
        train_on: str = "last",
        seed: int = 1337,
        tokenizer_obj: Tokenizer | None = None,
        cache_dir: str | None = None,  # accepted like every data preset's; chat data is small and not cached
    ):
        super().__init__()
        if path is None:
            raise ConfigError("data=chat needs data.path=FILE.jsonl (prompt/response, Alpaca or messages lines)")
        _positive("batch_size", batch_size)
        _positive("block_size", block_size)
        _positive("eval_batches", eval_batches)
        if train_on not in ("last", "all"):
            raise ConfigError(f"data.train_on must be 'last' or 'all', got {train_on!r}")
        if val_path is None and not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ConfigError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        self.path, self.val_path = str(path), None if val_path is None else str(val_path)
        self.tokenizer_name, self.requested_vocab_size, self.tokenizer_path = tokenizer, vocab_size, tokenizer_path
        self.block_size, self.batch_size, self.eval_batches = block_size, batch_size, eval_batches
        self.val_fraction, self.train_on, self.seed = float(val_fraction), train_on, int(seed)
        self._given_tokenizer = tokenizer_obj
        self._restored: dict[str, Any] | None = None
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.bytes_per_token: float | None = None
        self.train_examples: list[Example] | None = None
        self.val_examples: list[Example] | None = None
        self.truncated: dict[str, int] = {}

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        train = read_chat_jsonl(self.path)
        if self.val_path is not None:
            val = read_chat_jsonl(self.val_path)
        else:
            if len(train) < 2:
                raise DataError(f"{self.path} has {len(train)} example; a val split needs 2 or more (or data.val_path)")
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = min(max(1, round(len(train) * self.val_fraction)), len(train) - 1)
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in order[n_val:]]
        tok = with_chat_tokens(self._base_tokenizer(train + val))
        fmt = ChatFormat(tok)
        self.train_examples, cut_t = encode_examples(fmt, train, self.block_size, self.train_on)
        self.val_examples, cut_v = encode_examples(fmt, val, self.block_size, self.train_on)
        self.truncated = {k: cut_t[k] + cut_v[k] for k in cut_t}
        if any(self.truncated.values()):
            log.warning(
                "data=chat: %d of %d examples were longer than block_size+1=%d tokens: %d lost the start of their "
                "prompt, %d the end of their reply (raise model.block_size to keep them whole)",
                sum(self.truncated.values()),
                len(self.train_examples) + len(self.val_examples),
                self.block_size + 1,
                self.truncated["prompt"],
                self.truncated["response"],
            )
        self.tokenizer, self.vocab_size, self.pad_id = tok, tok.vocab_size, min(fmt.stop_ids)
        # bits per byte over the scored tokens only: bytes of the reply text (markers count 0) per scored token
        scored = np.concatenate([e.y[e.y != IGNORE_INDEX] for e in self.val_examples])
        self.bytes_per_token = max(tok.count_bytes(scored), 1) / len(scored)

    def _base_tokenizer(self, convs: list) -> Tokenizer:
        given = self._given_tokenizer
        if given is None and self._restored and self._restored.get("tokenizer"):
            given = tokenizer_from_dict(self._restored["tokenizer"])
        if given is not None:
            return given
        text = "\n".join(m["content"] for conv in convs for m in conv)
        if not text and self.tokenizer_name == "char":
            raise DataError(f"{self.path} has no text in any message; a char tokenizer needs some")
        return build_tokenizer(self.tokenizer_name, text, self.requested_vocab_size, path=self.tokenizer_path)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    # ---- loaders ----------------------------------------------------------------------------------------

    def _trainer_attr(self, name: str, default: int) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, name, default)) if trainer is not None else default

    def train_dataset(self, start: int = 0, rank: int = 0) -> ChatTrainStream:
        self.setup()
        return ChatTrainStream(self.train_examples, self.batch_size, self.pad_id, self.seed, rank=rank, start=start)

    def val_dataset(self) -> ChatValBatches:
        self.setup()
        return ChatValBatches(self.val_examples, self.batch_size, self.pad_id, self.eval_batches)

    def train_dataloader(self) -> DataLoader:
        start = self._trainer_attr("global_step", 0) * self._trainer_attr("accumulate_grad_batches", 1)
        ds = self.train_dataset(start=start, rank=self._trainer_attr("global_rank", 0))
        return DataLoader(ds, batch_size=None, num_workers=0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=None, shuffle=False, num_workers=0)

    def full_val_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every val example once; count targets as (y != IGNORE_INDEX).sum(), not y.numel()."""
        self.setup()
        bs = self.batch_size if batch_size is None else batch_size
        _positive("batch_size", bs)
        yield from ChatValBatches(self.val_examples, bs, self.pad_id)

    # ---- checkpoint state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.tokenizer is None:
            return dict(self._restored or {})
        return {"tokenizer": self.tokenizer.to_dict(), "path": self.path, "n_train": len(self.train_examples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        saved = state_dict.get("tokenizer")
        if self.tokenizer is not None and saved and saved != self.tokenizer.to_dict():
            raise DataError(
                "the checkpoint was trained with a different tokenizer than this chat data gives; resume with the "
                "same data.path and data.tokenizer"
            )
