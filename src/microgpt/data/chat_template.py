"""The chat template: turns a conversation into token ids and a mask of the ids to train on.

The built-in template (documented in docs/chat.md) is four special tokens around plain content:

    <|system|>You are terse.<|end|><|user|>Who speaks?<|end|><|assistant|>ROMEO<|end|>

A reply is generated after `<|assistant|>` and ends when the model emits `<|end|>`. The markers are
*special* tokens: one id each, never produced by encoding content (a user typing "<|end|>" gets the
characters, not the token). When a tokenizer lacks them they are added (`with_chat_tokens`):

  char / byte   wrapped in a `ChatTokenizer` ("chat" in the tokenizer registry) that gives the markers
                the ids right after the base vocabulary and records the base, so a checkpoint rebuilds it
  bpe / hf      added to the HF tokenizer itself as special tokens (its tokenizer.json carries them,
                so HF / GGUF exports keep them)

A tokenizer that brings its own Jinja `chat_template` (an HF tokenizer.json's, exposed as
`tokenizer.chat_template`) is used instead: rendered in Jinja's sandbox, the assistant's part of each
turn is found by rendering the conversation up to that turn with and without it.

This module imports neither Lightning nor Hydra: `microgpt.load`, `microgpt.chat` and `microgpt.tasks` use it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from microgpt.data.tokenizers import Tokenizer, _as_id_list, _HFBacked, tokenizer_from_dict
from microgpt.errors import ConfigError, DataError
from microgpt.registry import TOKENIZER

__all__ = [
    "CHAT_TOKENS",
    "IGNORE_INDEX",
    "ChatFormat",
    "ChatTokenizer",
    "Encoded",
    "grow_vocab",
    "with_chat_tokens",
]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: labels here contribute no loss
ROLES = ("system", "user", "assistant")
CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}


@TOKENIZER.register("chat")
class ChatTokenizer(Tokenizer):
    """A char or byte tokenizer plus special tokens with the ids after the base vocabulary."""

    name = "chat"

    def __init__(self, base: Tokenizer, specials: Sequence[str]):
        if isinstance(base, ChatTokenizer):
            specials = [*base.specials, *[s for s in specials if s not in base.specials]]
            base = base.base
        self.base = base
        self.specials = list(dict.fromkeys(specials))
        self.special_ids = {s: base.vocab_size + i for i, s in enumerate(self.specials)}
        self.vocab_size = base.vocab_size + len(self.specials)

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None, path: str | None = None) -> ChatTokenizer:
        raise ConfigError("data.tokenizer=chat is not a tokenizer to fit; use char, byte, bpe or hf with data=chat")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatTokenizer:
        return cls(tokenizer_from_dict(d["base"]), d["specials"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "base": self.base.to_dict(),
            "specials": self.specials,
        }

    def encode_array(self, text: str) -> np.ndarray:
        return self.base.encode_array(text)  # content only: specials come from token_to_id, never from text

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.special_ids.get(token)

    token_to_id = token_id

    def decode(self, ids: Sequence[int] | Any) -> str:
        out, run = [], []
        v = self.base.vocab_size
        for i in _as_id_list(ids):
            if v <= i < self.vocab_size:
                if run:
                    out.append(self.base.decode(run))
                    run = []
                out.append(self.specials[i - v])
            else:
                run.append(i)
        if run:
            out.append(self.base.decode(run))
        return "".join(out)

    def count_bytes(self, ids: Sequence[int] | Any) -> int:
        v = self.base.vocab_size
        return self.base.count_bytes([i for i in _as_id_list(ids) if not v <= i < self.vocab_size])

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.base!r} + {len(self.specials)} specials)"


def _special_id(tok: Tokenizer, token: str) -> int | None:
    return tok.token_id(token)


def with_chat_tokens(tok: Tokenizer, specials: Sequence[str] = tuple(CHAT_TOKENS.values())) -> Tokenizer:
    """`tok` with the chat template's special tokens (itself when it has them all, or its own template)."""
    if getattr(tok, "chat_template", None):
        return tok
    missing = [s for s in specials if _special_id(tok, s) is None]
    if not missing:
        return tok
    if isinstance(tok, _HFBacked):
        from tokenizers import Tokenizer as HFTok

        hf = HFTok.from_str(tok.tok.to_str())  # a copy: the caller's tokenizer is left as it was
        hf.add_special_tokens(missing)
        new = copy.copy(tok)
        _HFBacked.__init__(new, hf, tok.chat_template, tok.special_tokens)
        return new
    return ChatTokenizer(tok, missing)


