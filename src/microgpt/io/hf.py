"""Hugging Face model directories <-> microgpt, with no `transformers` import.

Loading a local directory (`config.json` + `model.safetensors` or `pytorch_model.bin`, the layout of
the hub and of `save_pretrained`) maps its weights onto microgpt's components. Two families:

GPT-2 (model_type gpt2: gpt2, distilgpt2, ...):

    GPT-2 (HF)                        microgpt
    wte, wpe                          wte, pos.wpe                 (learned positions)
    h.i.ln_1, h.i.ln_2, ln_f          blocks.i.norm1, norm2, norm_f (LayerNorm with bias)
    h.i.attn.c_attn  [q | k | v]      blocks.i.attn.qkv             (same row order after transposing)
    h.i.attn.c_proj                   blocks.i.attn.proj
    h.i.mlp.c_fc, h.i.mlp.c_proj      blocks.i.mlp.fc, mlp.proj     (GELU, tanh approximation)
    lm_head (tied to wte)             no module: the head reads wte.weight

GPT-2 stores its projections as `Conv1D` weights of shape (in, out); nn.Linear's are (out, in), so
every projection is transposed on the way in and on the way out.

Llama family (model_type llama: SmolLM/SmolLM2, TinyLlama; qwen2: Qwen2/2.5; mistral): position=rope,
norm=rmsnorm, mlp=swiglu, attention mha/gqa/mqa (Mistral's sliding_window -> attention=sliding):

    Llama (HF)                                    microgpt
    model.embed_tokens                            wte
    model.layers.i.input_layernorm                blocks.i.norm1             (RMSNorm, rms_norm_eps)
    model.layers.i.self_attn.{q,k,v}_proj         blocks.i.attn.qkv          (rows stacked [q | k | v])
    model.layers.i.self_attn.o_proj               blocks.i.attn.proj
    model.layers.i.post_attention_layernorm       blocks.i.norm2
    model.layers.i.mlp.{gate,up,down}_proj        blocks.i.mlp.{gate,fc,proj}
    model.norm, lm_head (or tied)                 norm_f, lm_head (or none: tie_embeddings)

HF's q/k rows are already in the "rotate halves" order microgpt's RoPE uses, so no permutation is
needed. Weights are read with safetensors, or with `torch.load(weights_only=True)`: a pickle is never
executed.
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
    "LLAMA_FAMILY",
    "gpt2_blockers",
    "gpt_config_from_hf",
    "hf_export_arch",
    "llama_blockers",
    "llama_config_from_hf",
    "llama_config_dict",
    "state_dict_from_llama",
    "state_dict_to_llama",
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
_HUB_FILES = [
    "config.json",
    "*.safetensors",
    SAFETENSORS_INDEX,
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]


def fetch_hub(spec: str) -> Path:
    """`hf:gpt2`, `hf:HuggingFaceTB/SmolLM2-135M` (or `hf:org/name@revision`) -> a local snapshot directory
    with weights, tokenizer and chat template.

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
            f"access download the model elsewhere and pass its local directory instead (e.g. init_from=/path/to/{repo.split('/')[-1]})"
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
    """An HF config.json (GPT-2 or Llama family) -> GPTConfig; a CheckpointError naming what microgpt lacks."""
    p = Path(path)
    model_type = hf.get("model_type")
    if model_type in LLAMA_FAMILY:
        return llama_config_from_hf(hf, p)
    if model_type != "gpt2":
        arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        detail = ""
        try:
            bad = _unexpected(read_hf_weights(p, names_only=True), None)  # type: ignore[arg-type]
            detail = f": unexpected keys {_describe(bad)}" if bad else ""
        except CheckpointError:
            pass
        known = ", ".join(f"{t} ({a})" for t, a in {"gpt2": "GPT2LMHeadModel", **LLAMA_FAMILY}.items())
        raise CheckpointError(
            f"HF directory {p} holds a '{model_type}' model ({arch}), an architecture microgpt does not load{detail}; "
            f"supported model_type: {known}"
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
    if tok.special_tokens or tok.chat_template:  # a pretrained tokenizer: give its settings back as they were
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            **tok.special_tokens,
        }
        if tok.chat_template:
            tcfg["chat_template"] = tok.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
        return [*written, "tokenizer_config.json"]
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
    """An HF GPT-2 / Llama-family directory in the shape of a microgpt checkpoint (what read_checkpoint returns)."""
    p = Path(path).expanduser()
    hf = read_hf_config(p)
    cfg = gpt_config_from_hf(hf, p)
    weights = read_hf_weights(p)
    if hf.get("model_type") in LLAMA_FAMILY:
        sd = state_dict_from_llama(weights, cfg, p)  # type: ignore[arg-type]
    else:
        sd = state_dict_from_hf(weights, cfg, p)  # type: ignore[arg-type]
    hp: dict[str, Any] = {"model": cfg.to_dict(), "plugins": {}}
    if tokenizer:
        hp["tokenizer"] = load_hf_tokenizer(p, cfg.vocab_size).to_dict()
    return {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": hp, "source": {"hf": str(p)}}


# ---- the other way: microgpt -> GPT-2 ------------------------------------------------------------------


def _common_blockers(cfg: GPTConfig) -> list[str]:
    """What neither GPT-2 nor the Llama family has (llama.cpp's gpt2 graph neither: format=gguf uses these too)."""
    out = []
    if cfg.qk_norm:
        out.append("qk_norm (queries and keys are not normalised there)")
    if cfg.logit_softcap is not None:
        out.append(f"logit_softcap={cfg.logit_softcap} (the logits are not capped there)")
    if cfg.n_unique_layers is not None and cfg.n_unique_layers != cfg.n_layer:
        out.append(f"cross-layer sharing (n_unique_layers={cfg.n_unique_layers} of n_layer={cfg.n_layer})")
    if cfg.converters:
        names = ", ".join(str(c.get("name")) for c in cfg.converters)
        out.append(f"converted modules ({names}); export the model before conversion")
    return out


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
    return out + _common_blockers(cfg)


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


# ---- the Llama family: Llama, Qwen2, Mistral -----------------------------------------------------------

# model_type -> the architecture class transformers builds for it
LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SILU = ("silu", "swish")
ROPE_TYPES = ("default", "linear", "llama3")  # microgpt's rope_inv_freq implements these
# per-layer Llama weights: HF name -> microgpt name (q/k/v are stacked into attn.qkv separately)
_LLAMA_LAYER = {
    "input_layernorm.weight": "norm1.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "self_attn.o_proj.bias": "attn.proj.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.gate_proj.bias": "mlp.gate.bias",
    "mlp.up_proj.weight": "mlp.fc.weight",
    "mlp.up_proj.bias": "mlp.fc.bias",
    "mlp.down_proj.weight": "mlp.proj.weight",
    "mlp.down_proj.bias": "mlp.proj.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_LLAMA_SKIP = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old checkpoints saved RoPE's derived buffer


def _rope_from_hf(hf: dict[str, Any], p: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config.json layout: transformers 5's `rope_parameters`
    ({"rope_type", "rope_theta", ...}) or the older top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"HF config in {p} has per-layer-type RoPE parameters, which microgpt does not implement")
    d = {**(hf.get("rope_scaling") or {}), **params}
    kind = d.get("rope_type", d.get("type", "default"))
    theta = float(d.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"HF config in {p} uses rope scaling type {kind!r}, which microgpt does not implement "
            f"(it implements {', '.join(ROPE_TYPES)})"
        )
    partial = d.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(
            f"HF config in {p} rotates part of each head (partial_rotary_factor={partial}); microgpt rotates whole heads"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(d["factor"])}
    return theta, {
        "rope_type": "llama3",
        "factor": float(d["factor"]),
        "low_freq_factor": float(d["low_freq_factor"]),
        "high_freq_factor": float(d["high_freq_factor"]),
        "original_max_position_embeddings": int(
            d.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        ),
    }


def llama_config_from_hf(hf: dict[str, Any], path: str | os.PathLike = "") -> GPTConfig:
    """A Llama / Qwen2 / Mistral config.json -> GPTConfig; a CheckpointError naming what microgpt lacks."""
    p = Path(path)
    kind = hf.get("model_type")
    blockers = []
    act = hf.get("hidden_act", "silu")
    if act not in SILU:
        blockers.append(f"hidden_act={act!r} (microgpt's swiglu gates with silu)")
    layer_types = set(hf.get("layer_types") or [])
    window = None
    if kind == "mistral":
        window = hf.get("sliding_window")
    elif hf.get("use_sliding_window") or "sliding_attention" in layer_types:
        blockers.append("use_sliding_window=true (a per-layer sliding window; microgpt slides on every layer or none)")
    if layer_types - {"full_attention", "sliding_attention"}:
        blockers.append(f"layer_types {sorted(layer_types)}")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if kind == "qwen2":
        bias, qkv_bias = False, True  # Qwen2: biases on q, k, v; none on o_proj or the MLP
    elif attn_bias != mlp_bias:
        blockers.append(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (microgpt has both or neither)")
        bias, qkv_bias = False, None
    else:
        bias, qkv_bias = attn_bias, None
    if kind == "mistral" and window is not None and bias:
        blockers.append("attention_bias=true with a sliding window")
    if blockers:
        raise CheckpointError(f"HF {kind} in {p} uses features microgpt does not implement: {'; '.join(blockers)}")
    try:
        theta, scaling = _rope_from_hf(hf, p)
        n_head = int(hf["num_attention_heads"])
        n_kv = int(hf.get("num_key_value_heads") or n_head)
        attention = "sliding" if window is not None else ("mha" if n_kv == n_head else "gqa")
        cfg = GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("max_position_embeddings", 2048)),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=n_kv,
            n_embd=int(hf["hidden_size"]),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // n_head),
            mlp_hidden=int(hf["intermediate_size"]),
            dropout=0.0,  # inference; fine-tuning sets its own (model.dropout)
            bias=bias,
            qkv_bias=qkv_bias,
            attention=attention,
            window=int(window) if window is not None else None,
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="swiglu",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(
            f"{p / 'config.json'} lacks the {kind} setting {e}; the HF directory is damaged"
        ) from None
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{p / 'config.json'} holds an invalid {kind} config ({e})") from None
    return cfg


def _llama_strip(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def state_dict_from_llama(
    weights: dict[str, torch.Tensor], cfg: GPTConfig, path: str | os.PathLike = ""
) -> dict[str, torch.Tensor]:
    """Llama-family tensors -> a microgpt state dict (float32), checking names and shapes."""
    from microgpt.model import GPT

    sd = {_llama_strip(k): v for k, v in weights.items() if not _LLAMA_SKIP.search(k)}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some saves write the tied head out as well
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(hk: str, mk: str) -> None:
        if hk in sd:
            out[mk] = sd[hk]
            used.add(hk)

    take("embed_tokens.weight", "wte.weight")
    take("norm.weight", "norm_f.weight")
    take("lm_head.weight", "lm_head.weight")
    for i in range(cfg.n_layer):
        for hk, mk in _LLAMA_LAYER.items():
            take(f"layers.{i}.{hk}", f"blocks.{i}.{mk}")
        for part in ("weight", "bias"):
            names = [f"layers.{i}.self_attn.{proj}.{part}" for proj in _QKV]
            if all(n in sd for n in names):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([sd[n] for n in names], dim=0)
                used.update(names)
    bad = sorted(set(sd) - used)
    if bad:
        raise CheckpointError(
            f"HF directory {path} has weights a {cfg.n_layer}-layer Llama-family model does not use: unexpected keys "
            f"{_describe(bad)}; its config.json does not match its weights"
        )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise CheckpointError(f"HF directory {path} lacks weights its config.json needs: missing {_describe(missing)}")
    wrong = [f"{k} {tuple(out[k].shape)} (expected {shapes[k]})" for k in shapes if tuple(out[k].shape) != shapes[k]]
    if wrong:
        raise CheckpointError(f"HF weights in {path} do not match their config.json: {_describe(wrong, 3)}")
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def llama_blockers(cfg: GPTConfig) -> list[str]:
    """What in this model the Llama family (Llama, Qwen2, Mistral) cannot represent (empty: exportable)."""
    out = []
    if cfg.position != "rope":
        out.append(f"position={cfg.position} (Llama uses rope)")
    if cfg.norm != "rmsnorm":
        out.append(f"norm={cfg.norm} (Llama uses rmsnorm)")
    if cfg.mlp != "swiglu":
        out.append(f"mlp={cfg.mlp} (Llama uses swiglu)")
    if cfg.attention not in ("mha", "gqa", "mqa", "sliding"):
        out.append(f"attention={cfg.attention} (a plugin's attention)")
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    if cfg.bias and not qkv_bias:
        out.append("bias=true with qkv_bias=false (Llama's attention_bias covers q, k, v and o together)")
    if cfg.attention == "sliding" and qkv_bias:
        out.append("attention=sliding with biases (Mistral has none)")
    if cfg.n_embd % cfg.n_head:
        out.append(f"n_embd={cfg.n_embd} not divisible by n_head={cfg.n_head} (transformers requires it)")
    return out + _common_blockers(cfg)


def hf_export_arch(cfg: GPTConfig) -> str:
    """The transformers model_type that holds this model exactly (gpt2, llama, qwen2, mistral), else a
    CheckpointError naming what neither family can represent."""
    gpt2 = gpt2_blockers(cfg)
    if not gpt2:
        return "gpt2"
    llama = llama_blockers(cfg)
    if not llama:
        if cfg.attention == "sliding":
            return "mistral"
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    raise CheckpointError(
        "format=hf writes GPT-2 or Llama-family architectures, which cannot represent this model: "
        f"as GPT-2: {'; '.join(gpt2)}; as Llama: {'; '.join(llama)}; use format=safetensors or format=int8"
    )


def state_dict_to_llama(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A microgpt state dict -> LlamaForCausalLM's (also Qwen2's and Mistral's) tensor names."""
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    for i in range(cfg.n_layer):
        for hk, mk in _LLAMA_LAYER.items():
            if f"blocks.{i}.{mk}" in sd:
                out[f"model.layers.{i}.{hk}"] = sd[f"blocks.{i}.{mk}"]
        for part in ("weight", "bias"):
            t = sd.get(f"blocks.{i}.attn.qkv.{part}")
            if t is not None:
                for proj, chunk in zip(_QKV, t.split(sizes, dim=0), strict=True):
                    out[f"model.layers.{i}.self_attn.{proj}.{part}"] = chunk
    return {k: v.contiguous() for k, v in out.items()}


def llama_config_dict(cfg: GPTConfig, tok, dtype: str = "float32") -> dict[str, Any]:
    """config.json for the model_type hf_export_arch picks, readable by transformers 4.x and 5.x."""
    kind = hf_export_arch(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
    d: dict[str, Any] = {
        "architectures": [LLAMA_FAMILY[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads these two ...
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "rope_parameters": rope,  # ... and 5.x this one
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if kind == "llama":
        d.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif kind == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        d.update(sliding_window=cfg.window)
    return d
