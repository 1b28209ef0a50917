"""qat: quantization-aware training with torchao's `quantize_(model, QATConfig(...))`.

Three schemes, all running on CPU:
  8da4w             int8 dynamic per-token activations + int4 symmetric per-group weights
  int4_weight_only  int4 symmetric per-group weights, float activations (torchao's IntxWeightOnlyConfig;
                    `Int4WeightOnlyConfig` needs a GPU kernel package)
  int8              int8 dynamic per-token (asymmetric) activations + int8 symmetric per-channel weights

Pieces:
- the converter `qat` (recorded in the model config's `converters`) swaps every nn.Linear inside the
  transformer blocks for torchao's FakeQuantizedLinear. The embedding and the (tied) output head stay
  float. FakeQuantizedLinear keeps the Linear's `weight`/`bias` parameters under the same names and
  holds no buffers (its scales are recomputed from the tensor on every call), so the state_dict keys are
  exactly those of the float model and `microgpt.load` / resume rebuild the structure and load strictly.
- the callback `QAT` turns fake quantization off for training steps before `start_step` and on from
  there; the switch is a pure function of `trainer.global_step`, so a resumed run does exactly what an
  uninterrupted one does. Validation always runs fake-quantized, so `val_loss` (and the best checkpoint)
  measures the model that gets deployed, and matches what `microgpt.load` gives back.
- conversion to real quantized weights (`convert_model`), saved as a separate artifact with
  `save_quantized` (torch.save of a dict holding the state_dict of torchao quantized tensors; loads with
  weights_only=True) and read back by `load_quantized`. At the end of a run with `plugins.qat.convert=true`
  or with `python plugins/qat/convert.py ckpt=PATH`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError
from microgpt.registry import CONVERTER

SCHEMES = ("8da4w", "int4_weight_only", "int8")
FORMAT = "microgpt-qat/1"


# ---- schemes ----------------------------------------------------------------------------------------


def _check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"plugins.qat.scheme={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ConfigError(f"plugins.qat.group_size must be a positive integer, got {group_size!r}")


def _base_config(scheme: str, group_size: int):
    """The torchao post-training config that `convert` applies (None for int8: see _prepare_config)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if scheme == "int4_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return None


def _prepare_config(scheme: str, group_size: int):
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    base = _base_config(scheme, group_size)
    if base is not None:
        return QATConfig(base, step="prepare")
    # QATConfig(Int8DynamicActivationInt8WeightConfig()) is rejected by torchao 0.18 ("Unexpected base
    # config"): give the fake quantizers explicitly, with the numerics of the PTQ config used at convert
    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )


