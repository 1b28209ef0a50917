"""Fast generation on a CPU: a static (preallocated) KV cache, a one-token decode step with few Python
operations (optionally compiled by `torch.compile`), and int8 models whose Linear layers run int8 kernels.

    from microgpt.inference import generate_stream
    for tok in generate_stream(model, idx, 200, temperature=0.8): ...

The decode step does what `GPT.forward` does for one new token, on every built-in component: it writes the
new key/value into a preallocated buffer per layer (room for the prompt + the new tokens, at most `block_size`)
and attends over the buffer with a mask of the positions filled so far, so every step has the same shapes (one
trace or compiled graph, no `torch.cat` growth).
The prompt goes through the model's own forward (with its dynamic cache) and is copied into the buffers; a
full context is recomputed over the last `block_size` tokens exactly as `GPT.generate_stream` does. Models
whose blocks are not the built-in ones (a plugin's attention or block) fall back to `GPT.generate_stream`.

int8 (`quantize_int8`): every Linear becomes an `Int8Linear` holding the exported int8 weights (per output
channel, symmetric) packed for the x86 int8 GEMM (fbgemm/oneDNN through `torch.ops.quantized.linear_dynamic`:
activations quantized per call, int32 accumulation); the token embedding stays int8 rows + scales. See
docs/deploy.md for what was measured against torchao's configs on this CPU and why this kernel was kept.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.components.attention import CausalSelfAttention
from microgpt.components.position import LearnedPosition, RotaryPosition, apply_rotary
from microgpt.model import GPT, Block, Cache, sample

# ---- int8 modules ----------------------------------------------------------------------------------------


def _has_vnni() -> bool:
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# Activations are quantized to 8 bits on CPUs with VNNI (int32 accumulation in one instruction: half the error
# of 7 bits); without it to 7 bits, as the kernel's 16-bit intermediate sums would otherwise saturate.
REDUCE_RANGE = not _has_vnni()


def _engines() -> tuple[str | None, str | None]:
    """(engine for a few rows, engine for many rows): fbgemm's GEMV is the fastest at batch 1, oneDNN's GEMM
    (AMX / VNNI) at prompt sizes (docs/deploy.md has the measurements)."""
    have = torch.backends.quantized.supported_engines
    small = next((e for e in ("fbgemm", "x86", "onednn") if e in have), None)
    large = next((e for e in ("onednn", "x86", "fbgemm") if e in have), None)
    return small, large


SMALL_ENGINE, LARGE_ENGINE = _engines()
LARGE_ROWS = 16  # activations with at least this many rows (tokens) go to LARGE_ENGINE's packed weight


def _prepack(qw: torch.Tensor, bias: torch.Tensor | None, engine: str):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return torch.ops.quantized.linear_prepack(qw, bias)
    finally:
        torch.backends.quantized.engine = before


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, computed by an x86 int8 GEMM on dynamically quantized activations
    (one scale per call). `q` int8 (out, in) and `scale` float32 (out,) are the exported tensors, used as they
    are; they are packed once per engine (two int8 copies when the engines differ: half of bfloat16's bytes)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated (torchao's successor
            warnings.simplefilter("ignore")  # has no x86 int8 kernel that wins here: docs/deploy.md)
            qw = torch._make_per_channel_quantized_tensor(
                q.contiguous(), scale.to(torch.float64), torch.zeros(q.shape[0], dtype=torch.long), 0
            )
            b = None if bias is None else bias.detach().to(torch.float32)
            self._packed = _prepack(qw, b, SMALL_ENGINE)
            self._packed_large = self._packed if LARGE_ENGINE == SMALL_ENGINE else _prepack(qw, b, LARGE_ENGINE)
        # kept for state_dict / export: the exact int8 values and scales this layer runs
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)
        self.register_buffer("bias", b, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), for code that reads `.weight` (not used by the forward)."""
        return self.q.to(torch.float32) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.float32)
        packed = self._packed_large if x2.shape[0] >= LARGE_ROWS else self._packed
        y = torch.ops.quantized.linear_dynamic(x2, packed, REDUCE_RANGE)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows + a float32 scale per row; looks rows up, then dequantizes them."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.q.to(torch.float32) * self.scale[:, None]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].to(torch.float32) * self.scale[idx].unsqueeze(-1)


