"""Typed registries of swappable components, chosen by short names.

Configs and checkpoints name components ("gqa", "rmsnorm") rather than import paths, so they stay
readable and a checkpoint rebuilds its model without Hydra. A plugin adds a component with::

    from microgpt.registry import ATTENTION

    @ATTENTION.register("my_attn")
    class MyAttention(nn.Module): ...

and `model.attention=my_attn` selects it from the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from microgpt.errors import ConfigError

T = TypeVar("T")


class UnknownComponentError(ConfigError, KeyError):
    """A name that no registry entry answers to. `str()` is one line naming the known choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> builder map with a decorator for registration and one-line errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self.attr: str | None = None  # the module-level name plugins register through (MLP, ATTENTION, ...)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            from microgpt.plugin_hints import hint

            raise UnknownComponentError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}{hint(self.attr, name)}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# Model components: each is an nn.Module class built as cls(cfg: GPTConfig, **options).
ATTENTION: Registry = Registry("attention")  # causal self-attention: (B, T, C) -> (B, T, C), with a KV cache
MLP: Registry = Registry("mlp")  # position-wise feed-forward: (B, T, C) -> (B, T, C)
NORM: Registry = Registry("norm")  # normalisation over the last dim: (B, T, C) -> (B, T, C)
POSITION: Registry = Registry("position")  # positional information: token embeddings or q/k rotation
# Model converters: callables (model, **options) -> model that change a built model's structure
# (QAT, pruning, sharing). Recorded in the checkpoint so `microgpt.load` reapplies them in order.
CONVERTER: Registry = Registry("converter")  # model -> model structural transform, replayed on load
# Tokenizers: classes with encode/decode/to_dict, rebuilt from their saved dict.
TOKENIZER: Registry = Registry("tokenizer")  # text <-> token ids
# Text sources for the data module: callables (**options) -> str.
SOURCE: Registry = Registry("data source")  # where the training text comes from

for _attr, _reg in list(globals().items()):
    if isinstance(_reg, Registry):
        _reg.attr = _attr
