"""Loading a file must never run its code, nor make us allocate what its weights do not hold.

Two guards used by the loaders (docs/reliability.md):

- `check_sharded_checkpoint(path, trust)`: DeepSpeed and torch.distributed.checkpoint ("distcp") read
  parts of their checkpoint directories with full pickle (DeepSpeed's `*_states.pt` with
  weights_only=False, distcp's `.metadata` with pickle.load and its non-tensor items with
  weights_only=False). Before either library touches a directory, every such part is read here with a
  loader that cannot run code: torch.load(weights_only=True) (DeepSpeed's three small bookkeeping
  classes allowed), and for `.metadata` a pickle reader that only accepts the dataclasses
  torch.distributed.checkpoint writes. Anything else is refused in one line, unless the user opts in
  (`trust_checkpoint=true` for train.py, `trust=true` for microgpt.consolidate).

- `build_model_from_weights(config, state_dict)`: a checkpoint's config is checked against its tensors
  before anything real is built (a 2 KB file claiming 200 layers x 1024 wide is refused at once): first
  the token embedding and the number of blocks, then the whole module tree built on the `meta` device
  (no memory), key by key and shape by shape. The model is then built with its parameters on `meta` and
  materialised from the checkpoint's own tensors (load_state_dict(assign=True)): one copy of the weights.

This module imports neither Lightning nor Hydra (microgpt.load must not).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from microgpt.errors import CheckpointError

# what the CLI tells a user who wrote the checkpoint themselves
TRAIN_TRUST = "trust_checkpoint=true"
CONSOLIDATE_TRUST = "trust=true"


# ---- sharded checkpoints --------------------------------------------------------------------------------


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its optimizer files, all plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refusal(f: Path, e: BaseException, trust_key: str) -> CheckpointError:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global '([\w.]+)'", text)
    what = f"it references {m.group(1)}" if m else (text.strip().splitlines() or [type(e).__name__])[0][:160]
    return CheckpointError(
        f"{f} cannot be loaded safely ({what}: not plain data, so it could run code; nothing was loaded); "
        f"if you wrote this checkpoint yourself, pass {trust_key} to load it with full pickle"
    )


def weights_only_load(f: Path, trust_key: str = TRAIN_TRUST, extra_globals: list | None = None) -> Any:
    """io.checkpoint.safe_load (weights_only, tensor data memory-mapped when possible) with the messages of a
    sharded checkpoint: what was refused and how to opt in."""
    from microgpt.io.checkpoint import safe_load

    return safe_load(
        f,
        corrupt="{path} is truncated or not a torch checkpoint file ({detail:.200}); save it again",
        unsafe="{path} cannot be loaded safely ({detail:.160}: not plain data, so it could run code; nothing was "
        f"loaded); if you wrote this checkpoint yourself, pass {trust_key} to load it with full pickle",
        allow=extra_globals or (),
        mmap=True,
    )


def _inside(root: Path, p: Path) -> Path:
    """p resolved, refusing anything outside the checkpoint directory (a `latest` of `../../x`)."""
    r = p.resolve()
    if not r.is_relative_to(root.resolve()):
        raise CheckpointError(f"{p} points outside the checkpoint directory {root}; the checkpoint is damaged")
    return r


def check_deepspeed_dir(path: Path, trust_key: str = TRAIN_TRUST) -> None:
    """Every `*.pt` file DeepSpeed would load from the tag directory named by `latest`, read weights-only."""
    tag = (path / "latest").read_text(encoding="utf-8", errors="replace").strip()
    d = _inside(path, path / tag)
    if not tag or not d.is_dir():
        raise CheckpointError(
            f"{path}: 'latest' names {tag!r}, which is not a directory there; the checkpoint is damaged"
        )
    files = sorted(d.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{d} has no DeepSpeed *.pt files; the checkpoint is incomplete")
    allowed = deepspeed_safe_globals()
    for f in files:
        weights_only_load(f, trust_key, allowed)


# torch.distributed.checkpoint's `.metadata`: the plain dataclasses and enums it writes, torch's Size, dtypes,
# layouts and memory formats, and pathlib paths (StorageMeta.checkpoint_id). Nothing that can run code.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's own table
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":  # dtypes and memory formats pickle as `torch.float32`, `torch.contiguous_format`
            v = getattr(torch, name, None)
            if isinstance(v, (torch.dtype, torch.memory_format, torch.layout)):
                return v
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint's .metadata")


def read_dcp_metadata(f: Path, trust_key: str = TRAIN_TRUST) -> Any:
    """A distcp `.metadata` file through the allowlist above."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(f, "rb") as fh:
            md = _DCPMetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise _refusal(f, e, trust_key) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(
            f"{f} is truncated or damaged ({type(e).__name__}: {e}); the checkpoint is incomplete"
        ) from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{f} is not torch.distributed.checkpoint metadata (a {type(md).__name__})")
    return md