def int8_kernel_available() -> bool:
    """Whether this torch build has an x86 int8 GEMM engine (fbgemm / x86 / onednn)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn"))


def quantize_int8(model: GPT, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> GPT:
    """Swap `model`'s Linear layers (and token embedding / tied head) named in `tensors` (state-dict name ->
    (int8 q, float32 scale)) for int8 modules running those exact values; in place, returns the model.
    A tied head becomes an `Int8Linear` over the embedding's int8 rows (the head is the embedding's transpose)."""
    if not int8_kernel_available():
        raise RuntimeError("this torch build has no x86 int8 engine (fbgemm/onednn)")
    modules = dict(model.named_modules())
    for name, (q, scale) in tensors.items():
        mod_name = name.removesuffix(".weight")
        mod = modules.get(mod_name)
        if isinstance(mod, nn.Linear):
            new = Int8Linear(q, scale, mod.bias)
        elif isinstance(mod, nn.Embedding):
            new = Int8Embedding(q, scale)
        else:
            raise ValueError(f"{name} is neither a Linear nor an Embedding weight")
        parent, _, leaf = mod_name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
    if model.lm_head is None and "wte.weight" in tensors:  # tied head: the same int8 rows, as a Linear
        q, scale = tensors["wte.weight"]
        model.lm_head = Int8Linear(q, scale)  # GPT.forward uses lm_head when it is set
    return model


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


# ---- static-cache decoding -------------------------------------------------------------------------------


def fast_decode_blocker(model: nn.Module) -> str | None:
    """Why the static-cache decode step cannot run `model` (None when it can): it covers the built-in
    blocks, attentions (mha/gqa/mqa/sliding) and positions; norms and MLPs are called as modules."""
    if not isinstance(model, GPT):
        return f"{type(model).__name__} is not a microgpt GPT"
    if type(model.pos) not in (LearnedPosition, RotaryPosition):
        return f"position {type(model.pos).__name__} is not a built-in one"
    for b in model.blocks:
        if type(b) is not Block:
            return f"block {type(b).__name__} is not the built-in Block"
        if type(b.attn) is not CausalSelfAttention:
            return f"attention {type(b.attn).__name__} is not the built-in CausalSelfAttention"
    return None


class StaticCache:
    """Per layer position, keys (B, n_kv_head, head_dim, size) and values (B, n_kv_head, size, head_dim),
    preallocated."""

    def __init__(self, model: GPT, batch: int, size: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.k, self.v = [], []
        for i in range(model.config.n_layer):
            a = model.layer(i).attn
            # keys stored transposed, (B, nkv, hd, size): the decode step's q @ k needs no transpose copy
            self.k.append(torch.zeros((batch, a.n_kv_head, a.head_dim, size), dtype=dtype, device=device))
            self.v.append(torch.zeros((batch, a.n_kv_head, size, a.head_dim), dtype=dtype, device=device))

    def fill(self, cache: Cache) -> None:
        """Copy a dynamic cache (the prompt's keys/values) into positions [0, its length)."""
        for i, layer in enumerate(cache.layers):
            n = layer.length
            self.k[i][..., :n].copy_(layer.k.transpose(-2, -1))
            self.v[i][:, :, :n].copy_(layer.v)


def decode_step(
    model: GPT, ks: list[torch.Tensor], vs: list[torch.Tensor], idx: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """One new token per row, idx (B, 1) at absolute position pos (1,) -> logits (B, vocab); writes its
    keys/values into ks/vs at `pos` (in place). Same arithmetic as GPT.forward with a cache."""
    size = vs[0].shape[2]
    x = model.pos(model.wte(idx), pos)  # (B, 1, C)
    rot = model.pos.rotary(pos)
    kpos = torch.arange(size, device=idx.device)[None, :]  # (1, size) vs the query's pos (1,)
    filled = kpos <= pos  # (1, size): the filled positions, this one included
    B = idx.shape[0]
    for i in range(model.config.n_layer):
        block = model.layer(i)
        a = block.attn
        nh, nkv, hd = a.n_head, a.n_kv_head, a.head_dim
        q, k, v = a.qkv(block.norm1(x)).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = k.view(B, 1, nkv, hd).transpose(1, 2)
        v = v.view(B, 1, nkv, hd).transpose(1, 2)
        if a.qk_norm:
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        if rot is not None:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        ks[i].index_copy_(3, pos, k.transpose(-2, -1).to(ks[i].dtype))
        vs[i].index_copy_(2, pos, v.to(vs[i].dtype))
        allowed = filled if a.window is None else filled & (pos - kpos < a.window)
        # one query per head: two small matmuls beat the fused kernel, whose per-call cost over a masked
        # buffer dominated the step (profiled: a third of an int8 step). Query heads grouped per kv head.
        qg = q.reshape(B, nkv, (nh // nkv), hd)  # (B, nkv, group, hd)
        att = (qg @ ks[i]) * (1.0 / math.sqrt(hd))  # (B, nkv, group, size)
        att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (att @ vs[i]).reshape(B, 1, nh * hd)  # heads side by side, as GPT.forward assembles them
        x = x + a.proj(y)
        x = x + block.mlp(block.norm2(x))
    x = model.norm_f(x)
    logits = F.linear(x, model.wte.weight) if model.lm_head is None else model.lm_head(x)
    if model.config.logit_softcap is not None:
        cap = model.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
    return logits[:, -1, :]


MODES = ("eager", "trace", "compile")
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(shape, dtype, device): trace}
_COMPILED = None


class _Step(nn.Module):
    """decode_step with flat tensor arguments, the form torch.jit.trace takes."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        n = len(kv) // 2
        return decode_step(self.model, list(kv[:n]), list(kv[n:]), idx, pos)


def _traced(model: GPT, static: StaticCache, batch: int):
    """decode_step recorded once by torch.jit.trace for this model, batch and cache shape: the ~20 operations
    of a layer then run from TorchScript's C++ interpreter instead of Python (what eager decode spends most
    of its time on at these sizes). The trace writes into whichever buffers it is given."""
    k0 = static.k[0]
    key = (batch, tuple(k0.shape), k0.dtype, k0.device)
    per = _TRACES.setdefault(model, {})
    if key not in per:
        scratch = [torch.zeros_like(t) for t in static.k + static.v]  # tracing runs the step: not on the real cache
        idx = torch.zeros(batch, 1, dtype=torch.long, device=k0.device)
        pos = torch.zeros(1, dtype=torch.long, device=k0.device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the shapes it bakes in are the key above
                per[key] = torch.jit.trace(_Step(model), (idx, pos, *scratch), check_trace=False)
        except Exception:  # an op TorchScript cannot record: run the step eagerly instead
            per[key] = None
    t = per[key]
    if t is None:
        return decode_step
    return lambda model, ks, vs, idx, pos: t(idx, pos, *ks, *vs)


def _step_for(model: GPT, mode: str, static: StaticCache, batch: int):
    global _COMPILED
    if mode == "eager":
        return decode_step
    if mode == "trace":
        # tensor subclasses (a plugin's quantized weights) dispatch in Python: the trace might not record
        # what they do, so those models run the step eagerly
        plain = all(type(t.data) is torch.Tensor for t in (*model.parameters(), *model.buffers()))
        return _traced(model, static, batch) if plain else decode_step
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_step, dynamic=False)
    return _COMPILED


@torch.inference_mode()
def generate_stream(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    mode: str = "trace",
) -> Iterator[torch.Tensor]:
    """`GPT.generate_stream` through the static-cache decode step: yields (B, 1) new tokens one at a time,
    the same tokens (same arithmetic, same sampler). mode: "trace" (default; torch.jit.trace of the step, a
    one-off cost of about one step), "eager" (plain Python) or "compile" (torch.compile: tens of seconds to
    compile, then the fastest float32 step). Models with blocks it does not cover run GPT.generate_stream."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if fast_decode_blocker(model) is not None:
        yield from model.generate_stream(
            idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        return
    cap = model.config.block_size
    cache = Cache(model.config.n_layer)
    logits = model(idx[:, -cap:], cache)[:, -1, :]
    # room for this generation only (rounded up to 64 positions, so similar lengths share a trace): every step
    # reads the whole buffer, and at 85M params a block_size buffer read a third of the step's time (profiled);
    # compile keeps block_size (one graph, no recompiles)
    size = cap if mode == "compile" else min(cap, -(-(min(idx.shape[1], cap) + max_new_tokens) // 64) * 64)
    static = StaticCache(model, idx.shape[0], size, cache.layers[0].k.dtype, idx.device)
    static.fill(cache)
    length = cache.length
    del cache
    step = None
    seq = idx
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield nxt
        seq = torch.cat([seq, nxt], dim=1)
        if length + 1 > cap:  # context full: recompute over the last block_size tokens, as GPT does
            logits = model(seq[:, -cap:])[:, -1, :]
        else:
            step = step or _step_for(model, mode, static, idx.shape[0])
            logits = step(model, static.k, static.v, nxt, torch.tensor([length], device=idx.device))
            length += 1


__all__ = [
    "MODES",
    "Int8Embedding",
    "Int8Linear",
    "StaticCache",
    "decode_step",
    "fast_decode_blocker",
    "generate_stream",
    "int8_kernel_available",
    "is_int8",
    "quantize_int8",
]
