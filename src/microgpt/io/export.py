"""Export a model out of microgpt, one command for every artifact:

    python -m microgpt.export ckpt=PATH format=safetensors|hf|int8|int4|gguf|onnx out=DIR [text=FILE] [base=BASE]

    safetensors  model.safetensors + microgpt.json (config, tokenizer); `microgpt.load(DIR)` reloads it
    hf           a transformers directory `AutoModelForCausalLM.from_pretrained(DIR)` loads: GPT-2's layout
                 for learned-position/LayerNorm/GELU models, Llama's (or Qwen2's: q/k/v biases; Mistral's:
                 sliding window) for rope/rmsnorm/swiglu ones; with the tokenizer files when the tokenizer
                 is a BPE (tokenizer.json, vocab.json, merges.txt; a pretrained one's tokenizer_config.json)
    int8         a plain model: Linear weights (and the token embedding / tied head) quantized per output
                 channel, symmetric: q = round(w / s) in [-127, 127], s = max|w_row| / 127, stored as int8 +
                 float32 scales in model.safetensors; `microgpt.load(DIR)` runs them quantized: every Linear
                 (and the tied head) an int8 GEMM on activations quantized per call (microgpt.inference,
                 docs/deploy.md: 2-3x the float32 decode speed on an x86 CPU); `load(DIR, dequantize=True)`
                 gives the float model.
                 A model trained to be quantized (a plugin's converter with a quantized artifact, e.g. qat's
                 int8 scheme): that plugin's artifact, real quantized weights, loaded as a quantized model
    int4         a model trained for a 4-bit scheme (qat's 8da4w / int4_weight_only): its plugin's artifact
    gguf         model.gguf for llama.cpp's `gpt2` architecture (its tensor names and metadata; bpe, char and
                 byte tokenizers as a byte-level BPE vocabulary llama.cpp tokenizes like microgpt),
                 dtype=float32 | float16 | q8_0; `microgpt.load(DIR)` reads it back (docs/llamacpp.md)
    onnx         model.onnx (opset 18, dynamic batch/sequence, past/present key-value inputs/outputs for cached
                 decoding) + microgpt.json, checked in onnxruntime against the torch logits before it is kept
                 (the measured max difference goes into the manifest); `microgpt.load(DIR)` returns a model
                 backed by an onnxruntime session (io/onnx.py, docs/onnx.md; needs `pip install 'microgpt[onnx]'`)

PATH is anything `microgpt.load` accepts (a .ckpt, a run dir, an exported dir, an HF GPT-2 or Llama-family dir,
a LoRA adapter: its base is the recorded one or `base=`). Plugin converters are first folded into plain
weights by their plugin's `bake` hook (LoRA adapters merged, pruning masks applied); what is left must be
something the format can hold, else the export is refused naming the component. Every export also writes
manifest.json (format, scheme, bytes, the source's sha256, and with `text=FILE` the val loss of the exported
model as `microgpt.load` reads it back, scored by `microgpt.evaluate` on the whole file). The export is
written to a temporary directory next to DIR and renamed into place when complete, so an error never leaves
a half-written DIR. The last line printed is a JSON summary (files and sizes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn as nn
from omegaconf import DictConfig

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.errors import CheckpointError, ConfigError
from microgpt.io.checkpoint import (
    EXPORT_MANIFEST,
    EXPORT_META,
    GGUF_FILE,
    adapter_meta,
    model_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from microgpt.io.hf import (
    gpt2_blockers,
    hf_config_dict,
    hf_export_arch,
    llama_config_dict,
    save_hf_tokenizer,
    state_dict_to_hf,
    state_dict_to_llama,
)

FORMATS = ("safetensors", "hf", "int8", "int4", "gguf", "onnx")
QUANTIZED_FORMATS = ("int8", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_DTYPES = ("float32", "float16", "q8_0")  # q8_0: llama.cpp's blocks of 32 int8 values + a float16 scale
INT8_SCHEME = "int8 per output channel, symmetric: w = q * scale[row], q in [-127, 127], scale = max|w[row]| / 127"
INT8_SCHEME_NAME = "int8 per-channel symmetric weights, int8 dynamic activations (x86 int8 kernel on load)"


# ---- writing atomically --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes `out`, on error it is removed."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; pass another directory or overwrite=true")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"cannot write next to out={out} ({e.strerror}); pass a writable directory") from None
    try:
        yield tmp
        if out.exists():  # swap: the old directory goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files(d: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()}


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    odd = [k for k, v in sd.items() if type(v) is not torch.Tensor and not isinstance(v, nn.Parameter)]
    if odd:
        raise CheckpointError(
            f"tensors {odd[:3]} are not plain tensors (a quantization converter's?); export the model before conversion"
        )
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)


def _check_plain(model) -> None:
    if model.config.converters:
        names = ", ".join(str(c.get("name")) for c in model.config.converters)
        raise CheckpointError(
            f"the model was converted ({names}); these formats hold plain weights: export the model before conversion"
        )


# ---- formats -------------------------------------------------------------------------------------------


def _meta(model, tok, plugins: dict, weights: str, dtype: str, quant: dict | None = None) -> dict[str, Any]:
    return {
        "format": "microgpt",
        "version": 1,
        "weights": weights,
        "dtype": dtype,
        "model": model.config.to_dict(),
        "tokenizer": tok.to_dict(),
        "plugins": plugins,
        "quantization": quant,
    }


def write_safetensors(model, tok, out: Path, plugins: dict, dtype: str = "float32") -> None:
    sd = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    _save_safetensors(sd, out / "model.safetensors", {"format": "pt"})
    meta = _meta(model, tok, plugins, "model.safetensors", dtype)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def int8_targets(model, quantize_embeddings: bool = True) -> list[str]:
    """State-dict names of the weights quantized to int8: every nn.Linear's, plus the token embedding."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if quantize_embeddings:
        names.append("wte.weight")
    return names


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 (out, in), scale float32 (out,)) with w ~= q * scale[:, None]."""
    w = w.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def write_int8(model, tok, out: Path, plugins: dict, quantize_embeddings: bool = True) -> None:
    _check_plain(model)
    sd = dict(model.state_dict())
    targets = int8_targets(model, quantize_embeddings)
    for name in targets:
        q, scale = quantize_per_channel(sd[name])
        sd[name], sd[f"{name}.scale"] = q, scale
    _save_safetensors(sd, out / "model.safetensors", {"format": "pt"})
    quant = {"scheme": INT8_SCHEME, "tensors": targets}
    meta = _meta(model, tok, plugins, "model.safetensors", "int8", quant)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _blocked(model, fmt: str) -> None:
    if fmt == "hf":  # GPT-2 or the Llama family; raises naming what neither can represent
        hf_export_arch(model.config)
        return
    bad = gpt2_blockers(model.config)
    if bad:
        raise CheckpointError(
            f"format={fmt} is GPT-2's architecture, which cannot represent this model: {'; '.join(bad)}; "
            "use format=safetensors or format=int8"
        )


def write_hf(model, tok, out: Path, dtype: str = "float32") -> None:
    llama = hf_export_arch(model.config) != "gpt2"
    sd = (state_dict_to_llama if llama else state_dict_to_hf)(model.state_dict(), model.config)
    sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
    _save_safetensors(sd, out / "model.safetensors", {"format": "pt"})
    cfg = (llama_config_dict if llama else hf_config_dict)(model.config, tok, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    save_hf_tokenizer(tok, out, model.config.block_size)


# GGUF: llama.cpp's names for the gpt2 architecture (gguf.constants.MODEL_ARCH.GPT2)
_GGUF_LAYER = {
    "norm1": "attn_norm",
    "attn.qkv": "attn_qkv",
    "attn.proj": "attn_output",
    "norm2": "ffn_norm",
    "mlp.fc": "ffn_up",
    "mlp.proj": "ffn_down",
}


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor in torch layout ((out, in) matrices, as llama.cpp's GPT-2 converter writes them)."""
    cfg = model.config
    sd = model.state_dict()

    def bias(prefix: str, n: int) -> torch.Tensor:  # bias=False: zeros (llama.cpp's gpt2 requires biases)
        return sd.get(f"{prefix}.bias", torch.zeros(n))

    out = {
        "token_embd.weight": sd["wte.weight"],
        "position_embd.weight": sd["pos.wpe.weight"],
        "output_norm.weight": sd["norm_f.weight"],
        "output_norm.bias": bias("norm_f", cfg.n_embd),
        # llama.cpp's own converter writes GPT-2's tied head out as a tensor of its own: do the same
        "output.weight": model.output_weight.detach(),
    }
    for i in range(cfg.n_layer):
        for mg, gg in _GGUF_LAYER.items():
            w = sd[f"blocks.{i}.{mg}.weight"]
            out[f"blk.{i}.{gg}.weight"] = w
            out[f"blk.{i}.{gg}.bias"] = bias(f"blocks.{i}.{mg}", w.shape[0])
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies and llama.cpp use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _gguf_vocab(tok, vocab_size: int) -> dict[str, Any] | None:
    """tokens / types / merges / end-of-text id for tokenizer.ggml.model=gpt2 (llama.cpp's byte-level BPE).

    A byte-level BPE (bpe, or an hf GPT-2-style tokenizer) is written as it is. A char or byte tokenizer is
    written as a byte-level BPE that reproduces it: each character is one token (its UTF-8 bytes in GPT-2's
    byte alphabet), and a multi-byte character gets the merges that join its bytes back into it, so
    llama.cpp's tokenizer gives our ids for any text our tokenizer accepts. None: no llama.cpp equivalent.
    """
    special: set[str] = set()
    eot = None
    backend = getattr(tok, "tok", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        pre = json.dumps(spec.get("pre_tokenizer"))
        if type(backend.model).__name__ != "BPE" or '"ByteLevel"' not in pre:
            return None
        merges = spec.get("model", {}).get("merges", [])
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        vocab = backend.get_vocab(with_added_tokens=True)
        special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
        eot = backend.token_to_id("<|endoftext|>")
    elif getattr(tok, "name", None) in ("char", "byte"):
        alphabet = _byte_level_alphabet()
        chars = tok.chars if tok.name == "char" else None
        if chars is None:  # byte: token i is byte i
            vocab = {alphabet[b]: b for b in range(256)}
            merges = []
        else:
            vocab, merges, seen = {}, [], set()
            for i, c in enumerate(chars):
                pieces = [alphabet[b] for b in c.encode("utf-8")]
                vocab["".join(pieces)] = i
                for k in range(1, len(pieces)):  # join the bytes left to right: b0 b1, b0b1 b2, ...
                    m = f"{''.join(pieces[:k])} {pieces[k]}"
                    if m not in seen:
                        seen.add(m)
                        merges.append(m)
    else:
        return None
    if not merges:
        # llama.cpp's gpt2 vocabulary requires the merges key and gguf's writer drops an empty array:
        # one merge that can never fire (its left side "ĠĠ", a space pair, would need a "Ġ Ġ" merge first)
        merges = ["\u0120\u0120 \u0120"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp wants exactly n_vocab tokens: pad a padded vocabulary
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(t)
            types.append(3 if t in special else 1)  # CONTROL / NORMAL
    return {"tokens": tokens, "types": types, "merges": merges, "eot": eot}


def write_gguf(model, tok, out: Path, dtype: str = "float32") -> None:
    import gguf

    _blocked(model, "gguf")  # llama.cpp's gpt2 graph (models/gpt2.cpp): plain q.k / sqrt(d) attention, raw logits
    cfg = model.config
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"format=gguf writes dtype={', '.join(GGUF_DTYPES)}, got {dtype}")
    np_dtype = "float32" if dtype == "float32" else "float16"
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]  # 32 values per Q8_0 block (one float16 scale each)
    w = gguf.GGUFWriter(str(out / GGUF_FILE), "gpt2")
    w.add_name("microgpt")
    w.add_file_type(
        {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16}.get(
            dtype, gguf.LlamaFileType.MOSTLY_Q8_0
        )
    )
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.norm_eps)
    vocab = _gguf_vocab(tok, cfg.vocab_size)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, as HF's ByteLevel pre-tokenizer (use_regex) applies
        # llama.cpp's gpt2 vocab defaults bos = eos = 11 (GPT-2's ","): name an end-of-text token whenever
        # there is one, else an unused slot of a padded vocabulary, so no ordinary token ends generation
        stop = vocab["eot"]
        unused = [i for i, t in enumerate(vocab["types"]) if t == 5]
        if stop is None and unused:
            stop = unused[0]
            vocab["types"][stop] = 3  # CONTROL: never produced by text, never printed
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_add_bos_token(False)  # microgpt's models are trained without a start token
        if stop is not None:
            w.add_bos_token_id(stop)
            w.add_eos_token_id(stop)
    else:  # a tokenizer with no llama.cpp equivalent: a vocabulary-less model (feed it token ids)
        w.add_tokenizer_model("none")
        w.add_vocab_size(cfg.vocab_size)
    # microgpt's own records, so nothing is lost on the way back
    w.add_string("microgpt.tokenizer", json.dumps(tok.to_dict()))
    w.add_string("microgpt.config", json.dumps(cfg.to_dict()))
    for name, t in gguf_tensors(model).items():
        # 1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them
        arr = t.numpy()
        if arr.ndim == 2 and dtype == "q8_0" and arr.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        else:  # q8_0: a matrix whose rows are not whole blocks stays float16, as llama.cpp's converter does
            w.add_tensor(name, arr.astype(np_dtype) if arr.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_state_dict(path: Path) -> dict[str, Any]:
    """A GGUF that `write_gguf` wrote, as a checkpoint dict (the inverse of `gguf_tensors`)."""
    import gguf

    from microgpt.config import GPTConfig
    from microgpt.model import GPT

    try:
        r = gguf.GGUFReader(str(path))
        cfg_field, tok_field = r.fields.get("microgpt.config"), r.fields.get("microgpt.tokenizer")
        tensors = {t.name: t for t in r.tensors}
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}); export the model again"
        ) from None
    if cfg_field is None or tok_field is None:
        raise CheckpointError(
            f"{path} was not written by `python -m microgpt.export format=gguf` (no microgpt.config record); "
            "run it with llama.cpp, or export the model from microgpt"
        )
    cfg_dict, tok = json.loads(cfg_field.contents()), json.loads(tok_field.contents())
    cfg = GPTConfig.from_dict(dict(cfg_dict))
    with torch.device("meta"):  # the names and shapes the model needs; no memory, no init
        want = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    names = {"wte.weight": "token_embd.weight", "pos.wpe.weight": "position_embd.weight"}
    names |= {
        "norm_f.weight": "output_norm.weight",
        "norm_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
    }
    for i in range(cfg.n_layer):
        for mg, gg in _GGUF_LAYER.items():
            for leaf in ("weight", "bias"):
                names[f"blocks.{i}.{mg}.{leaf}"] = f"blk.{i}.{gg}.{leaf}"
    sd = {}
    for key, shape in want.items():
        t = tensors.get(names.get(key, ""))
        if t is None:
            raise CheckpointError(f"{path} lacks the tensor for {key}; export the model again")
        data = t.data
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)  # q8_0 blocks -> float32
        v = torch.from_numpy(data.copy()).reshape(tuple(reversed(t.shape.tolist()))).to(torch.float32)
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {tuple(v.shape)}, the model needs {shape}")
        sd[f"model.{key}"] = v
    return {
        "state_dict": sd,
        "hyper_parameters": {"model": cfg_dict, "tokenizer": tok, "plugins": {}},
        "source": {"gguf": str(path)},
    }