def check_distcp_dir(path: Path, trust_key: str = TRAIN_TRUST) -> None:
    """`.metadata` (and per-rank `__N.metadata`) through the allowlist; every non-tensor item (which DCP
    reads with weights_only=False) read weights-only from its byte range; Lightning's meta.pt weights-only.
    Tensor items DCP itself reads with weights_only=True."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for f in [path / ".metadata", *sorted(path.glob("__*.metadata"))]:
        if not f.is_file():
            continue
        md = read_dcp_metadata(f, trust_key)
        byte_items = {k for k, v in (md.state_dict_metadata or {}).items() if isinstance(v, BytesStorageMetadata)}
        for index, info in (md.storage_data or {}).items():
            if getattr(index, "fqn", None) not in byte_items:
                continue
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{path}: item {index.fqn} is stored with transforms {info.transform_descriptors} that cannot be "
                    f"checked; if you wrote this checkpoint yourself, pass {trust_key}"
                )
            data = _inside(path, path / info.relative_path)
            with open(data, "rb") as fh:
                fh.seek(int(info.offset))
                blob = fh.read(int(info.length))
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise _refusal(Path(f"{data}[{index.fqn}]"), e, trust_key) from None
            except Exception as e:
                raise CheckpointError(
                    f"{data}: item {index.fqn} is damaged ({type(e).__name__}); the checkpoint is incomplete"
                ) from None
    meta = path / "meta.pt"  # Lightning's own part (hyper_parameters, loops, ...)
    if meta.is_file():
        weights_only_load(meta, trust_key)


def check_sharded_checkpoint(path: str | Path, trust: bool = False, trust_key: str = TRAIN_TRUST) -> None:
    """Refuse (one line) a DeepSpeed or distcp directory with any part a weights-only reader would not load.
    Does nothing for single files (those are always read weights-only) or when the user trusts the file."""
    from microgpt.io.consolidate import is_deepspeed_checkpoint, is_distcp_checkpoint

    if trust or path is None:
        return
    p = Path(path)
    if is_deepspeed_checkpoint(p):
        check_deepspeed_dir(p, trust_key)
    elif is_distcp_checkpoint(p):
        check_distcp_dir(p, trust_key)


# ---- building a model from a checkpoint's config ---------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _precheck(cfg, sd: dict[str, torch.Tensor]) -> None:
    """Cheap checks that bound the size of what the config would build, before building anything."""
    wte = sd.get("wte.weight")
    if wte is not None and tuple(wte.shape) != (cfg.vocab_size, cfg.n_embd):
        raise CheckpointError(
            f"checkpoint config (vocab_size={cfg.vocab_size}, n_embd={cfg.n_embd}) does not match its token "
            f"embedding {tuple(wte.shape)}; the file is damaged or forged"
        )
    n_blocks = cfg.n_unique_layers or cfg.n_layer
    held = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if n_blocks != len(held) or (held and max(held) != n_blocks - 1):
        raise CheckpointError(
            f"checkpoint config claims {n_blocks} transformer blocks but its weights hold {len(held)}; "
            "the file is damaged or forged"
        )


def _compare(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append(f"shapes (file vs config) {wrong[:3]}")
        raise CheckpointError(f"checkpoint weights do not match its model config ({'; '.join(parts)})")
    # tensors the config derives without storing them (non-persistent buffers): bounded by the weights' size
    held = sum(v.numel() for v in sd.values())
    derived = sum(b.numel() for b in model.buffers()) + sum(p.numel() for p in model.parameters())
    derived -= sum(v.numel() for v in want.values())
    if derived > max(held, 1 << 22):
        raise CheckpointError(
            f"checkpoint config derives {derived:,} values beyond its {held:,} stored weights; the file is damaged or forged"
        )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While building: every parameter a module registers is swapped for a `meta` one (no memory, and
    initialisers do nothing); buffers stay real (the config-derived ones, e.g. rotary frequencies)."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta:
            return None
        return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def build_model_from_weights(cfg, sd: dict[str, torch.Tensor]) -> nn.Module:
    """The model `cfg` describes, holding the tensors of `sd` (its keys without the `model.` prefix).

    Raises a one-line CheckpointError when the config does not fit the tensors, before allocating anything.
    """
    from microgpt.errors import MicroGPTError
    from microgpt.model import build_model

    _precheck(cfg, sd)
    try:
        with torch.device("meta"):
            skeleton = build_model(cfg)
    except MicroGPTError:
        raise
    except Exception:  # a plugin's converter that cannot run on `meta`: compare the next build instead
        skeleton = None
    checked = skeleton is not None
    if checked:
        _compare(skeleton, sd)
    del skeleton
    with _parameters_on_meta():
        model = build_model(cfg)
    if not checked:
        _compare(model, sd)
    want = model.state_dict()
    # the model's own dtypes (a bf16 file loads into the float32 model, as a copying load_state_dict would)
    sd = {k: v.to(want[k].dtype) if v.dtype != want[k].dtype else v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its model config ({_one_line(e)})") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint does not hold {left[:3]}; the file is incomplete")
    return model
