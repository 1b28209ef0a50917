"""Hugging Face GPT-2 directories <-> microgpt, with no `transformers` import.

Loading a local directory (`config.json` + `model.safetensors` or `pytorch_model.bin`, the layout of
`gpt2`, `distilgpt2`, ... and of `save_pretrained`) maps GPT-2's weights onto microgpt's components:

    GPT-2 (HF)                        microgpt
    wte, wpe                          wte, pos.wpe                 (learned positions)
    h.i.ln_1, h.i.ln_2, ln_f          blocks.i.norm1, norm2, norm_f (LayerNorm with bias)
    h.i.attn.c_attn  [q | k | v]      blocks.i.attn.qkv             (same row order after transposing)
    h.i.attn.c_proj                   blocks.i.attn.proj
    h.i.mlp.c_fc, h.i.mlp.c_proj      blocks.i.mlp.fc, mlp.proj     (GELU, tanh approximation)
    lm_head (tied to wte)             no module: the head reads wte.weight

GPT-2 stores its projections as `Conv1D` weights of shape (in, out); nn.Linear's are (out, in), so
every projection is transposed on the way in and on the way out. Weights are read with safetensors,
or with `torch.load(weights_only=True)`: a pickle is never executed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError, first_line

__all__ = [
    "HF_TOKENIZER_FILES",
    "gpt2_blockers",
    "gpt_config_from_hf",
    "hf_config_dict",
    "hf_dir_checkpoint",
    "fetch_hub",
    "is_hf_dir",
    "load_hf_tokenizer",
    "read_hf_weights",
    "save_hf_tokenizer",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
MICROGPT_TOKENIZER = "microgpt_tokenizer.json"  # written by `export format=hf` for char/byte tokenizers
# GELU with the tanh approximation, under its HF names (all the same function as microgpt's gelu_tanh MLP)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# HF activation_function -> microgpt MLP name, and back for export
HF_ACTIVATIONS = {**dict.fromkeys(TANH_GELU, "gelu_tanh"), "gelu": "gelu"}
MLP_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# old HF checkpoints saved the causal-mask buffers of each attention layer: not weights
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# per-layer GPT-2 weights: HF name -> (microgpt name, is a Conv1D weight to transpose)
_LAYER = {
    "ln_1.weight": ("norm1.weight", False),
    "ln_1.bias": ("norm1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("norm2.weight", False),
    "ln_2.bias": ("norm2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True),
    "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True),
    "mlp.c_proj.bias": ("mlp.proj.bias", False),
}
_TOP = {
    "wte.weight": "wte.weight",
    "wpe.weight": "pos.wpe.weight",
    "ln_f.weight": "norm_f.weight",
    "ln_f.bias": "norm_f.bias",
}


# ---- the hub (optional: needs network access and huggingface_hub) ---------------------------------------


HUB_PREFIX = "hf:"
_HUB_FILES = ["config.json", "*.safetensors", SAFETENSORS_INDEX, "vocab.json", "merges.txt", "tokenizer.json"]


def fetch_hub(spec: str) -> Path:
    """`hf:gpt2` (or `hf:org/name@revision`) -> a local snapshot directory with weights and tokenizer.

    Uses huggingface_hub's cache (offline mode reads only what is cached); never pytorch_model.bin."""
    name = spec[len(HUB_PREFIX) :]
    repo, _, revision = name.partition("@")
    if not repo:
        raise CheckpointError(f"{spec!r} names no model; use hf:NAME, e.g. init_from=hf:gpt2")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{spec} needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, network error: all the same to the user
        first = first_line(e)
        raise CheckpointError(
            f"cannot fetch {spec} from the Hugging Face hub ({type(e).__name__}: {first}); without network "
            "access download the model elsewhere and pass its local directory"
        ) from None


# ---- reading a directory ------------------------------------------------------------------------------


