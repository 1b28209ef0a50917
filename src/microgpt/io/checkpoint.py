"""Reading checkpoints safely and rebuilding models from them without Hydra or Lightning.

Every format a model path can be is one row of `FORMATS` (probe, reader); every torch file goes through
`safe_load` (weights_only: a file we load never runs code)."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError, first_line
from microgpt.model import GPT

EXPORT_META = "microgpt.json"  # marks a directory written by `python -m microgpt.export` (safetensors / int8)
ADAPTER_META = "adapter.json"  # marks a LoRA adapter written by the lora plugin (adapter.safetensors beside it)
EXPORT_MANIFEST = "manifest.json"  # every `python -m microgpt.export` directory: format, scheme, bytes, source hash
GGUF_FILE = "model.gguf"  # the file `python -m microgpt.export format=gguf` writes


def adapter_meta(path: str | os.PathLike) -> Path | None:
    """The adapter.json of a LoRA adapter given as its directory, its .safetensors or the json itself."""
    if isinstance(path, str) and path.startswith("hf:"):
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        cand = p / ADAPTER_META
    elif p.name == ADAPTER_META:
        cand = p
    elif p.suffix == ".safetensors":
        cand = p.parent / ADAPTER_META
    else:
        return None
    return cand if cand.is_file() else None


def read_adapter(meta: Path, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """An adapter and its base (recorded, or `base`) as one checkpoint dict (the lora plugin reads it)."""
    from microgpt.plugins import load_plugin

    try:
        where = (json.loads(meta.read_text(encoding="utf-8")).get("plugins") or {}).get("lora")
    except (OSError, ValueError, AttributeError):
        where = None
    lora = load_plugin("lora", extra_dirs=[where] if where and Path(where).is_dir() else None)
    return lora.read_adapter(meta, None if base is None else str(base))


def safe_load(
    path: str | os.PathLike,
    corrupt: str,
    unsafe: str = "{path} cannot be loaded safely ({error}); it may hold arbitrary code",
    allow: Sequence[type] = (),
    mmap: bool = False,
) -> Any:
    """torch.load(weights_only=True) on the CPU; `allow`: extra classes the file may hold; `mmap`: map tensor data
    instead of reading it (when the file format allows). A damaged file raises CheckpointError(`corrupt`), one that
    needs code to load CheckpointError(`unsafe`); both are formatted with {path}, {error} (the exception's type)
    and {detail} (its first line)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # a legacy (non-zip) torch.save file cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(corrupt.format(path=path, error=type(e).__name__, detail=first_line(e))) from None
    except Exception as e:  # pickle.UnpicklingError for anything outside the weights-only allowlist
        # name the class the file wanted to import (torch's message says it further down)
        m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global '([\w.]+)'", str(e))
        detail = f"it references {m.group(1)}" if m else first_line(e)
        raise CheckpointError(unsafe.format(path=path, error=type(e).__name__, detail=detail)) from None


def is_export_dir(path: str | os.PathLike) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / EXPORT_META).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .ckpt file; a run directory (its checkpoints/last.ckpt); or a directory that is itself a model:
    an exported microgpt directory (microgpt.json) or a local HF GPT-2 / Llama / Qwen2 / Mistral directory
    (config.json); `hf:NAME` fetches one from the hub (network access needed, or the hub cache)."""
    from microgpt.io.hf import HUB_PREFIX, fetch_hub

    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        return fetch_hub(path)
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        if any(probe(p) for _, probe, _ in FORMATS if _ != "ckpt"):
            return p
        if quantized_artifact(p) is not None:
            raise CheckpointError(
                f"{p} is an exported quantized model: `microgpt.load` and `python -m microgpt.report` read it, "
                "training and conversion need float weights; pass the checkpoint it was exported from "
                f"(its {EXPORT_MANIFEST} records it as source)"
            )
        raise CheckpointError(
            f"no checkpoint in directory {p} (looked for checkpoints/last.ckpt, an exported {EXPORT_META} "
            "and an HF config.json); pass a .ckpt file, a run directory or a model directory"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; pass the path of a .ckpt file from a run's checkpoints/")
    return p


def read_export_dir(path: str | os.PathLike) -> dict[str, Any]:
    """A directory written by `microgpt.export format=safetensors|int8`, as a checkpoint dict.

    int8 tensors are dequantized here (w = q * scale per output row), so the state_dict is a plain float one;
    the int8 tensors themselves come along as ckpt["int8"] = {name: (q, scale)} for `load` to run them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    try:
        meta = json.loads((p / EXPORT_META).read_text(encoding="utf-8"))
        weights = p / meta["weights"]
        model_cfg, tok = meta["model"], meta["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{p / EXPORT_META} is damaged ({type(e).__name__}: {e}); export the model again"
        ) from None
    if not weights.is_file():
        raise CheckpointError(f"exported directory {p} lacks its weights file {weights.name}; export the model again")
    try:
        sd = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = first_line(e)
        raise CheckpointError(
            f"weights file {weights} is truncated or corrupt ({first}); export the model again"
        ) from None
    quant = meta.get("quantization") or {}
    int8 = {}  # name -> (int8 q, float32 scale): what `load` hands to the int8 modules (microgpt.inference)
    for name in quant.get("tensors", []):
        q, scale = sd.get(name), sd.pop(f"{name}.scale", None)
        if q is None or scale is None or q.dtype != torch.int8:
            raise CheckpointError(f"{weights} lacks the int8 tensor {name} or its scale; export the model again")
        int8[name] = (q, scale.to(torch.float32))
        sd[name] = q.to(torch.float32) * scale.to(torch.float32)[:, None]
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    hp = {"model": model_cfg, "tokenizer": tok, "plugins": meta.get("plugins") or {}}
    return {
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "hyper_parameters": hp,
        "source": {"export": str(p)},
        **({"int8": int8} if int8 else {}),
    }


