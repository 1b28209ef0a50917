"""ONNX export and an onnxruntime-backed model (`python -m microgpt.export format=onnx`).

model.onnx is one decode-friendly graph with a KV cache, exported by `torch.onnx.export` (dynamo):

    inputs   input_ids            int64   (batch, seq)
             past_key_{i}         float32 (batch, n_kv_head, past, head_dim)   one pair per layer position i
             past_value_{i}       float32 (batch, n_kv_head, past, head_dim)
    outputs  logits               float32 (batch, seq, vocab)
             present_key_{i}      float32 (batch, n_kv_head, past + seq, head_dim)
             present_value_{i}    float32 (batch, n_kv_head, past + seq, head_dim)

batch, seq and past are dynamic. Prefill: past of length 0; decode: feed one token and the last presents.
Positions start at `past`. The graph is written from the model's own modules (embeddings, norms, MLPs,
position module, output head); only attention is re-expressed with explicit past keys/values, so it must be
microgpt's built-in attention (mha / gqa / mqa / sliding); anything else is refused naming the component.

After writing, the export runs onnxruntime on a sample batch, both over the whole sequence and as prefill +
one-token decode steps through the KV cache, and compares the logits with the torch model's: a difference
above the tolerance aborts the export (nothing is written). `microgpt.load(DIR)` returns `OnnxGPT`, a small
model object over an onnxruntime InferenceSession that `microgpt.generate` / `microgpt.evaluate` drive.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.errors import CheckpointError, ConfigError, first_line

ONNX_FILE = "model.onnx"
OPSET = 18  # has every op the graph needs (LayerNormalization is 17); older than the newest, so more runtimes take it
INSTALL_HINT = "pip install 'microgpt[onnx]'"
# Max |onnxruntime - torch| allowed on the sample batch's fp32 logits: TOL_ABS + TOL_REL * max|logits|. The two
# runtimes compute the same float32 math with different kernels (matmul blocking, fused vs decomposed
# softmax / layer norm), so they differ by summation-order rounding, a few ulps per op that grows with the
# logits' magnitude and the depth; a wrong graph (a lost bias, a shifted position, a stale cache) moves logits
# by far more than 1e-3. See docs/onnx.md for the measured differences.
TOL_ABS = 1e-4
TOL_REL = 1e-5


def _require_runtime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"ONNX models need onnxruntime, which is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def _require_exporter() -> None:
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"format=onnx needs the {name} package, which is not installed; {INSTALL_HINT}") from None
    _require_runtime()


# ---- what the graph can represent ----------------------------------------------------------------------


def onnx_blockers(model) -> list[str]:
    """The components of `model` the ONNX graph cannot represent, each named (empty: it can)."""
    from microgpt.components.attention import CausalSelfAttention

    cfg = model.config
    bad = []
    for i, blk in enumerate(model.blocks):
        for part in ("norm1", "attn", "norm2", "mlp"):
            if not hasattr(blk, part):
                bad.append(f"block {i} has no {part} (a custom block {type(blk).__name__})")
        attn = getattr(blk, "attn", None)
        if attn is not None and type(attn) is not CausalSelfAttention:
            cls = type(attn)
            bad.append(
                f"attention={cfg.attention} ({cls.__module__}.{cls.__name__}: the graph's KV-cache attention is "
                "written for microgpt's built-in mha/gqa/mqa/sliding)"
            )
            break
    if not hasattr(model.pos, "rotary"):
        bad.append(f"position={cfg.position} (no rotary hook)")
    return bad


def check_onnx(model) -> None:
    """Raise CheckpointError naming what format=onnx cannot hold (converters are plan()'s to refuse), or
    ConfigError when the exporter's packages are missing."""
    _require_exporter()
    bad = onnx_blockers(model)
    if bad:
        raise CheckpointError(f"format=onnx cannot represent this model: {'; '.join(bad)}; use format=safetensors")


# ---- the graph -----------------------------------------------------------------------------------------


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def _attend(attn, h: torch.Tensor, rot, pk: torch.Tensor, pv: torch.Tensor, mask: torch.Tensor):
    """CausalSelfAttention.forward with explicit past keys/values: (y, k_all, v_all)."""
    from microgpt.components.position import apply_rotary

    B, T, _ = h.shape
    nh, nkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    if attn.qk_norm:
        q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    if rot is not None:
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
    k = torch.cat([pk, k], dim=2)  # (B, nkv, past + T, hd)
    v = torch.cat([pv, v], dim=2)
    kk, vv = k, v
    if nkv != nh:
        kk = k.repeat_interleave(nh // nkv, dim=1)
        vv = v.repeat_interleave(nh // nkv, dim=1)
    y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    y = y.transpose(1, 2).reshape(B, T, nh * hd)
    return attn.proj(y), k, v


class DecoderGraph(nn.Module):
    """What model.onnx computes: (input_ids, *past) -> (logits, *present), see the module docstring."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, *past: torch.Tensor):
        m = self.model
        cfg = m.config
        T = idx.shape[1]
        P = past[0].shape[2]
        pos = torch.arange(T, device=idx.device) + P  # absolute positions of the new tokens
        x = m.pos(m.wte(idx), pos)
        rot = m.pos.rotary(pos)
        masks: dict[int | None, torch.Tensor] = {}  # one per attention window (sliding layers may differ)
        presents = []
        for i in range(cfg.n_layer):
            blk = m.layer(i)
            window = blk.attn.window
            if window not in masks:
                masks[window] = _allowed(pos, P + T, window)
            allowed = masks[window]
            y, k, v = _attend(blk.attn, blk.norm1(x), rot, past[2 * i], past[2 * i + 1], allowed)
            x = x + y
            x = x + blk.mlp(blk.norm2(x))
            presents += [k, v]
        x = m.norm_f(x)
        if m.lm_head is None:  # tied: a 2-D linear exports as Gemm(transB=1), reading the embedding table as it
            # is; (B, T, C) @ W.t() would make the exporter fold a transposed second copy of W into the file
            logits = F.linear(x.reshape(-1, x.shape[-1]), m.wte.weight).view(x.shape[0], x.shape[1], -1)
        else:
            logits = m.lm_head(x)
        if cfg.logit_softcap is not None:
            cap = cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return (logits, *presents)


def _allowed(qpos: torch.Tensor, s: Any, window: int | None) -> torch.Tensor:
    """Bool (T, S): query at absolute position qpos[i] may attend key j (S = past + T keys)."""
    kpos = torch.arange(s, device=qpos.device)[None, :]
    ok = kpos <= qpos[:, None]
    if window is not None:
        ok = ok & (qpos[:, None] - kpos < window)
    return ok


# ---- writing -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines and warnings (torchvision ops it skips, axis renames) stay off the CLI's
    stdout, which ends with one JSON line."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _kv_shapes(model) -> list[tuple[int, int]]:
    """(n_kv_head, head_dim) of each layer position's cache (pruned heads may differ per block)."""
    return [(model.layer(i).attn.n_kv_head, model.layer(i).attn.head_dim) for i in range(model.config.n_layer)]


def export_graph(model, path: Path) -> None:
    """Write `DecoderGraph(model)` to `path` as ONNX (opset OPSET) with dynamic batch, seq and past axes."""
    from torch.export import Dim

    model = model.eval()
    n = model.config.n_layer
    ins, outs = io_names(n)
    # example sizes >= 2 on every dynamic axis: torch.export specializes axes whose example size is 0 or 1
    B, T, P = 2, 3, 2
    idx = torch.zeros(B, T, dtype=torch.long)
    past = [torch.zeros(B, h, P, d) for h, d in _kv_shapes(model) for _ in range(2)]
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(
                DecoderGraph(model).eval(),
                (idx, *past),
                None,
                input_names=ins,
                output_names=outs,
                dynamic_shapes=shapes,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
            # protobuf caps one file at 2 GB: larger models keep their weights in model.onnx.data beside it
            prog.save(str(path), external_data=params > 1_500_000_000)
    except (ConfigError, CheckpointError):
        raise
    except Exception as e:
        raise CheckpointError(
            f"torch.onnx could not export this model ({type(e).__name__}: {first_line(e)[:300]}); "
            "use format=safetensors, or report the model config"
        ) from None


def _session(path: Path, threads: int | None = None):
    ort = _require_runtime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise CheckpointError(
            f"onnxruntime cannot load {path} ({type(e).__name__}: {first_line(e)[:200]}); export the model again"
        ) from None


def runtime_check(model, session, batch: int = 2, seq: int = 24, decode: int = 4, seed: int = 0) -> dict[str, Any]:
    """Run `session` on a sample batch, over the whole sequence (empty cache) and as prefill + `decode`
    one-token steps through the KV cache, and compare the logits with `model`'s: max |diff| and the bound."""
    cfg = model.config
    T = max(2, min(seq, cfg.block_size))
    decode = min(decode, T - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, T), generator=g)
    with torch.no_grad():
        ref = model(x).float().numpy()
    runner = _Runner(session, _kv_shapes(model))
    full, _ = runner.run(x.numpy(), runner.empty(batch))
    diff = float(np.abs(full - ref).max())
    logits, past = runner.run(x[:, : T - decode].numpy(), runner.empty(batch))
    diff = max(diff, float(np.abs(logits - ref[:, : T - decode]).max()))
    for j in range(T - decode, T):
        logits, past = runner.run(x[:, j : j + 1].numpy(), past)
        diff = max(diff, float(np.abs(logits[:, 0] - ref[:, j]).max()))
    tol = TOL_ABS + TOL_REL * float(np.abs(ref).max())
    return {"max_abs_diff": diff, "tolerance": tol, "batch": batch, "seq": T, "decode_steps": decode}


def write_onnx(model, tok, out: Path, plugins: dict, dtype: str = "float32") -> dict[str, Any]:
    """model.onnx + microgpt.json (config, tokenizer, the graph's inputs/outputs), checked in onnxruntime against
    `model`; returns the manifest's `onnx` record (opset, the measured max logit difference and its bound).
    Raises CheckpointError on a mismatch (the caller's atomic_dir then leaves nothing behind)."""
    from microgpt.io.checkpoint import EXPORT_META
    from microgpt.io.export import _meta

    if dtype != "float32":
        raise ConfigError(f"format=onnx writes float32 weights, got dtype={dtype}; leave dtype=float32")
    _require_exporter()
    check_onnx(model)
    export_graph(model, out / ONNX_FILE)
    check = runtime_check(model, _session(out / ONNX_FILE))
    if not check["max_abs_diff"] <= check["tolerance"]:  # a NaN fails too
        raise CheckpointError(
            f"onnxruntime's logits differ from the torch model's by {check['max_abs_diff']:.3g} "
            f"(allowed {check['tolerance']:.3g}) on a sample batch; the ONNX graph is wrong, nothing was written: "
            "use format=safetensors and report the model config"
        )
    ins, outs = io_names(model.config.n_layer)
    record = {
        "file": ONNX_FILE,
        "opset": OPSET,
        "runtime": "onnxruntime",
        "kv_cache": True,
        "inputs": ins,
        "outputs": outs,
        "dynamic_axes": {"input_ids": ["batch", "seq"], "past_*": ["batch", "past"]},
        "kv_shapes": [list(s) for s in _kv_shapes(model)],
        "runtime_check": check,
    }
    meta = _meta(model, tok, plugins, ONNX_FILE, dtype)
    meta["onnx"] = record
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    ort = _require_runtime()
    return {
        "opset": OPSET,
        "kv_cache": True,
        "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
        "max_abs_diff": check["max_abs_diff"],
        "tolerance": check["tolerance"],
        "checked_on": f"{check['batch']} x {check['seq']} random tokens: whole sequence, and prefill + "
        f"{check['decode_steps']} one-token steps through the KV cache",
    }


# ---- reading: a model object over an onnxruntime session ----------------------------------------------


class _Runner:
    """Feeds an InferenceSession the graph's inputs (numpy) and splits its outputs into logits + cache."""

    def __init__(self, session, kv_shapes: list[tuple[int, int]]):
        self.session = session
        self.kv_shapes = kv_shapes
        self.ins, self.outs = io_names(len(kv_shapes))

    def empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), np.float32) for h, d in self.kv_shapes for _ in range(2)]

    def run(self, idx: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": np.ascontiguousarray(idx, dtype=np.int64), **dict(zip(self.ins[1:], past))}
        out = self.session.run(None, feed)
        return out[0], out[1:]


def is_onnx_dir(p: Path) -> bool:
    from microgpt.io.checkpoint import EXPORT_META

    return p.is_dir() and (p / ONNX_FILE).is_file() and (p / EXPORT_META).is_file()


def refuse_onnx_dir(p: Path) -> dict[str, Any]:
    """The checkpoint reader's row for an ONNX export: it holds a graph, not weights to train or convert."""
    raise CheckpointError(
        f"{p} is an ONNX export: `microgpt.load`, `microgpt.generate` and `microgpt.evaluate` run it in "
        "onnxruntime; training, conversion and other exports need the checkpoint it was exported from "
        "(its manifest.json records it as source)"
    )


class OnnxGPT:
    """An exported model.onnx behind the calls microgpt's generate / evaluate make on a GPT:
    `model(idx) -> logits` (torch tensors in and out), `generate_stream` / `generate` with a KV cache,
    `config`, `eval()`, `device`. It runs on onnxruntime's CPU provider; it has no torch parameters."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from microgpt.config import GPTConfig
        from microgpt.data.tokenizers import tokenizer_from_dict
        from microgpt.io.checkpoint import EXPORT_META

        d = Path(path).expanduser()
        try:
            meta = json.loads((d / EXPORT_META).read_text(encoding="utf-8"))
            rec = meta["onnx"]
            self.config = GPTConfig.from_dict(dict(meta["model"]))
            kv = [(int(h), int(hd)) for h, hd in rec["kv_shapes"]]
            self.tokenizer = tokenizer_from_dict(meta["tokenizer"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{d / EXPORT_META} is damaged ({type(e).__name__}: {e}); export the model again"
            ) from None
        self.path = d / rec.get("file", ONNX_FILE)
        self.session = _session(self.path, threads)
        names = [i.name for i in self.session.get_inputs()]
        if names != io_names(len(kv))[0]:
            raise CheckpointError(
                f"{self.path} does not have the inputs microgpt's export writes; export the model again"
            )
        self._runner = _Runner(self.session, kv)
        self.device = torch.device("cpu")
        self.training = False

    def eval(self) -> OnnxGPT:
        return self

    def to(self, device) -> OnnxGPT:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"an ONNX export runs on onnxruntime's CPU provider, not {device}; pass device=cpu")
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(())  # the weights live in the ONNX graph; callers take `model.device`

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward(idx)

    def _check_length(self, n: int) -> None:
        if self.config.position == "learned" and n > self.config.block_size:
            raise ValueError(f"sequence of length {n} exceeds block_size {self.config.block_size}")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), float32 on the CPU."""
        self._check_length(idx.shape[1])
        logits, _ = self._runner.run(idx.detach().cpu().numpy(), self._runner.empty(idx.shape[0]))
        return torch.from_numpy(logits)

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield (B, 1) new tokens one at a time through the graph's KV cache (as GPT.generate_stream)."""
        from microgpt.model import sample

        cap = self.config.block_size
        r = self._runner
        B = idx.shape[0]
        seq = idx.detach().cpu()
        logits, past = r.run(seq[:, -cap:].numpy(), r.empty(B))
        length = min(seq.shape[1], cap)
        for _ in range(max_new_tokens):
            nxt = sample(torch.from_numpy(logits[:, -1, :]), temperature, top_k, top_p, generator)
            yield nxt
            seq = torch.cat([seq, nxt], dim=1)
            if length + 1 > cap:  # context full: recompute over the last block_size tokens, as GPT does
                logits, past = r.run(seq[:, -cap:].numpy(), r.empty(B))
                length = cap
            else:
                logits, past = r.run(nxt.numpy(), past)
                length += 1

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        new = list(self.generate_stream(idx, max_new_tokens, **kw))
        return torch.cat([idx.cpu(), *new], dim=1) if new else idx


def load_onnx(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """(OnnxGPT, tokenizer) for an ONNX export directory."""
    if torch.device(map_location).type != "cpu":
        raise ConfigError(f"an ONNX export runs on onnxruntime's CPU provider, not {map_location}; pass device=cpu")
    model = OnnxGPT(path)
    return model, model.tokenizer


__all__ = [
    "ONNX_FILE",
    "OnnxGPT",
    "check_onnx",
    "export_graph",
    "is_onnx_dir",
    "load_onnx",
    "onnx_blockers",
    "runtime_check",
    "write_onnx",
]