def _weights_files(p: Path) -> list[Path]:
    if (p / SAFETENSORS).is_file():
        return [p / SAFETENSORS]
    if (p / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((p / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{p / SAFETENSORS_INDEX} is damaged ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise CheckpointError(f"HF directory {p} lacks the weight shards {missing} named in {SAFETENSORS_INDEX}")
        return [p / s for s in shards]
    if (p / PYTORCH_BIN).is_file():
        return [p / PYTORCH_BIN]
    return []


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with an HF `config.json` (weights are checked when it is loaded)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {p / 'config.json'} ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON ({e}); the HF directory is damaged") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p / 'config.json'} is not a JSON object; the HF directory is damaged")
    return cfg


def _read_safetensors(f: Path, names_only: bool) -> dict[str, torch.Tensor] | list[str]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if names_only:
            with safe_open(str(f), framework="pt") as h:
                return list(h.keys())
        return load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = first_line(e)
        raise CheckpointError(
            f"weights file {f} is truncated or corrupt ({first}); download or export it again"
        ) from None


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    from microgpt.io.checkpoint import safe_load

    sd = safe_load(
        f,
        corrupt="weights file {path} is truncated or corrupt ({detail}); download or export it again",
        unsafe="weights file {path} cannot be loaded safely ({error}); it may hold arbitrary code",
    )
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f} does not hold a state dict of tensors; it is not an HF weights file")
    return sd


def read_hf_weights(path: str | os.PathLike, names_only: bool = False) -> dict[str, torch.Tensor] | list[str]:
    """All tensors of an HF directory (safetensors preferred), or only their names."""
    p = Path(path).expanduser()
    files = _weights_files(p)
    if not files:
        raise CheckpointError(
            f"HF directory {p} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}); "
            "save the model with save_pretrained or pass another directory"
        )
    if files[0].suffix == ".bin":
        sd = _read_bin(files[0])
        return list(sd) if names_only else sd
    if names_only:
        return [k for f in files for k in _read_safetensors(f, True)]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(_read_safetensors(f, False))
    return out


def _strip(name: str) -> str:
    return name[len("transformer.") :] if name.startswith("transformer.") else name


def _gpt2_names(n_layer: int, untied: bool) -> set[str]:
    names = set(_TOP) | {f"h.{i}.{k}" for i in range(n_layer) for k in _LAYER}
    return names | {"lm_head.weight"} if untied else names


def _describe(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _unexpected(names: list[str], n_layer: int | None) -> list[str]:
    """Weight names that have no place in a GPT-2 LM (any depth when n_layer is unknown)."""
    out = []
    for raw in names:
        k = _strip(raw)
        if _BUFFERS.match(k) or k in _TOP or k == "lm_head.weight":
            continue
        m = re.match(r"^h\.(\d+)\.(.+)$", k)
        if m and m.group(2) in _LAYER and (n_layer is None or int(m.group(1)) < n_layer):
            continue
        out.append(raw)
    return out


def gpt_config_from_hf(hf: dict[str, Any], path: str | os.PathLike = "") -> GPTConfig:
    """GPT-2's config.json -> GPTConfig; a CheckpointError naming what GPT-2 feature microgpt lacks."""
    p = Path(path)
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        detail = ""
        try:
            bad = _unexpected(read_hf_weights(p, names_only=True), None)  # type: ignore[arg-type]
            detail = f": unexpected keys {_describe(bad)}" if bad else ""
        except CheckpointError:
            pass
        raise CheckpointError(
            f"HF directory {p} holds a '{model_type}' model ({arch}), not GPT-2{detail}; microgpt loads the GPT-2 "
            "layout (model_type gpt2: gpt2, distilgpt2, gpt2-medium, ...)"
        )
    act = hf.get("activation_function", "gelu_new")
    blockers = []
    if act not in HF_ACTIVATIONS:
        blockers.append(f"activation_function={act!r} (microgpt's GELU MLPs take {tuple(HF_ACTIVATIONS)})")
    if hf.get("add_cross_attention"):
        blockers.append("add_cross_attention=true (an encoder-decoder GPT-2)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        blockers.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("scale_attn_weights", True) is False:
        blockers.append("scale_attn_weights=false")
    if blockers:
        raise CheckpointError(f"HF GPT-2 in {p} uses features microgpt does not implement: {'; '.join(blockers)}")
    try:
        n_embd = int(hf["n_embd"])
        cfg = GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=n_embd,
            mlp_hidden=int(hf["n_inner"]) if hf.get("n_inner") not in (None, 4 * n_embd) else None,
            dropout=0.0,  # inference; fine-tuning sets its own (model.dropout)
            bias=True,
            attention="mha",
            position="learned",
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp=HF_ACTIVATIONS.get(act, "gelu_tanh"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise CheckpointError(f"{p / 'config.json'} lacks the GPT-2 setting {e}; the HF directory is damaged") from None
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{p / 'config.json'} holds an invalid GPT-2 config ({e})") from None
    return cfg


def state_dict_from_hf(
    weights: dict[str, torch.Tensor], cfg: GPTConfig, path: str | os.PathLike = ""
) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> a microgpt state dict (float32), checking names and shapes."""
    from microgpt.model import GPT

    sd = {_strip(k): v for k, v in weights.items() if not _BUFFERS.match(_strip(k))}
    bad = _unexpected(list(sd), cfg.n_layer)
    if bad:
        raise CheckpointError(
            f"HF directory {path} has weights GPT-2 with n_layer={cfg.n_layer} does not use: unexpected keys "
            f"{_describe(bad)}; it is another architecture or its config.json does not match its weights"
        )
    need = _gpt2_names(cfg.n_layer, untied=not cfg.tie_embeddings)
    missing = sorted(need - set(sd))
    if missing:
        raise CheckpointError(f"HF directory {path} lacks GPT-2 weights: missing keys {_describe(missing)}")
    out: dict[str, torch.Tensor] = {}
    for hk, mk in _TOP.items():
        out[mk] = sd[hk]
    for i in range(cfg.n_layer):
        for hk, (mk, conv) in _LAYER.items():
            t = sd[f"h.{i}.{hk}"]
            out[f"blocks.{i}.{mk}"] = t.t() if conv and t.dim() == 2 else t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    wrong = [f"{k} {tuple(out[k].shape)} (expected {shapes[k]})" for k in shapes if tuple(out[k].shape) != shapes[k]]
    if wrong:
        raise CheckpointError(f"HF weights in {path} do not match their config.json: {_describe(wrong, 3)}")
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


# ---- tokenizer -----------------------------------------------------------------------------------------


def load_hf_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """The tokenizer of an HF directory: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
    from microgpt.data.tokenizers import HFTokenizer, tokenizer_from_dict

    p = Path(path).expanduser()
    has = {f: (p / f).is_file() for f in (*HF_TOKENIZER_FILES, MICROGPT_TOKENIZER)}
    try:
        if has["tokenizer.json"] or (has["vocab.json"] and has["merges.txt"]):
            tok = HFTokenizer.from_dir(p)
        elif has["vocab.json"] or has["merges.txt"]:
            present, absent = ("vocab.json", "merges.txt") if has["vocab.json"] else ("merges.txt", "vocab.json")
            raise CheckpointError(
                f"HF directory {p} has {present} but no {absent}; a GPT-2 BPE tokenizer needs both (or tokenizer.json)"
            )
        elif has[MICROGPT_TOKENIZER]:
            tok = tokenizer_from_dict(json.loads((p / MICROGPT_TOKENIZER).read_text(encoding="utf-8")))
        else:
            raise CheckpointError(
                f"HF directory {p} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); copy the base "
                "model's tokenizer files next to its config.json"
            )
    except CheckpointError:
        raise
    except Exception as e:  # a JSON error from tokenizers, a malformed merges line, ...
        first = first_line(e)
        raise CheckpointError(f"the tokenizer files in {p} are damaged ({type(e).__name__}: {first})") from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {p} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}: the "
            "tokenizer files do not belong to this model"
        )
    return tok


def _tokenizer_backend(tok) -> Any | None:
    """The HF `tokenizers.Tokenizer` behind a microgpt tokenizer (bpe / hf), else None (char / byte)."""
    return getattr(tok, "tok", None)


def save_hf_tokenizer(tok, out: Path, model_max_length: int) -> list[str]:
    """Write the tokenizer files transformers reads; char/byte tokenizers only get microgpt's own record."""
    backend = _tokenizer_backend(tok)
    if backend is None:
        (out / MICROGPT_TOKENIZER).write_text(json.dumps(tok.to_dict()), encoding="utf-8")
        return [MICROGPT_TOKENIZER]
    backend.save(str(out / "tokenizer.json"))
    written = ["tokenizer.json"]
    model_kind = type(backend.model).__name__
    eot = backend.token_to_id("<|endoftext|>")
    tcfg: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer" if model_kind == "BPE" else "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if eot is not None:
        tcfg.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if model_kind == "BPE":
        backend.model.save(str(out))  # vocab.json + merges.txt: GPT-2's own tokenizer format
        written += ["vocab.json", "merges.txt"]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
    return [*written, "tokenizer_config.json"]


# ---- whole directories ---------------------------------------------------------------------------------


def hf_dir_checkpoint(path: str | os.PathLike, tokenizer: bool = True) -> dict[str, Any]:
    """An HF GPT-2 directory in the shape of a microgpt checkpoint (what read_checkpoint returns)."""
    p = Path(path).expanduser()
    cfg = gpt_config_from_hf(read_hf_config(p), p)
    sd = state_dict_from_hf(read_hf_weights(p), cfg, p)  # type: ignore[arg-type]
    hp: dict[str, Any] = {"model": cfg.to_dict(), "plugins": {}}
    if tokenizer:
        hp["tokenizer"] = load_hf_tokenizer(p, cfg.vocab_size).to_dict()
    return {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": hp, "source": {"hf": str(p)}}


# ---- the other way: microgpt -> GPT-2 ------------------------------------------------------------------


def gpt2_blockers(cfg: GPTConfig) -> list[str]:
    """What in this model GPT-2's architecture cannot represent (empty: exportable exactly)."""
    out = []
    if cfg.position != "learned":
        out.append(f"position={cfg.position} (GPT-2 has learned absolute positions)")
    if cfg.norm != "layernorm":
        out.append(f"norm={cfg.norm} (GPT-2 uses LayerNorm)")
    if cfg.mlp not in MLP_TO_HF:
        out.append(f"mlp={cfg.mlp} (GPT-2 has a 2-matrix GELU MLP: gelu or gelu_tanh)")
    if cfg.attention not in ("mha", "gqa", "mqa", "sliding"):
        out.append(f"attention={cfg.attention} (a plugin's attention; GPT-2 has plain multi-head attention)")
    elif cfg.attention == "sliding":
        out.append(f"attention=sliding (window {cfg.window}; GPT-2 attends to every earlier position)")
    elif cfg.n_kv_head != cfg.n_head:
        out.append(
            f"attention={cfg.attention} with n_kv_head={cfg.n_kv_head} < n_head={cfg.n_head} (GPT-2 has one key/value head per query head)"
        )
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        out.append(f"head_dim={cfg.head_dim} x n_head={cfg.n_head} != n_embd={cfg.n_embd} (pruned heads)")
    if cfg.n_unique_layers is not None and cfg.n_unique_layers != cfg.n_layer:
        out.append(f"cross-layer sharing (n_unique_layers={cfg.n_unique_layers} of n_layer={cfg.n_layer})")
    if cfg.converters:
        names = ", ".join(str(c.get("name")) for c in cfg.converters)
        out.append(f"converted modules ({names}); export the model before conversion")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A microgpt state dict -> GPT2LMHeadModel's (Conv1D weights transposed, absent biases as zeros)."""
    out: dict[str, torch.Tensor] = {}
    for hk, mk in _TOP.items():
        if mk in sd:
            out[f"transformer.{hk}"] = sd[mk]
    out["transformer.ln_f.bias"] = sd.get("norm_f.bias", torch.zeros(cfg.n_embd))
    for i in range(cfg.n_layer):
        for hk, (mk, conv) in _LAYER.items():
            t = sd.get(f"blocks.{i}.{mk}")
            if t is None:  # bias=False: GPT-2 always has biases; zeros compute the same thing
                shape = sd[f"blocks.{i}.{mk[: -len('bias')]}weight"].shape[0]
                t = torch.zeros(shape, dtype=sd["wte.weight"].dtype)
            out[f"transformer.h.{i}.{hk}"] = t.t() if conv else t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_dict(cfg: GPTConfig, tok, dtype: str = "float32") -> dict[str, Any]:
    """config.json for GPT2LMHeadModel, written by hand (transformers is not a dependency)."""
    backend = _tokenizer_backend(tok)
    eot = backend.token_to_id("<|endoftext|>") if backend is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.hidden_dim if cfg.hidden_dim != 4 * cfg.n_embd else None,
        "activation_function": MLP_TO_HF.get(cfg.mlp, "gelu_new"),
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
