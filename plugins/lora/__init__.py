"""lora: parameter-efficient fine-tuning with low-rank adapters (LoRA) and, optionally, DoRA.

    python train.py experiment=finetune init_from=BASE data.path=my.txt +plugin=lora

LoRA (Hu et al. 2021) keeps a pretrained Linear's weight W frozen and learns a low-rank update:
    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank), B = 0 at start
DoRA (Liu et al. 2024) also learns a per-output-row magnitude m (initialised to ||W||_row):
    W' = m * (W + s B A) / ||W + s B A||_row       (the norm is treated as a constant for the gradient, as
                                                   the paper's section 4.3 recommends; the forward is exact)

Pieces:
- the converter `lora` (recorded in the model config's `converters`, so `microgpt.load` and resume rebuild
  it) replaces each chosen Linear inside the blocks by a `LoRALinear` holding the original as `.base`,
  and freezes every parameter except the adapters (and, on request, norms / biases / embeddings). A
  state-dict pre-hook maps a plain model's `...qkv.weight` onto `...qkv.base.weight`, so base weights
  (`init_from`, an HF GPT-2 directory) load into the adapted model as they are.
- the callback `LoRA` re-applies the freezing after every converter ran (a later `qat` converter swaps the
  base Linear for a fake-quantized one: QLoRA-style, frozen fake-quantized base, float adapters), prints
  the trainable share, and at the end of fit writes `checkpoints/adapter.safetensors` (the trainable tensors
  only) and `checkpoints/adapter.json` (the options, the model config, the base path and a sha256 of the
  base weights).
- `read_adapter(path, base=None)` rebuilds a checkpoint dict from an adapter and its base (checked by hash):
  `microgpt.load(adapter_dir_or_file, base=...)` goes through it.
- `merge(model)` folds the adapters into the base weights and returns a plain GPT (no `lora` converter);
  `python plugins/lora/merge.py ckpt=... out=DIR` writes it as an exported safetensors directory that
  `microgpt.load` and every `microgpt.export` format accept.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError
from microgpt.registry import CONVERTER

FORMAT = "microgpt-lora/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"  # same name as microgpt.checkpoint.ADAPTER_META
DEFAULT_TARGETS = ("qkv", "proj", "fc")

CONFLICTS = {
    "prune": "pruning masks and removes base weights that LoRA keeps frozen; merge the adapters first "
    "(python plugins/lora/merge.py) and prune the merged model",
    "share": "share rewrites the base blocks LoRA adapts; share (and train) first, then fine-tune that model with LoRA",
}


# ---- the adapted layer -----------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen Linear (`base`) plus a trainable low-rank update (and DoRA magnitude)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init; B = 0: starts as W
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dora = bool(dora)
        if self.dora:
            with torch.no_grad():
                self.lora_magnitude = nn.Parameter(w.detach().float().norm(dim=1).to(w.dtype))
        self.register_load_state_dict_pre_hook(self._plain_keys_to_base)

    def delta(self) -> torch.Tensor:
        """s * B A: the low-rank update of the weight, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _dora_scale(self) -> torch.Tensor:
        w = self.base.weight + self.delta()
        return self.lora_magnitude / w.norm(dim=1).detach()  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # the (possibly fake-quantized) frozen layer, bias included
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        if not self.dora:
            return y + lora
        bias = self.base.bias
        if bias is not None:
            y = y - bias
        y = (y + lora) * self._dora_scale()
        return y + bias if bias is not None else y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight.detach() + self.delta()
        if self.dora:
            w = w * self._dora_scale()[:, None]
        return w

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dora={self.dora}"

    def _plain_keys_to_base(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A plain model's `<prefix>weight` / `<prefix>bias` load into `<prefix>base.weight` / `.bias`; loading
        plain base weights into a DoRA layer starts its magnitude at their row norms (the adapted model then
        equals the base exactly, as LoRA's B = 0 does)."""
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                value = state_dict.pop(prefix + name)
                state_dict.setdefault(f"{prefix}base.{name}", value)
        w = state_dict.get(f"{prefix}base.weight")
        if self.dora and w is not None and prefix + "lora_magnitude" not in state_dict:
            state_dict[prefix + "lora_magnitude"] = w.detach().float().norm(dim=1).to(self.lora_magnitude.dtype)


class _NewRows(nn.Module):
    """A frozen table (`base`: the base model's rows) plus trainable rows for tokens the base never had
    (`lora_new`: the chat tokens `data=chat` adds); `.weight` is the two stacked, so a tied head reads it."""

    def __init__(self, base: nn.Module, base_rows: int):
        super().__init__()
        w = base.weight
        self.lora_new = nn.Parameter(w.detach()[base_rows:].clone())
        base.weight = nn.Parameter(w.detach()[:base_rows].clone(), requires_grad=False)
        if isinstance(base, nn.Embedding):
            base.num_embeddings = base_rows
        else:
            base.out_features = base_rows
        self.base = base
        self.register_load_state_dict_pre_hook(self._plain_keys_to_base)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.lora_new], dim=0)

    def _plain_keys_to_base(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A plain `<prefix>weight` is the base's rows (and, when it has them, the new rows' start)."""
        if prefix + "weight" in state_dict:
            w = state_dict.pop(prefix + "weight")
            n = self.base.weight.shape[0]
            state_dict.setdefault(prefix + "base.weight", w[:n])
            if w.shape[0] > n:
                state_dict.setdefault(prefix + "lora_new", w[n:])


class NewRowsEmbedding(_NewRows):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class NewRowsLinear(_NewRows):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def add_new_token_rows(model: nn.Module, base_vocab: int) -> int:
    """Make the embedding rows (and untied head rows) past `base_vocab` trainable adapter parameters."""
    new = model.config.vocab_size - int(base_vocab)
    if new <= 0 or isinstance(model.wte, _NewRows):
        return 0
    model.wte = NewRowsEmbedding(model.wte, base_vocab)
    if model.lm_head is not None:
        model.lm_head = NewRowsLinear(model.lm_head, base_vocab)
    return new


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}


def _matches(name: str, targets) -> bool:
    parts = name.split(".")
    return parts[-1] in targets or ".".join(parts[-2:]) in targets


def _target_names(model: nn.Module) -> list[str]:
    names = set()
    for n in _block_linears(model):
        parts = n.split(".")
        names |= {parts[-1], ".".join(parts[-2:])}
    return sorted(names)


def _check_options(rank, alpha, dropout, targets) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"plugins.lora.rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"plugins.lora.alpha must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"plugins.lora.dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"plugins.lora.targets must be a list of Linear names like [qkv,proj,fc], got {targets!r}")


# ---- which parameters train ----------------------------------------------------------------------------------


def trainable_names(
    model: nn.Module, train_norms: bool = False, train_biases: bool = False, train_embeddings: bool = False
) -> list[str]:
    """The parameters a LoRA run trains (and its adapter file holds): the adapters, plus the chosen extras."""
    norms = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if "norm" in n.split(".")[-1]
        for p, _ in m.named_parameters(recurse=False)
    }
    out = []
    for name, _ in model.named_parameters():
        leaf = name.split(".")[-1]
        if (
            leaf.startswith("lora_")
            or (train_norms and name in norms)
            or (train_biases and leaf == "bias" and name not in norms)
            or (train_embeddings and name.split(".")[0] in ("wte", "pos", "lm_head"))
        ):
            out.append(name)
    return out


def set_trainable(model: nn.Module, **extras: bool) -> tuple[int, int]:
    """Freeze everything but the adapters (and extras); returns (trainable, total) parameter counts."""
    keep = set(trainable_names(model, **extras))
    trainable = total = 0
    seen = set()
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if name in keep else 0
    return trainable, total


def _extras(spec: dict[str, Any]) -> dict[str, bool]:
    return {k: bool(spec.get(k, False)) for k in ("train_norms", "train_biases", "train_embeddings")}


# ---- the converter -------------------------------------------------------------------------------------------


@CONVERTER.register("lora")
def lora(
    model: nn.Module,
    targets=DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    dora: bool = False,
    train_norms: bool = False,
    train_biases: bool = False,
    train_embeddings: bool = False,
    base_vocab: int | None = None,
) -> nn.Module:
    """Wrap the chosen block Linears in LoRALinear; freeze every other parameter.

    base_vocab (recorded by the callback when the run's tokenizer grew, e.g. data=chat's tokens): the
    embedding rows past it are trainable adapter parameters too (they are not in the base checkpoint)."""
    targets = list(targets)
    _check_options(rank, alpha, dropout, targets)
    if lora_layers(model):
        raise ConfigError(
            "the model already has LoRA adapters; merge them first (python plugins/lora/merge.py ckpt=... out=DIR) "
            "and fine-tune the merged model"
        )
    chosen = {n: m for n, m in _block_linears(model).items() if _matches(n, targets)}
    unused = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
    if unused:
        raise ConfigError(
            f"plugins.lora.targets {unused} match no Linear in the blocks; choose from {', '.join(_target_names(model))}"
        )
    for name, linear in chosen.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoRALinear(linear, rank, alpha, dropout, dora))
    if base_vocab is not None and not train_embeddings:
        add_new_token_rows(model, base_vocab)
    set_trainable(model, train_norms=train_norms, train_biases=train_biases, train_embeddings=train_embeddings)
    return model


def lora_spec(config: GPTConfig) -> dict[str, Any]:
    specs = [dict(s) for s in config.converters if s.get("name") == "lora"]
    if not specs:
        raise CheckpointError("this model has no LoRA adapters (no `lora` converter in its config)")
    return specs[0]


# ---- merge ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """A plain GPT (the `lora` converter dropped, others kept) whose weights are W + s B A (DoRA: rescaled)."""
    from microgpt.model import build_model

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapters to merge")
    cfg = model.config.to_dict()
    plain = build_model(
        GPTConfig.from_dict({**cfg, "converters": [c for c in cfg["converters"] if c["name"] != "lora"]})
    )
    sd = {}
    for k, v in model.state_dict().items():
        if k.split(".")[-1].startswith("lora_"):
            continue
        sd[k.replace(".base.", ".")] = v.detach().clone()
    for name, layer in layers.items():
        sd[f"{name}.weight"] = layer.merged_weight().to(layer.base.weight.dtype)
    for name, rows in model.named_modules():
        if isinstance(rows, _NewRows):
            sd[f"{name}.weight"] = rows.weight.detach().clone()
    plain.load_state_dict(sd, strict=True)
    plain.requires_grad_(True)
    return plain.train(model.training)


def bake(model: nn.Module) -> nn.Module:
    """The plugin contract's hook (report): `model` with its adapters merged; a model without adapters as is."""
    return merge(model) if lora_layers(model) else model