def _in_blocks(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the transformer blocks (the layers QAT quantizes), by qualified name."""
    return {n: m for n, m in model.named_modules() if _in_blocks(m, n)}


def fake_quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization.qat import FakeQuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}


def _check_group_size(model: nn.Module, scheme: str, group_size: int) -> None:
    if scheme == "int8":  # per-channel weights: group_size is not used
        return
    bad = [f"{n} ({m.in_features})" for n, m in block_linears(model).items() if m.in_features % group_size]
    if bad:
        raise ConfigError(
            f"plugins.qat.group_size={group_size} does not divide the input width of {', '.join(bad)}; "
            "pick a group_size that divides n_embd and the MLP width (e.g. 32)"
        )


@CONVERTER.register("qat")
def qat(model: nn.Module, scheme: str = "8da4w", group_size: int = 32) -> nn.Module:
    """Insert torchao fake quantization into every block nn.Linear (not the embedding or the head)."""
    from torchao.quantization import quantize_

    _check_scheme(scheme, group_size)
    _check_group_size(model, scheme, group_size)
    quantize_(model, _prepare_config(scheme, group_size), filter_fn=_in_blocks)
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Switch the fake quantizers of every FakeQuantizedLinear on or off; returns how many layers."""
    from torchao.quantization.qat.linear import enable_linear_fake_quant

    layers = fake_quantized_linears(model)
    for m in layers.values():
        enable_linear_fake_quant(m, enabled)
    return len(layers)


def qat_spec(config: GPTConfig) -> dict[str, Any]:
    """The recorded `qat` converter options of a model config (scheme, group_size)."""
    specs = [dict(s) for s in config.converters if s.get("name") == "qat"]
    if not specs:
        raise CheckpointError("this model was not trained with the qat plugin (no `qat` converter in its config)")
    if config.converters[-1].get("name") != "qat":
        raise CheckpointError("the qat converter must be the last one applied to convert this model")
    spec = specs[0]
    spec.pop("name")
    return {"scheme": spec.get("scheme", "8da4w"), "group_size": spec.get("group_size", 32)}


# ---- conversion to real quantized weights ----------------------------------------------------------------


def convert_model(model: nn.Module, scheme: str, group_size: int) -> nn.Module:
    """Fake-quantized model -> real quantized weights (in place; pass a copy to keep the original)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.quant_primitives import MappingType

    if not fake_quantized_linears(model):
        raise ConfigError("the model has no fake-quantized layers to convert; build it with model.converters.qat")
    base = _base_config(scheme, group_size)
    quantize_(model, QATConfig(base, step="convert"), filter_fn=_in_blocks)
    if base is None:  # int8: the convert step only swapped back to nn.Linear; now quantize for real
        # asymmetric per-token activations and symmetric per-row weights: what the fake quantizers simulated
        ptq = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
        quantize_(model, ptq, filter_fn=_in_blocks)
    model.requires_grad_(False)
    return model.eval()


def _float_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of a (fake-quantized) GPT, rebuilt from its config, with the same weights."""
    from microgpt.model import build_model

    copy = build_model(GPTConfig.from_dict(model.config.to_dict()))
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
    return copy.eval()


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in the float model without fake quantization (what an fp32 checkpoint holds)."""
    from microgpt.model import build_model

    cfg = model.config.to_dict()
    plain = build_model(
        GPTConfig.from_dict({**cfg, "converters": [c for c in cfg["converters"] if c["name"] != "qat"]})
    )
    plain.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
    return plain


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()) (the fp32 reference size)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8 holding two of them per byte (low nibble first), flattened."""
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    u = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def _is_int4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "IntxUnpackedToInt8Tensor" and t.target_dtype == torch.int4


def _pack_entry(t) -> dict[str, Any]:
    """torchao keeps int4 values one per int8 byte in memory; on disk two share a byte."""
    aq = t.activation_quantization
    return {
        "qdata": pack_int4(t.qdata),
        "shape": list(t.qdata.shape),
        "scale": t.scale,
        "zero_point": t.zero_point,
        "block_size": list(t.block_size),
        "dtype": str(t.dtype).removeprefix("torch."),
        "activation_quantization": None if aq is None else str(getattr(aq, "value", aq)),
    }


def _unpack_entry(e: dict[str, Any]):
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQ,
    )

    aq = e["activation_quantization"]
    return IntxUnpackedToInt8Tensor(
        unpack_int4(e["qdata"], e["shape"]),
        e["scale"],
        e["zero_point"],
        torch.int4,
        tuple(e["block_size"]),
        getattr(torch, e["dtype"]),
        None if aq is None else ActQ(aq),
    )