# ---- baking, refusing, the manifest --------------------------------------------------------------------


def _owner_names(model) -> list[str]:
    from microgpt.plugins import converter_owners

    return [m.__name__.split(".")[1] for m in converter_owners(model)]


def bake_for_export(model) -> tuple[Any, list[str]]:
    """`model` with every plugin converter its plugin can fold into plain weights folded (`bake` hook: LoRA
    merged, pruning masks applied), and the names of the plugins that left no converter behind."""
    from microgpt.plugins import bake

    before = _owner_names(model)
    model = bake(model).eval()
    after = _owner_names(model)
    return model, [n for n in before if n not in after]


def plan(model, format: str):
    """The plugin whose quantized artifact this export writes (int8/int4 of a model trained to be quantized),
    or None for microgpt's own writers; raises CheckpointError naming what `format` cannot hold."""
    from microgpt.plugins import hook, quantizer

    converters = [str(c.get("name")) for c in model.config.converters]
    q = quantizer(model) if converters else None
    if format in ("hf", "gguf"):
        _blocked(model, format)  # names every component (converters included) the architecture lacks
        return None
    if format == "onnx":
        from microgpt.io.onnx import check_onnx

        check_onnx(model)  # names a component the graph cannot hold; converters are refused below
    if format == "safetensors":
        return None  # plain tensors: the remaining converters are recorded and rebuilt on load
    if q is None:
        if format == "int4":
            raise CheckpointError(
                "format=int4 writes the quantized artifact of a model trained for a 4-bit scheme (a plugin converter "
                "with a quantized artifact, see docs/interop.md); this model has none: use format=int8"
            )
        _check_plain(model)
        return None
    name = q.__name__.split(".")[1]
    others = [c for c in converters if c not in _converter_names_of(model, name)]
    if others:
        raise CheckpointError(
            f"format={format} writes plugin {name}'s quantized artifact, which cannot hold the converters "
            f"{', '.join(others)}; use format=safetensors"
        )
    fmt_of = hook(q, "quantized_format")
    want = fmt_of(model) if fmt_of is not None else None
    if want != format:
        kind = q.describe_quantized(model) if hook(q, "describe_quantized") else name
        raise CheckpointError(
            f"the model was trained to be quantized as {kind} (plugin {name}), which format={format} cannot represent; "
            + (f"use format={want}" if want else "use format=safetensors")
        )
    return q