def has_chat_tokens(tok: Tokenizer) -> bool:
    return bool(getattr(tok, "chat_template", None)) or all(
        _special_id(tok, s) is not None for s in CHAT_TOKENS.values()
    )


def _encode_content(tok: Tokenizer, text: str) -> list[int]:
    if not text:
        return []
    if isinstance(tok, _HFBacked):
        # no special-token parsing of content: a message that contains "<|end|>" stays text
        ids = _plain(tok, text)
        specials = {tok.tok.token_to_id(s) for s in CHAT_TOKENS.values()} - {None}
        if specials.intersection(ids):
            # the HF tokenizer matched a special token inside the text: encode the pieces around it
            ids = []
            for piece in _split_keep(text, [s for s in CHAT_TOKENS.values()]):
                ids.extend(_chars_of(tok, piece) if piece in CHAT_TOKENS.values() else _plain(tok, piece))
        return ids
    return tok.encode(text)


def _split_keep(text: str, seps: list[str]) -> list[str]:
    out, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in seps if text.startswith(s, i)), None)
        if hit:
            if start < i:
                out.append(text[start:i])
            out.append(hit)
            i += len(hit)
            start = i
        else:
            i += 1
    if start < len(text):
        out.append(text[start:])
    return out


def _plain(tok: _HFBacked, piece: str) -> list[int]:
    return list(tok.tok.encode(piece, add_special_tokens=False).ids)


def _chars_of(tok: _HFBacked, piece: str) -> list[int]:
    # a marker typed as text: its characters one by one, so none of them can match the special token
    return [i for ch in piece for i in _plain(tok, ch)]


@dataclass
class Encoded:
    """One conversation as ids; `scored[i]` says whether id i is a training target."""

    ids: list[int]
    scored: list[bool]
    # index of the first scored id of the last scored turn (truncation keeps it and what follows)
    last_start: int


