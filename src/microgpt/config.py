"""GPTConfig: everything needed to rebuild a model, and nothing about how it was trained.

A checkpoint stores `asdict(config)`; `GPTConfig(**d)` rebuilds the same module tree without Hydra.
Components are named (`attention="gqa"`) and looked up in `microgpt.registry` at build time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from microgpt.errors import ConfigError

# RoPE scaling types microgpt implements (components/position.py), with the keys each one needs
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64  # longest sequence the model sees (learned positions cap generation at this)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head; gqa/mqa share each key/value head across a group
    n_embd: int = 128
    head_dim: int | None = None  # None -> n_embd // n_head; set explicitly after structured head pruning
    mlp_hidden: int | None = None  # None -> 4*n_embd for gelu, ~8/3*n_embd (multiple of 64) for swiglu
    dropout: float = 0.0
    bias: bool = False  # bias in Linear and LayerNorm layers (GPT-2: True; nanoGPT baby: False)
    qkv_bias: bool | None = None  # bias on the q/k/v projection only; None -> follows bias (Qwen2: True)
    attention: str = "mha"  # mha | gqa | mqa | sliding | <registered by a plugin>
    window: int | None = None  # sliding: each query sees the last `window` positions (itself included)
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long context, as HF configs write it: {"rope_type": "linear", "factor": f}
    # or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (exact) | gelu_tanh (GPT-2) | swiglu | relu2
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention (no weights)
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap): bounds them without clipping grads
    zero_init_proj: bool = False  # residual output projections start at zero: each block starts as identity
    tie_embeddings: bool = True  # the output head reads the token embedding's weight
    n_unique_layers: int | None = None  # cross-layer sharing: k unique blocks reused cyclically over n_layer
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1.3x slower
    init_std: float = 0.02
    # structural transforms applied after build, in order, e.g. [{"name": "qat", "scheme": "8da4w"}];
    # recorded here so that loading a checkpoint rebuilds the converted module tree before its weights
    converters: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = {"mqa": 1}.get(self.attention, self.n_head)
        explicit_head_dim = self.head_dim is not None
        if not explicit_head_dim and isinstance(self.n_head, int) and self.n_head > 0:
            self.head_dim = self.n_embd // self.n_head
        self.validate(explicit_head_dim)

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # keep params ~equal to a 4x GELU MLP: 3 matrices of 8/3*C
            return 64 * ((int(8 * self.n_embd / 3) + 63) // 64)
        return 4 * self.n_embd

    def validate(self, explicit_head_dim: bool = True) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim"):
            v = getattr(self, k)
            need(isinstance(v, int) and v > 0, f"model.{k} must be a positive integer, got {v!r}")
        need(
            explicit_head_dim or self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; pick n_embd a multiple of n_head",
        )
        need(
            self.n_head % self.n_kv_head == 0,
            f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}; "
            "pick n_kv_head that divides n_head",
        )
        if self.position == "rope":
            need(self.head_dim % 2 == 0, f"rope needs an even head size, got n_embd/n_head={self.head_dim}")
        if self.rope_scaling is not None:
            need(
                isinstance(self.rope_scaling, dict),
                f"model.rope_scaling must be a mapping or null, got {self.rope_scaling!r}",
            )
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            required = ROPE_SCALING_KEYS.get(kind)
            need(
                required is not None,
                f"model.rope_scaling type {kind!r} is not implemented; choose one of {', '.join(ROPE_SCALING_KEYS)} or null",
            )
            absent = [k for k in required if k not in self.rope_scaling]
            need(not absent, f"model.rope_scaling type {kind!r} lacks {absent}")
        if self.attention == "sliding":
            need(
                isinstance(self.window, int) and self.window > 0,
                f"attention=sliding needs model.window > 0, got {self.window!r}",
            )
        need(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_unique_layers is not None:
            need(
                0 < self.n_unique_layers <= self.n_layer,
                f"model.n_unique_layers must be in 1..n_layer={self.n_layer}, got {self.n_unique_layers}",
            )
        if self.logit_softcap is not None:
            need(self.logit_softcap > 0, f"model.logit_softcap must be > 0 (or null), got {self.logit_softcap}")
        if self.mlp_hidden is not None:
            need(self.mlp_hidden > 0, f"model.mlp_hidden must be > 0, got {self.mlp_hidden}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        if d.get("extra", None) == {}:  # checkpoints written before the unused `extra` field was removed
            d = {k: v for k, v in d.items() if k != "extra"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model keys {unknown}; valid keys are: {', '.join(sorted(known))}")
        return cls(**d)