def _converter_names_of(model, plugin: str) -> list[str]:
    from microgpt.plugins import NAMESPACE
    from microgpt.registry import CONVERTER

    out = []
    for spec in model.config.converters:
        n = spec.get("name")
        if n in CONVERTER and CONVERTER.get(n).__module__.split(".")[:2] == [NAMESPACE, plugin]:
            out.append(n)
    return out


def source_sha256(ckpt: str | os.PathLike) -> str:
    """sha256 of the source: a file's bytes; for a directory model (exported, HF, an adapter's), the sha256 of
    its files' `name\0sha256\n` lines in name order."""

    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    meta = adapter_meta(ckpt)
    p = meta.parent if meta is not None else resolve_checkpoint(ckpt)
    if p.is_file():
        return file_hash(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
        h.update(f"{f.name}\0{file_hash(f)}\n".encode())
    return h.hexdigest()


def _score(model, tok, text: str, batch_size: int) -> dict[str, Any]:
    from microgpt.evaluate import evaluate_text

    return evaluate_text(model, tok, text, batch_size)


# ---- entry points --------------------------------------------------------------------------------------


def export(
    ckpt: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    overwrite: bool = False,
    dtype: str = "float32",
    quantize_embeddings: bool = True,
    text: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Export the model at `ckpt` to `out` in `format`; returns a summary with file sizes and the manifest."""
    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.io.checkpoint import load

    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES and not (format == "gguf" and dtype in GGUF_DTYPES):
        also = " (format=gguf also: q8_0)"
        raise ConfigError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPES)}{also}")
    if format in QUANTIZED_FORMATS and dtype != "float32":
        raise ConfigError(f"format={format} keeps its unquantized tensors in float32; leave dtype=float32")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    score_text = None
    if text is not None:
        try:
            score_text = Path(text).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"text={text} cannot be read ({type(e).__name__}); pass a UTF-8 text file") from None

    ck = read_checkpoint(ckpt, base)
    model = model_from_checkpoint(ck).eval()
    tok_rec = ck["hyper_parameters"].get("tokenizer")
    if tok_rec is None:
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer; it was not written by microgpt's train.py")
    tok = tokenizer_from_dict(tok_rec)
    plugins = dict(ck["hyper_parameters"].get("plugins") or {})
    del ck
    model, baked = bake_for_export(model)
    plugins = {k: v for k, v in plugins.items() if k not in baked}
    # refuse what a format cannot hold before anything is scored or written
    quantizer_plugin = plan(model, format)
    # the source (baking computes the same function: merged adapters, applied masks), before any export rounding
    source_val = _score(model, tok, score_text, batch_size) if score_text is not None else None
    with atomic_dir(out, overwrite) as tmp:
        artifact = None
        extra: dict[str, Any] = {}  # the writer's own manifest record (onnx: the runtime check)
        if quantizer_plugin is not None:
            artifact = quantizer_plugin.QUANTIZED_ARTIFACT
            scheme = quantizer_plugin.write_quantized(model, tmp / artifact, tok.to_dict(), plugins)["kind"]
        elif format == "safetensors":
            write_safetensors(model, tok, tmp, plugins, dtype)
            scheme = dtype
        elif format == "int8":
            write_int8(model, tok, tmp, plugins, quantize_embeddings)
            scheme = INT8_SCHEME_NAME
        elif format == "hf":
            write_hf(model, tok, tmp, dtype)
            scheme = dtype
        elif format == "onnx":
            from microgpt.io.onnx import write_onnx

            extra["onnx"] = write_onnx(model, tok, tmp, plugins, dtype)
            scheme = dtype
        else:
            write_gguf(model, tok, tmp, dtype)
            scheme = dtype
        files = _files(tmp)
        manifest: dict[str, Any] = {
            "format": format,
            "scheme": scheme,
            "artifact": artifact,
            "bytes": sum(files.values()),
            "files": files,
            "source": str(ckpt),
            "source_sha256": source_sha256(ckpt),
            "baked": baked,
            "converters": [str(c.get("name")) for c in model.config.converters],
            **extra,
        }
        if score_text is not None:
            exported, _ = load(tmp / artifact if artifact else tmp)  # as it deploys: what microgpt.load reads
            ev = _score(exported, tok, score_text, batch_size)
            manifest.update(
                text=str(text),
                val_loss=ev["val_loss"],
                bits_per_byte=ev["bits_per_byte"],
                val_tokens=ev["tokens"],
                source_val_loss=source_val["val_loss"],
            )
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        files = _files(tmp)
    fp32 = sum(v.numel() * 4 for v in model.state_dict().values())
    total = manifest["bytes"]  # the model's files; manifest.json is the record of them
    return {
        "format": format,
        "out": str(Path(out).expanduser()),
        "files": files,
        "bytes": total,
        "fp32_weights_bytes": fp32,
        "size_vs_fp32": round(total / fp32, 4),
        "manifest": manifest,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
@exit_on_error
def main(cfg: DictConfig) -> None:
    result = export(
        cfg.ckpt,
        cfg.format,
        cfg.out,
        overwrite=cfg.overwrite,
        dtype=cfg.dtype,
        quantize_embeddings=cfg.quantize_embeddings,
        text=cfg.get("text"),
        base=cfg.get("base"),
        batch_size=cfg.get("batch_size", 16),
    )
    from microgpt.console import export_summary

    print(export_summary(result), file=sys.stderr, flush=True)  # stdout stays one JSON line
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    quiet_env()
    main()


__all__ = [
    "FORMATS",
    "atomic_dir",
    "bake_for_export",
    "export",
    "gguf_state_dict",
    "plan",
    "source_sha256",
    "gguf_tensors",
    "int8_targets",
    "quantize_per_channel",
    "write_gguf",
    "write_hf",
    "write_int8",
    "write_safetensors",
]