def read_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint is data, never code to execute.

    A LoRA adapter (its directory, adapter.safetensors or adapter.json) comes back merged with its base
    model (`base`, or the one it recorded) as the adapted model's checkpoint.

    Model directories (exported, or HF GPT-2 / Llama family) come back in the same shape: {"state_dict": {"model.*": ...},
    "hyper_parameters": {"model", "tokenizer", "plugins"}}, so every caller (load, distill's teacher)
    takes them as they are.
    """
    meta = adapter_meta(path)
    if meta is not None:
        return read_adapter(meta, base)
    p = resolve_checkpoint(path)
    for _name, probe, reader in FORMATS:
        if probe(p):
            return reader(p)
    raise CheckpointError(f"{p} is not a checkpoint microgpt can read; pass a .ckpt file or a model directory")


def read_ckpt_file(p: Path) -> dict[str, Any]:
    """A .ckpt written by train.py (Lightning's checkpoint dict)."""
    if p.name == "quantized.pt" or p.name.endswith(".quantized.pt"):
        raise CheckpointError(quantized_refusal(p))
    ckpt = safe_load(
        p,
        corrupt="checkpoint {path} is corrupt or not a microgpt checkpoint ({detail}); retrain or pick another file",
        unsafe="checkpoint {path} cannot be loaded safely ({error}); it may hold arbitrary code",
    )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"{p} is not a microgpt checkpoint (no model config or state_dict); pass a .ckpt written by train.py"
        )
    return ckpt


def quantized_refusal(path: str | os.PathLike) -> str:
    """What to say when a qat artifact (quantized.pt) is given where a checkpoint is read."""
    run = Path(path).parent.parent if Path(path).parent.name == "checkpoints" else Path(path).parent
    return (
        f"{path} is a plugin's quantized artifact: `microgpt.load` and `python -m microgpt.report` read it, training "
        f"and conversion do not; pass the run's checkpoint instead (ckpt={run})"
    )


def quantized_artifact(path: str | os.PathLike) -> Path | None:
    """A plugin's quantized artifact given as the file itself or as the export directory whose manifest names
    it (`python -m microgpt.export format=int8|int4` of a model trained to be quantized); else None."""
    if isinstance(path, str) and path.startswith("hf:"):
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        try:
            name = json.loads((p / EXPORT_MANIFEST).read_text(encoding="utf-8")).get("artifact")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(name, str) or not name:
            return None
        if not (p / name).is_file():
            raise CheckpointError(f"exported directory {p} lacks its quantized artifact {name}; export the model again")
        return p / name
    if not p.is_file() or p.suffix == ".ckpt":
        return None
    from microgpt.plugins import artifact_reader

    reader = artifact_reader(p)
    if reader is None:
        return None
    artifact = reader.QUANTIZED_ARTIFACT
    return p if p.name == artifact or p.name.endswith("." + artifact) else None


def _gguf_file(p: Path) -> Path | None:
    if p.is_dir() and not (p / EXPORT_META).is_file() and not (p / "config.json").is_file():
        return p / GGUF_FILE if (p / GGUF_FILE).is_file() else None
    return p if p.is_file() and p.suffix == ".gguf" else None


def is_gguf(p: Path) -> bool:
    return _gguf_file(p) is not None


def read_gguf(p: Path) -> dict[str, Any]:
    """A GGUF written by `microgpt.export format=gguf` (llama.cpp's gpt2 tensors + microgpt's config and
    tokenizer records), as a checkpoint dict; float16 matrices come back as float32."""
    from microgpt.io.export import gguf_state_dict

    return gguf_state_dict(_gguf_file(p))


def _is_onnx_dir(p: Path) -> bool:
    from microgpt.io.onnx import is_onnx_dir

    return is_onnx_dir(p)


def _refuse_onnx_dir(p: Path) -> dict[str, Any]:
    from microgpt.io.onnx import refuse_onnx_dir

    return refuse_onnx_dir(p)


def _is_hf_dir(p: Path) -> bool:
    from microgpt.io.hf import is_hf_dir

    return is_hf_dir(p)


def _read_hf_dir(p: Path) -> dict[str, Any]:
    from microgpt.io.hf import hf_dir_checkpoint

    return hf_dir_checkpoint(p)


# What a model path can be, probed in this order: (name, probe(path), reader(path) -> checkpoint dict). Every
# reader returns the same shape: {"state_dict": {"model.*": ...}, "hyper_parameters": {"model", "tokenizer",
# "plugins"}}. (Sharded FSDP/DeepSpeed directories are io/consolidate.py's: train resumes them, and
# `python -m microgpt.consolidate` turns them into a .ckpt.)
FORMATS: list[tuple[str, Callable[[Path], bool], Callable[[Path], dict[str, Any]]]] = [
    ("onnx", _is_onnx_dir, _refuse_onnx_dir),  # format=onnx: a graph for onnxruntime (load() runs it), no weights
    ("export", is_export_dir, read_export_dir),  # python -m microgpt.export: safetensors / int8 + microgpt.json
    ("hf", _is_hf_dir, _read_hf_dir),  # a Hugging Face model directory (config.json + weights)
    ("gguf", is_gguf, read_gguf),  # python -m microgpt.export format=gguf: model.gguf (or a .gguf file)
    ("ckpt", Path.is_file, read_ckpt_file),  # a Lightning checkpoint written by train.py
]


def import_recorded_plugins(hparams: dict[str, Any]) -> None:
    """Import the plugins a checkpoint was trained with: they may register its components/converters.

    By name only, from the user's own plugin path ($MICROGPT_PLUGIN_PATH, ./plugins, the shipped ones):
    a checkpoint never chooses which code runs. The folder it recorded only goes into the error message.
    """
    plugins = hparams.get("plugins") or {}
    if not plugins:
        return
    from microgpt.plugins import load_plugin, plugin_dirs

    for name, where in plugins.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise CheckpointError(f"checkpoint records an invalid plugin name {name!r}; the file is damaged or forged")
        try:
            load_plugin(name)
        except ConfigError:
            recorded = f" (recorded at {where})" if where else ""
            raise CheckpointError(
                f"the checkpoint needs plugin '{name}'{recorded}, which is not on this plugin path "
                f"({os.pathsep.join(plugin_dirs())}); if you trust that code, set MICROGPT_PLUGIN_PATH to the "
                f"folder that holds {name}/"
            ) from None


def model_from_checkpoint(ckpt: dict[str, Any]) -> GPT:
    hp = ckpt["hyper_parameters"]
    import_recorded_plugins(hp)
    prefix = "model."
    sd = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    # the config is checked against the tensors before anything is allocated, then the model is built on
    # `meta` and takes the checkpoint's tensors (microgpt.safety)
    from microgpt.safety import build_model_from_weights

    return build_model_from_weights(GPTConfig.from_dict(dict(hp["model"])), sd)


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    base: str | os.PathLike | None = None,
    dequantize: bool = False,
):
    """`model, tokenizer = microgpt.load(path)`: the GPT in eval mode and its tokenizer.

    path: a .ckpt, a run directory, an exported directory (every `microgpt.export` format), a local HF GPT-2
    directory, or a LoRA adapter (directory / adapter.safetensors) applied to `base` (default: the base it
    recorded). A plugin's quantized artifact (a `format=int8|int4` export of a model trained to be quantized,
    or the file itself) comes back as the quantized model its plugin's `load_quantized` builds. A plain
    `format=int8` export comes back with int8 Linear layers running the x86 int8 kernel on the CPU
    (microgpt.inference.Int8Linear); `dequantize=True`, another device or a torch without that kernel give
    the float model with the dequantized weights instead; an ONNX export comes back as
    an `OnnxGPT` (io/onnx.py) running in onnxruntime.
    """
    from microgpt.data.tokenizers import tokenizer_from_dict

    if not (isinstance(path, str) and path.startswith("hf:")) and _is_onnx_dir(Path(path).expanduser()):
        from microgpt.io.onnx import load_onnx

        return load_onnx(Path(path).expanduser(), map_location)  # a model over an onnxruntime session
    artifact = quantized_artifact(path)
    if artifact is not None:
        from microgpt.plugins import artifact_reader

        model, tok = artifact_reader(artifact).load_quantized(artifact)
        if tok is None:
            raise CheckpointError(f"{artifact} holds no tokenizer; export a checkpoint written by train.py")
        if str(map_location) != "cpu":
            model = model.to(map_location)
        return model.eval(), tok
    ckpt = read_checkpoint(path, base)
    model = model_from_checkpoint(ckpt).to(map_location).eval()
    if ckpt.get("int8") and not dequantize and torch.device(map_location).type == "cpu":
        from microgpt.inference import int8_kernel_available, quantize_int8

        if int8_kernel_available():
            model = quantize_int8(model, ckpt["int8"])
    tok = ckpt["hyper_parameters"].get("tokenizer")
    if tok is None:
        raise CheckpointError(f"checkpoint {path} has no tokenizer; it was not written by microgpt's train.py")
    return model, tokenizer_from_dict(tok)
