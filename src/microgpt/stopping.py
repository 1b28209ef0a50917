"""When generation stops before max_new_tokens: the tokenizer's end-of-text token, or a stop string.

`Stopper` watches the streamed tokens and the decoded text. It holds back the last characters that could
still turn into a stop string, so what has been printed never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Iterable

from microgpt.errors import ConfigError

END_OF_TEXT = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def end_of_text_id(tokenizer) -> int | None:
    """The id of the tokenizer's end-of-text token (BPE/HF tokenizers: `<|endoftext|>`); None for char and
    byte tokenizers, which have none."""
    backend = getattr(tokenizer, "tok", None)
    token_to_id = getattr(backend, "token_to_id", None)
    if token_to_id is None:
        return None
    for t in END_OF_TEXT:
        i = token_to_id(t)
        if i is not None:
            return int(i)
    return None


def stop_strings(stop) -> list[str]:
    """`stop=...` from the CLI: null, one string or a list of strings (escapes like \\n are taken literally
    by the shell, so they are decoded here)."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    out = []
    for s in items:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop must be a non-empty string or a list of them, got {s!r}")
        out.append(s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s)
    return out


class Stopper:
    def __init__(self, eos_id: int | None = None, stops: Iterable[str] = ()):
        self.eos_id = eos_id
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.reason = "max_new_tokens"

    def is_eos(self, token: int) -> bool:
        if self.eos_id is not None and token == self.eos_id:
            self.reason = "end-of-text"
            return True
        return False

    def cut(self, text: str) -> tuple[str, bool]:
        """(the text up to the first stop string, whether one was found)."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.reason = "stop string"
            return text[: min(hits)], True
        return text, False

    def printable(self, text: str) -> str:
        """The part of unfinished text that no stop string can still claim."""
        return text[: len(text) - self.hold] if self.hold else text