def save_quantized(
    model: nn.Module, path: str | os.PathLike, tokenizer: dict | None, plugins: dict | None = None
) -> int:
    """Write a converted model as a weights-only artifact (int4 packed two per byte); returns its size."""
    spec = qat_spec(model.config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    int4 = {k: _pack_entry(v) for k, v in sd.items() if _is_int4(v)}
    blob = {
        "format": FORMAT,
        **spec,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer,
        "plugins": dict(plugins or {}),
        "state_dict": {k: v for k, v in sd.items() if k not in int4},
        "int4_packed": int4,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:  # a file object: the archive's inner name does not depend on the file name
        torch.save(blob, f)
    tmp.replace(path)
    return path.stat().st_size


def load_quantized(path: str | os.PathLike):
    """`model, tokenizer = load_quantized("quantized.pt")`: the real-quantized GPT (eval, CPU)."""
    import torchao  # noqa: F401  (registers torchao's quantized tensor types as safe for weights_only)

    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.io.checkpoint import import_recorded_plugins, safe_load
    from microgpt.model import build_model

    if not Path(path).is_file():
        raise CheckpointError(f"quantized model {path} does not exist; convert a checkpoint first")
    blob = safe_load(
        path,
        corrupt="{path} is not a loadable quantized microgpt model ({error})",
        unsafe="{path} is not a loadable quantized microgpt model ({error})",
    )
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a microgpt quantized model (format {FORMAT})")
    missing = [k for k in ("model", "state_dict") if not isinstance(blob.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} lacks its {' and '.join(missing)} record; convert the checkpoint again")
    import_recorded_plugins(blob)
    config = GPTConfig.from_dict(blob["model"])
    qat_spec(config)  # qat must be the last converter
    sd = {**blob["state_dict"], **{k: _unpack_entry(e) for k, e in blob.get("int4_packed", {}).items()}}
    # the structure up to (not including) qat, then the quantized tensors take the Linear weights' place
    model = build_model(GPTConfig.from_dict({**config.to_dict(), "converters": config.converters[:-1]}))
    model.load_state_dict(sd, strict=True, assign=True)
    model.config = config
    model.requires_grad_(False)
    tok = tokenizer_from_dict(blob["tokenizer"]) if blob.get("tokenizer") else None
    return model.eval(), tok


@torch.no_grad()
def compare_on(fake: nn.Module, quantized: nn.Module, batches, bytes_per_token: float = 1.0) -> dict[str, float]:
    """Val loss of the fake-quantized and the converted model on the very same batches."""
    from microgpt.evaluate import evaluate_model

    batches = list(batches)
    set_fake_quant(fake, True)
    f = evaluate_model(fake, batches, bytes_per_token)
    q = evaluate_model(quantized, batches, bytes_per_token)
    return {"val_loss_fake_quant": f["val_loss"], "val_loss_quantized": q["val_loss"], "tokens": f["tokens"]}


def convert_and_save(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer: dict | None,
    plugins: dict | None = None,
    batches=None,
    bytes_per_token: float = 1.0,
) -> dict[str, Any]:
    """Convert a (fake-quantized) GPT, write the artifact, and report sizes (and val losses on `batches`)."""
    spec = qat_spec(model.config)
    fake = _float_copy(model)
    report: dict[str, Any] = {"out": str(out), **spec}
    quantized = convert_model(_float_copy(model), **spec)
    report["bytes"] = save_quantized(quantized, out, tokenizer, plugins)
    report["fp32_state_dict_bytes"] = state_dict_bytes(_plain_copy(model))
    report["compression"] = report["fp32_state_dict_bytes"] / report["bytes"]
    if batches is not None:
        report.update(compare_on(fake, quantized, batches, bytes_per_token))
    Path(str(out) + ".json").write_text(json.dumps(report, indent=1))
    return report


def convert_checkpoint(
    ckpt: str | os.PathLike, out: str | os.PathLike | None = None, batches_fn=None
) -> dict[str, Any]:
    """A microgpt .ckpt trained with qat -> `<ckpt dir>/quantized.pt` (or `out`); returns the report.

    batches_fn(tokenizer, block_size) may return val batches to compare the two models on.
    """
    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.io.checkpoint import model_from_checkpoint, read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    ck = read_checkpoint(path)
    hp = ck["hyper_parameters"]
    model = model_from_checkpoint(ck)
    qat_spec(model.config)
    out = Path(out) if out else path.parent / "quantized.pt"
    batches, bpt = None, 1.0
    if batches_fn is not None and hp.get("tokenizer"):
        batches, bpt = batches_fn(tokenizer_from_dict(hp["tokenizer"]), model.config.block_size)
    return convert_and_save(model, out, hp.get("tokenizer"), hp.get("plugins"), batches, bpt)


# ---- what the core asks of a qat model (microgpt.plugins contract) ----------------------------------------

QUANTIZED_ARTIFACT = "quantized.pt"  # the artifact's name next to a run's checkpoints


def write_quantized(model: nn.Module, path: str | os.PathLike, tokenizer: dict, plugins: dict) -> dict[str, Any]:
    """Convert and write `model`'s quantized artifact: {"bytes", "kind"}."""
    r = convert_and_save(model, path, tokenizer, plugins)
    return {"bytes": r["bytes"], "kind": f"qat {r['scheme']}"}


# the `python -m microgpt.export format=...` that holds each scheme's real quantized weights
EXPORT_FORMATS = {"8da4w": "int4", "int4_weight_only": "int4", "int8": "int8"}


def quantized_format(model: nn.Module) -> str:
    """The export format (int8 | int4) of the scheme `model` was trained for (its `qat` converter's)."""
    return EXPORT_FORMATS[qat_spec(model.config)["scheme"]]


def describe_quantized(model: nn.Module) -> str:
    """What a model read by `load_quantized` is, in a few words ("qat 8da4w")."""
    specs = [c for c in model.config.converters if c.get("name") == "qat"]
    return f"qat {specs[-1].get('scheme', '')}" if specs else "qat"


# ---- training ------------------------------------------------------------------------------------------


def needs_full_weights(cfg) -> bool:
    """torchao fake quantization needs whole weight matrices: the contract refuses sharding strategies."""
    return True


def check_config(cfg) -> None:
    """Fail at start on settings QAT cannot run with."""
    q = cfg.plugins.qat
    _check_scheme(q.scheme, q.group_size)
    if not isinstance(q.start_step, int) or q.start_step < 0:
        raise ConfigError(f"plugins.qat.start_step must be an integer >= 0, got {q.start_step!r}")
    conv = (cfg.model.get("converters") or {}).get("qat")
    if not conv:
        raise ConfigError("plugins.qat is set but model.converters.qat is missing; enable the plugin with +plugin=qat")
    if not (cfg.get("callbacks") or {}).get("qat"):
        raise ConfigError("plugins.qat needs callbacks.qat (it switches fake quantization on at start_step)")
    if cfg.get("init_from"):  # the widths are the base checkpoint's: the converter checks them in prepare
        return
    # the widths QAT will see: build the model skeleton on the meta device (no memory, no init cost)
    from microgpt.model import GPT
    from microgpt.training.train import model_config

    mcfg = model_config(cfg, vocab_size=1)
    with torch.device("meta"):
        skeleton = GPT(GPTConfig.from_dict({**mcfg.to_dict(), "converters": []}))
    _check_group_size(skeleton, conv.get("scheme", q.scheme), conv.get("group_size", q.group_size))


class QAT(L.Callback):
    """Fake quantization off before `start_step`, on from it (a function of global_step: resume-exact).

    With `convert=True`, at the end of fit the final weights are converted to real quantized ones and
    written to `out` (default `<run>/checkpoints/quantized.pt`), with a `.json` report next to it.
    """

    def __init__(
        self,
        start_step: int = 0,
        convert: bool = False,
        out: str | None = None,
        scheme: str = "8da4w",
        group_size: int = 32,
    ):
        self.start_step = int(start_step)
        self.convert = bool(convert)
        self.out = out
        self.scheme, self.group_size = scheme, int(group_size)
        self.datamodule = None
        self.report: dict[str, Any] | None = None

    def active_at(self, step: int) -> bool:
        return step >= self.start_step

    def prepare(self, module, datamodule) -> None:
        """Before fit. A model from `init_from=` keeps its checkpoint's converters: add qat to it and
        record the converter in this run's hyperparameters, so its checkpoints rebuild fake quantization."""
        if not fake_quantized_linears(module.model):
            module.add_converter({"name": "qat", "scheme": self.scheme, "group_size": self.group_size})
        self.datamodule = datamodule

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.datamodule is None:
            self.prepare(pl_module, trainer.datamodule)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        on = self.active_at(trainer.global_step)
        set_fake_quant(pl_module.model, on)
        pl_module.log("qat_enabled", float(on))

    def on_validation_start(self, trainer, pl_module) -> None:
        set_fake_quant(pl_module.model, True)  # evaluate the model that will be deployed

    def on_train_end(self, trainer, pl_module) -> None:
        set_fake_quant(pl_module.model, True)  # the live model = what microgpt.load rebuilds

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.convert or not trainer.is_global_zero:
            return
        ck = trainer.checkpoint_callback
        ck_dir = getattr(ck, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        out = self.out or str(Path(ck_dir) / "quantized.pt")
        dm = self.datamodule or trainer.datamodule
        batches = list(dm.val_dataloader()) if dm is not None else None
        bpt = getattr(dm, "bytes_per_token", None) or 1.0
        self.report = convert_and_save(
            pl_module.model, out, pl_module.tokenizer_record, pl_module.plugins_record, batches, bpt
        )
        r = self.report
        msg = f"qat: wrote {out} ({r['bytes']:,} bytes, {r['compression']:.2f}x smaller than fp32 {r['fp32_state_dict_bytes']:,})"
        if "val_loss_quantized" in r:
            msg += f"; val loss fake-quant {r['val_loss_fake_quant']:.4f}, quantized {r['val_loss_quantized']:.4f}"
        print(msg, flush=True)
