"""Fast generation on a CPU: a static (preallocated) KV cache, a one-token decode step with few Python
operations (optionally compiled by `torch.compile`), and int8 models whose Linear layers run int8 kernels.

    from microgpt.inference import generate_stream
    for tok in generate_stream(model, idx, 200, temperature=0.8): ...

The decode step does what `GPT.forward` does for one new token, on every built-in component: it writes the
new key/value into a buffer of `block_size` positions per layer and attends over the buffer with a mask of
the positions filled so far, so every step has the same shapes (one compiled graph, no `torch.cat` growth).
The prompt goes through the model's own forward (with its dynamic cache) and is copied into the buffers; a
full context is recomputed over the last `block_size` tokens exactly as `GPT.generate_stream` does. Models
whose blocks are not the built-in ones (a plugin's attention or block) fall back to `GPT.generate_stream`.

int8 (`quantize_int8`): every Linear becomes an `Int8Linear` holding the exported int8 weights (per output
channel, symmetric) packed for the x86 int8 GEMM (fbgemm/oneDNN through `torch.ops.quantized.linear_dynamic`:
activations quantized per call, int32 accumulation); the token embedding stays int8 rows + scales. See
docs/deploy.md for what was measured against torchao's configs on this CPU and why this kernel was kept.
"""

from __future__ import annotations

import warnings
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


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, computed by the x86 int8 kernel on dynamically quantized
    activations. `q` int8 (out, in) and `scale` float32 (out,) are the exported tensors, used as they are."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated (torchao's successor
            warnings.simplefilter("ignore")  # has no x86 int8 kernel that wins here: docs/deploy.md)
            qw = torch._make_per_channel_quantized_tensor(
                q.contiguous(), scale.to(torch.float64), torch.zeros(q.shape[0], dtype=torch.long), 0
            )
            b = None if bias is None else bias.detach().to(torch.float32)
            self._packed = torch.ops.quantized.linear_prepack(qw, b)
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
        y = torch.ops.quantized.linear_dynamic(x2, self._packed, REDUCE_RANGE)
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
    """Per layer position, keys and values of shape (B, n_kv_head, size, head_dim), preallocated."""

    def __init__(self, model: GPT, batch: int, size: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.k, self.v = [], []
        for i in range(model.config.n_layer):
            a = model.layer(i).attn
            shape = (batch, a.n_kv_head, size, a.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def fill(self, cache: Cache) -> None:
        """Copy a dynamic cache (the prompt's keys/values) into positions [0, its length)."""
        for i, layer in enumerate(cache.layers):
            n = layer.length
            self.k[i][:, :, :n].copy_(layer.k)
            self.v[i][:, :, :n].copy_(layer.v)


def decode_step(
    model: GPT, ks: list[torch.Tensor], vs: list[torch.Tensor], idx: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """One new token per row, idx (B, 1) at absolute position pos (1,) -> logits (B, vocab); writes its
    keys/values into ks/vs at `pos` (in place). Same arithmetic as GPT.forward with a cache."""
    size = ks[0].shape[2]
    x = model.pos(model.wte(idx), pos)  # (B, 1, C)
    rot = model.pos.rotary(pos)
    kpos = torch.arange(size, device=idx.device)[None, :]  # (1, size) vs the query's pos (1,)
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
        ks[i].index_copy_(2, pos, k.to(ks[i].dtype))
        vs[i].index_copy_(2, pos, v.to(vs[i].dtype))
        allowed = kpos <= pos  # (1, size): the filled positions, this one included
        if a.window is not None:
            allowed = allowed & (pos - kpos < a.window)
        y = F.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=allowed, enable_gqa=nkv != nh)
        x = x + a.proj(y.transpose(1, 2).reshape(B, 1, nh * hd))
        x = x + block.mlp(block.norm2(x))
    x = model.norm_f(x)
    logits = F.linear(x, model.wte.weight) if model.lm_head is None else model.lm_head(x)
    if model.config.logit_softcap is not None:
        cap = model.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
    return logits[:, -1, :]


class Decoder:
    """Holds a model's decode step (compiled or not) so repeated generations reuse it."""

    def __init__(self, model: GPT, compile: bool = False):
        self.model = model
        self.compile = compile
        self._step = None

    @property
    def step(self):
        if self._step is None:
            self._step = decode_step
            if self.compile:
                self._step = torch.compile(decode_step, dynamic=False)
        return self._step

    @torch.inference_mode()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield (B, 1) new tokens one at a time; the same tokens as `GPT.generate_stream`."""
        model = self.model
        if fast_decode_blocker(model) is not None:
            yield from model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator)
            return
        cap = model.config.block_size
        cache = Cache(model.config.n_layer)
        logits = model(idx[:, -cap:], cache)[:, -1, :]
        dtype = cache.layers[0].k.dtype
        static = StaticCache(model, idx.shape[0], cap, dtype, idx.device)
        static.fill(cache)
        length = cache.length
        del cache
        seq = idx
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield nxt
            seq = torch.cat([seq, nxt], dim=1)
            if length + 1 > cap:  # context full: recompute over the last block_size tokens, as GPT does
                logits = model(seq[:, -cap:])[:, -1, :]
            else:
                pos = torch.tensor([length], device=idx.device)
                logits = self.step(model, static.k, static.v, nxt, pos)
                length += 1


def decoder(model: GPT, compile: bool = False) -> Decoder:
    """The model's Decoder (cached on the model, one per compile setting)."""
    key = "_microgpt_decoder_compiled" if compile else "_microgpt_decoder"
    d = model.__dict__.get(key)
    if d is None:
        d = Decoder(model, compile)
        model.__dict__[key] = d  # not a submodule: stays out of state_dict and .to()
    return d


def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, compile: bool = False, **sampling):
    """`GPT.generate_stream` through the static-cache decode step (falls back to it for other blocks)."""
    return decoder(model, compile).stream(idx, max_new_tokens, **sampling)


__all__ = [
    "Decoder",
    "Int8Embedding",
    "Int8Linear",
    "StaticCache",
    "decode_step",
    "decoder",
    "fast_decode_blocker",
    "generate_stream",
    "int8_kernel_available",
    "is_int8",
    "quantize_int8",
]