class ChatFormat:
    """The template bound to a tokenizer: conversation -> (ids, scored) and prompt -> ids for generation."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.template = getattr(tok, "chat_template", None)
        if self.template:
            self._jinja = _compile_jinja(self.template)
            self.stop_ids = self._jinja_stop_ids()
            return
        ids = {k: _special_id(tok, s) for k, s in CHAT_TOKENS.items()}
        missing = [CHAT_TOKENS[k] for k, v in ids.items() if v is None]
        if missing:
            raise DataError(
                f"the {tok.name} tokenizer lacks the chat tokens {', '.join(missing)}; fine-tune the model on "
                "chat data (data=chat adds them) before using it for chat"
            )
        self.ids = ids
        self.end_id = ids["end"]
        self.stop_ids = {ids["end"]}

    # ---- encoding ---------------------------------------------------------------------------------------

    def encode(self, messages: Sequence[dict[str, str]], train_on: str = "last") -> Encoded:
        """Ids of a whole conversation; assistant turns (all, or only the last) are scored, incl. their end."""
        if train_on not in ("last", "all"):
            raise ConfigError(f"data.train_on must be 'last' or 'all', got {train_on!r}")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids: list[int] = []
        scored: list[bool] = []
        last_start = 0
        for i, (head, body, tail) in enumerate(self._turn_pieces(messages)):
            score = messages[i]["role"] == "assistant" and (train_on == "all" or i == last)
            ids += head
            scored += [False] * len(head)
            if i == last:
                last_start = len(ids)
            ids += body + tail
            scored += [score] * (len(body) + len(tail))
        return Encoded(ids, scored, last_start)

    def prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the conversation so far followed by the assistant's opening marker: generate after these."""
        if self.template:
            prefix = self._render(messages, True)
            return self._encode_rendered(prefix)
        ids: list[int] = []
        for head, body, tail in self._turn_pieces(messages):
            ids += head + body + tail
        return ids + [self.ids["assistant"]]

    def turn_ids(self, messages: Sequence[dict[str, str]]) -> list[list[int]]:
        """Ids of each turn separately (the REPL drops whole turns from the front to fit the context)."""
        return [head + body + tail for head, body, tail in self._turn_pieces(messages)]

    def _turn_pieces(self, messages: Sequence[dict[str, str]]) -> list[tuple[list[int], list[int], list[int]]]:
        if self.template:
            return self._jinja_pieces(messages)
        return [([self.ids[m["role"]]], _encode_content(self.tok, m["content"]), [self.end_id]) for m in messages]

    # ---- a tokenizer's own Jinja template ---------------------------------------------------------------

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._jinja.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                raise_exception=_raise,
                **dict(getattr(self.tok, "special_tokens", None) or {}),
            )
        except Exception as e:  # a template error is a property of the tokenizer we were given
            raise DataError(f"the tokenizer's chat_template failed to render ({type(e).__name__}: {e})") from None

    def _encode_rendered(self, text: str) -> list[int]:
        if isinstance(self.tok, _HFBacked):
            return list(self.tok.tok.encode(text, add_special_tokens=False).ids)
        return self.tok.encode(text)

    def _jinja_pieces(self, messages: Sequence[dict[str, str]]) -> list[tuple[list[int], list[int], list[int]]]:
        out, done = [], ""
        for i, m in enumerate(messages):
            before = self._render(messages[:i], m["role"] == "assistant") if i else ""
            if m["role"] == "assistant" and before.startswith(done):
                head = before[len(done) :]
            else:
                head = ""
            full = self._render(messages[: i + 1], False)
            if not full.startswith(done + head):
                raise DataError(
                    "the tokenizer's chat_template renders a prefix differently from the whole; cannot mask"
                )
            rest = full[len(done + head) :]
            k = rest.find(m["content"]) if m["content"] else -1
            body, tail = (rest[: k + len(m["content"])], rest[k + len(m["content"]) :]) if k >= 0 else (rest, "")
            out.append((self._encode_rendered(head), self._encode_rendered(body), self._encode_rendered(tail)))
            done = full
        return out

    def _jinja_stop_ids(self) -> set[int]:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "PROBE"}]
        tail = self._render(probe, False).split("PROBE", 1)[-1]
        ids = self._encode_rendered(tail.strip()) if tail.strip() else []
        eos = getattr(self.tok, "eos_id", None)
        if not ids and eos is None:
            raise DataError("the tokenizer's chat_template ends an assistant turn with nothing; cannot stop replies")
        return set(ids[:1]) | ({eos} if eos is not None else set())


def _raise(message: str):
    raise ValueError(message)


def _compile_jinja(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise DataError(f"the tokenizer's chat_template is not valid Jinja ({e})") from None


def grow_vocab(model, vocab_size: int):
    """Give `model` room for `vocab_size` tokens (new chat tokens): new rows start at the mean embedding.

    In place on the token embedding (and an untied output head); returns the model.
    """
    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    head = model.lm_head
    if head is not None and type(head) is not torch.nn.Linear:
        raise ConfigError(
            f"cannot add {vocab_size - old} chat tokens to a model whose output head is a {type(head).__name__}; "
            "fine-tune on chat data before converting the model"
        )
    with torch.no_grad():
        w = model.wte.weight
        emb = torch.nn.Embedding(vocab_size, w.shape[1], device=w.device, dtype=w.dtype)
        emb.weight[:old] = w
        emb.weight[old:] = w.mean(0)
        model.wte = emb
        if head is not None:
            lin = torch.nn.Linear(head.in_features, vocab_size, bias=False, device=w.device, dtype=head.weight.dtype)
            lin.weight[:old] = head.weight
            lin.weight[old:] = head.weight.mean(0)
            model.lm_head = lin
    model.config.vocab_size = vocab_size
    return model