# ---- adapter-only checkpoints ----------------------------------------------------------------------------------


def base_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the base weights (names, dtypes, shapes and bytes), prefix `model.` ignored."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k.removeprefix('model.')}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve_base(base: str) -> str:
    from microgpt.io.hf import HUB_PREFIX

    return base if base.startswith(HUB_PREFIX) else str(Path(base).expanduser().resolve())


def adapter_state(model: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {n: sd[n].detach().cpu().contiguous() for n in trainable_names(model, **_extras(spec))}


def describe_base(base: str) -> dict[str, Any]:
    """What an adapter records of its base: the sha256 of its weights, its tokenizer and vocabulary size."""
    from microgpt.io.checkpoint import read_checkpoint

    ck = read_checkpoint(base)
    hp = ck["hyper_parameters"]
    return {
        "sha256": base_sha256(ck["state_dict"]),
        "tokenizer": hp.get("tokenizer"),
        "vocab_size": hp["model"]["vocab_size"],
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base: str | None,
    tokenizer: dict | None = None,
    plugins: dict | None = None,
    base_info: dict[str, Any] | None = None,
) -> Path:
    """Write `<out_dir>/adapter.safetensors` (the trainable tensors) and `adapter.json`; returns the file."""
    from safetensors.torch import save_file

    spec = lora_spec(model.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if base is not None and base_info is None:
        base_info = describe_base(base)
    base_info = base_info or {}
    meta = {
        "format": FORMAT,
        "weights": ADAPTER_FILE,
        "base": _resolve_base(base) if base else None,
        "base_sha256": base_info.get("sha256"),
        "lora": {k: v for k, v in spec.items() if k != "name"},
        "model": model.config.to_dict(),
        # the base's tokenizer unless this run changed it (e.g. data=chat added its tokens)
        "tokenizer": tokenizer if tokenizer is not None and tokenizer != base_info.get("tokenizer") else None,
        "plugins": dict(plugins or {}),
    }
    tmp = out_dir / (ADAPTER_FILE + ".tmp")
    save_file(adapter_state(model, spec), str(tmp), metadata={"format": "pt", "microgpt": FORMAT})
    tmp.replace(out_dir / ADAPTER_FILE)
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out_dir / ADAPTER_FILE


def _adapted_keys(model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain base's `model.*` tensors under the adapted model's names (`...qkv.weight` -> `...qkv.base.weight`),
    so the checkpoint dict matches the adapted model key for key (microgpt checks that before loading)."""
    from microgpt.model import build_model

    with torch.device("meta"):  # names only: no memory, no init
        skeleton = build_model(GPTConfig.from_dict(dict(model_cfg)))
    sd = dict(state_dict)
    for name, m in skeleton.named_modules():
        if isinstance(m, (LoRALinear, _NewRows)):
            for leaf in ("weight", "bias"):
                key = f"model.{name}.{leaf}"
                if key in sd:
                    sd.setdefault(f"model.{name}.base.{leaf}", sd.pop(key))
    return sd


def read_adapter(meta_path: str | Path, base: str | None = None) -> dict[str, Any]:
    """An adapter (its adapter.json) and its base -> a checkpoint dict `model_from_checkpoint` rebuilds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from microgpt.io.checkpoint import read_checkpoint

    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        weights = meta_path.parent / meta["weights"]
        model_cfg = meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is not a readable LoRA adapter config ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a microgpt LoRA adapter (format {FORMAT})")
    base = base or meta.get("base")
    if not base:
        raise CheckpointError(
            f"adapter {meta_path} records no base model; pass base=PATH (the model it was trained on)"
        )
    if not str(base).startswith("hf:") and not Path(base).expanduser().exists():
        raise CheckpointError(
            f"the base model {base} of adapter {meta_path.parent} does not exist; pass base=PATH "
            "(microgpt.load(adapter, base=...)) with the model the adapter was trained on"
        )
    ck = read_checkpoint(base)
    if meta.get("base_sha256") and base_sha256(ck["state_dict"]) != meta["base_sha256"]:
        raise CheckpointError(
            f"{base} is not the base model adapter {meta_path.parent} was trained on (its weights' sha256 differs); "
            "pass the base it was trained from"
        )
    try:
        adapter = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"adapter weights {weights} are missing or corrupt ({first}); train again") from None
    hp = ck["hyper_parameters"]
    sd = _adapted_keys(model_cfg, ck["state_dict"])
    sd.update({f"model.{k}": v for k, v in adapter.items()})
    plugins = {**(hp.get("plugins") or {}), **(meta.get("plugins") or {})}
    return {
        "state_dict": sd,
        "hyper_parameters": {
            "model": model_cfg,
            "tokenizer": meta.get("tokenizer") or hp.get("tokenizer"),
            "plugins": plugins,
        },
        "source": {"adapter": str(meta_path), "base": str(base)},
    }


# ---- training --------------------------------------------------------------------------------------------------


def _strategy_name(cfg) -> str:
    s = cfg.get("trainer", {}).get("strategy", "auto")
    if isinstance(s, str):
        return s.lower()
    try:
        return f"{s.get('_target_', '')} {s.get('stage', '')}".lower()
    except AttributeError:
        return str(s).lower()


def check_config(cfg) -> None:
    """Fail at start on settings LoRA cannot run with."""
    p = cfg.plugins.lora
    _check_options(p.rank, p.alpha, p.dropout, list(p.targets) if not isinstance(p.targets, str) else p.targets)
    if not (cfg.model.get("converters") or {}).get("lora"):
        raise ConfigError(
            "plugins.lora is set but model.converters.lora is missing; enable the plugin with +plugin=lora"
        )
    if not (cfg.get("callbacks") or {}).get("lora"):
        raise ConfigError("plugins.lora needs callbacks.lora (it freezes the base and writes the adapter)")
    if not cfg.get("init_from"):
        raise ConfigError(
            "plugins.lora adapts a trained model: set init_from=PATH (a microgpt checkpoint or run dir, or an HF "
            "GPT-2 directory), e.g. experiment=finetune init_from=... +plugin=lora"
        )
    strategy = _strategy_name(cfg)
    if any(s in strategy for s in ("fsdp", "deepspeed", "modelparallel")):
        raise ConfigError(
            f"plugins.lora supports strategy=auto or ddp, not {strategy}: sharding frozen base weights is not "
            "supported (the adapters are a tiny fraction of the model; use ddp)"
        )


class LoRA(L.Callback):
    """Freeze all but the adapters before fit; write the adapter-only checkpoint at the end of fit."""

    def __init__(
        self,
        base: str | None = None,
        save_adapter: bool = True,
        out: str | None = None,
    ):
        self.base = str(base) if base else None
        self.save = bool(save_adapter)
        self.out = out
        self.prepared = False
        self.adapter_path: Path | None = None
        self.base_info: dict[str, Any] | None = None

    def prepare(self, module, datamodule) -> None:
        """Before fit: read the base (its hash goes into adapter.json), make the rows of tokens the base never
        had (data=chat's) trainable, freeze everything else."""
        model = module.model
        if not lora_layers(model):
            raise ConfigError("plugins.lora: the model has no LoRA layers; enable the plugin with +plugin=lora")
        spec = lora_spec(model.config)
        if self.base is not None:
            self.base_info = describe_base(self.base)
            base_vocab = self.base_info["vocab_size"]
            if (
                spec.get("base_vocab") is None
                and model.config.vocab_size > base_vocab
                and not spec.get("train_embeddings")
            ):
                add_new_token_rows(model, base_vocab)
                # recorded in the converter (LitGPT derives the checkpoint's model record from model.config):
                # microgpt.load and resume rebuild the same trainable rows
                model.config.converters = [
                    {**c, "base_vocab": base_vocab} if c.get("name") == "lora" else c for c in model.config.converters
                ]
                spec = lora_spec(model.config)
        trainable, total = set_trainable(model, **_extras(spec))
        self.prepared = True
        if module.global_rank == 0:
            print(
                f"lora: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) in "
                f"{len(lora_layers(model))} adapted layers (rank {spec.get('rank')}, dora {bool(spec.get('dora'))})",
                flush=True,
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.prepared:
            self.prepare(pl_module, trainer.datamodule)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.save or not trainer.is_global_zero:
            return
        ck = trainer.checkpoint_callback
        ck_dir = getattr(ck, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        self.adapter_path = save_adapter(
            pl_module.model,
            self.out or ck_dir,
            self.base,
            pl_module.tokenizer_record,
            pl_module.plugins_record,
            self.base_info,
        )
        size = self.adapter_path.stat().st_size
        print(f"lora: wrote {self.adapter_path} ({size:,} bytes; base {self.base})", flush=True)
