"""Turn a sharded checkpoint into one Lightning-format .ckpt file.

    python -m microgpt.consolidate ckpt=RUN/checkpoints/last.ckpt out=model.ckpt

`strategy=fsdp` (FSDP2, a torch.distributed.checkpoint "distcp" directory) and `strategy=deepspeed*` (a
DeepSpeed ZeRO 1/2/3 directory) save each process's shard into a directory named like a file. The result
here is what a single-process run writes: `hyper_parameters` (model config + tokenizer), `state_dict`
(`model.`-prefixed fp32 weights), `optimizer_states`, `lr_schedulers`, loops and `global_step`. So
`microgpt.load`, generate, evaluate and resume (`ckpt_path=`, single process, ddp or fsdp) all accept it,
and it loads with torch.load(weights_only=True).

The optimizer state is torch's AdamW state with one tensor per parameter, keyed by parameter *name*
(`model.blocks.0.attn.qkv.weight`) rather than position, as torch.distributed.checkpoint writes it:
torch.optim's load_state_dict pairs saved keys with parameters through the group order whatever the keys
are, and Lightning's FSDP loader needs names (it would renumber positions in module.parameters() order,
which LitGPT's decay/no-decay groups do not follow).

Nothing here needs a process group or the processes that trained: it reads files only.
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from microgpt.errors import CheckpointError, first_line
from microgpt.keyvalue import KeyValueCommand

USAGE = "usage: python -m microgpt.consolidate ckpt=SHARDED_CHECKPOINT_DIR [out=FILE.ckpt] [trust=false]"
HELP = f"""{USAGE}

Turn a sharded checkpoint (strategy=fsdp or deepspeed*: a directory named like a file) into one .ckpt file
that microgpt.load, generate, evaluate, export and resume all read (torch.load weights_only=True).

keys (default):
  ckpt   the sharded checkpoint directory, e.g. RUN/checkpoints/last.ckpt (required)
  out    the file to write (default: next to ckpt, named <ckpt stem>-consolidated.ckpt)
  trust  false: refuse DeepSpeed files holding objects beyond a small allowlist; true: full pickle, only
         for files you wrote yourself (default false)

example:
  python -m microgpt.consolidate ckpt=outputs/DATE/TIME/checkpoints/last.ckpt out=model.ckpt
"""

# DeepSpeed's own bookkeeping in its model-states file; everything else there is Lightning's checkpoint
_DEEPSPEED_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
}


# ---- what kind of checkpoint ------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "latest").is_file()


def is_distcp_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def is_sharded_checkpoint(path: str | Path) -> bool:
    return is_deepspeed_checkpoint(path) or is_distcp_checkpoint(path)


def _resolve(path: str | Path) -> Path:
    """A sharded checkpoint directory, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {p} does not exist; pass a run's checkpoints/last.ckpt (or the run directory)"
        )
    if p.is_dir() and not is_sharded_checkpoint(p):
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.exists():
                return _resolve(cand)
    if p.is_file():
        raise CheckpointError(f"{p} is already a single-file checkpoint; use it as it is (no consolidation needed)")
    if not is_sharded_checkpoint(p):
        raise CheckpointError(
            f"{p} is neither a DeepSpeed checkpoint (no 'latest' file) nor a distcp checkpoint (no '.metadata'); "
            "pass the last.ckpt directory written by strategy=deepspeed* or strategy=fsdp"
        )
    return p


# ---- FSDP2 / torch.distributed.checkpoint ------------------------------------------------------------


def _consolidate_distcp(path: Path) -> dict[str, Any]:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    try:
        ckpt = _load_distributed_checkpoint(path)  # every shard -> full tensors, plus Lightning's meta.pt
    except Exception as e:
        raise CheckpointError(f"cannot read the distcp checkpoint {path} ({first_line(e)})") from None
    # get_optimizer_state_dict's format, state and params keyed by parameter name, which is what
    # optimizer_states holds here for every strategy (see consolidate)
    optimizers = []
    while f"optimizer_{len(optimizers)}" in ckpt:
        optimizers.append(ckpt.pop(f"optimizer_{len(optimizers)}"))
    if optimizers:
        ckpt["optimizer_states"] = optimizers
    return ckpt


# ---- DeepSpeed ZeRO -------------------------------------------------------------------------------------


def _ds_load(f: Path, trust: bool) -> dict[str, Any]:
    """DeepSpeed pickles three small classes into its optimizer files: allow exactly those."""
    if trust:
        return torch.load(f, map_location="cpu", weights_only=False)
    from microgpt.safety import CONSOLIDATE_TRUST, deepspeed_safe_globals, weights_only_load

    return weights_only_load(f, CONSOLIDATE_TRUST, deepspeed_safe_globals())


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _consolidate_deepspeed(path: Path, trust: bool) -> dict[str, Any]:
    tag = (path / "latest").read_text().strip()
    d = path / tag
    optim_files = sorted(d.glob("*_optim_states.pt"), key=_natural)
    model_files = sorted(d.glob("*_model_states.pt"), key=_natural)
    if not optim_files or not model_files:
        raise CheckpointError(f"{d} has no DeepSpeed *_optim_states.pt / *_model_states.pt files; is it complete?")
    optim = [_ds_load(f, trust)["optimizer_state_dict"] for f in optim_files]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if len(optim) != world:
        raise CheckpointError(f"{d}: {len(optim)} optimizer shards for a world of {world}; a rank did not save")
    models = [_ds_load(f, trust) for f in model_files]  # one (ZeRO 1/2) or one per rank (ZeRO-3)
    client = models[0]
    param_shapes: list[dict[str, torch.Size]] = client["param_shapes"]

    if stage <= 2:
        flats = [o["single_partition_of_fp32_groups"] for o in optim]
        inner = [o["base_optimizer_state"] for o in optim]
        paddings = optim[0].get("param_alignment_paddings")
        merge = lambda per_rank: _merge_zero12(per_rank, param_shapes, world, paddings)  # noqa: E731
    elif stage == 3:
        flats = [o["fp32_flat_groups"] for o in optim]
        inner = [o["optimizer_state_dict"] for o in optim]
        merge = lambda per_rank: _merge_zero3(per_rank, param_shapes, world)  # noqa: E731
    else:
        raise CheckpointError(f"{d}: unknown ZeRO stage {stage}")

    weights = merge(flats)
    # optimizer state: the inner torch optimizer holds one flat fp32 tensor per (sub)group, elementwise
    # aligned with the fp32 partition, so its exp_avg / exp_avg_sq unflatten exactly like the weights
    state_keys = [k for k, v in inner[0]["state"][0].items() if torch.is_tensor(v) and v.dim() == 1]
    per_key = {
        k: merge([[inner[r]["state"][j][k] for j in sorted(inner[r]["state"])] for r in range(world)])
        for k in state_keys
    }
    step = inner[0]["state"][0].get("step")

    # the full state dict, in the model's own key order: buffers and frozen parameters first come from
    # the model files, trainable parameters from the fp32 master copy
    state_dict: dict[str, torch.Tensor] = OrderedDict()
    frozen = _frozen_params(models, client, world, stage)
    for name, value in client["module"].items():
        if name in weights:
            state_dict[name] = weights[name]
        elif name in frozen:
            state_dict[name] = frozen[name]
        elif name in client.get("buffer_names", []):
            state_dict[name] = value.float() if value.is_floating_point() else value
    for alias, source in (client.get("shared_params") or {}).items():
        state_dict[alias] = state_dict[source]
    missing = [n for n in client["module"] if n not in state_dict]
    if missing:
        raise CheckpointError(f"{d}: cannot rebuild {', '.join(missing[:5])} from the DeepSpeed shards")

    # optimizer state keyed by parameter name, groups in the optimizer's own order
    groups, states = [], {}
    for g, shapes in zip(inner[0]["param_groups"], param_shapes):
        for name in shapes:
            s = {k: per_key[k][name] for k in state_keys}
            if step is not None:
                s["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))
            states[name] = s
        groups.append({**g, "params": list(shapes)})

    ckpt = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    ckpt["state_dict"] = state_dict
    ckpt["optimizer_states"] = [{"state": states, "param_groups": groups}]
    return ckpt


def _merge_zero12(per_rank, param_shapes, world: int, paddings) -> dict[str, torch.Tensor]:
    """ZeRO 1/2: each group is one flat vector cut into `world` equal pieces (padded at the end)."""
    out: dict[str, torch.Tensor] = {}
    for gi, shapes in enumerate(param_shapes):
        full = torch.cat([per_rank[r][gi] for r in range(world)])
        offset = 0
        for pi, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            out[name] = full.narrow(0, offset, n).view(shape).clone()
            offset += n + (paddings[gi][pi] if paddings else 0)
        if offset > full.numel():
            raise CheckpointError(
                f"DeepSpeed group {gi}: parameters need {offset} values, the shards hold {full.numel()}"
            )
    return out


def _merge_zero3(per_rank, param_shapes, world: int) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is cut into `world` pieces of ceil(numel/world); rank r's flat vector is its
    piece of each parameter in turn (all groups and sub-groups concatenated)."""
    flats = [torch.cat(list(per_rank[r])) for r in range(world)]
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            out[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:n].view(shape).clone()
            offset += part
    if offset != flats[0].numel():
        raise CheckpointError(
            f"DeepSpeed ZeRO-3 shards hold {flats[0].numel()} values per rank, parameters need {offset}"
        )
    return out


def _frozen_params(models, client, world: int, stage: int) -> dict[str, torch.Tensor]:
    shapes = client.get("frozen_param_shapes") or {}
    if stage <= 2:  # not partitioned: the model file has them whole
        return {n: client["module"][n].float() for n in shapes}
    out = {}
    for name, shape in shapes.items():
        frags = [m["frozen_param_fragments"][name] for m in models]
        out[name] = torch.cat(frags)[: math.prod(shape)].view(shape).float()
    return out


# ---- entry points ---------------------------------------------------------------------------------------


def consolidate(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A sharded checkpoint (directory) -> the checkpoint dict of a single-process run."""
    p = _resolve(path)
    if is_deepspeed_checkpoint(p):
        ckpt = _consolidate_deepspeed(p, trust)  # every file read weights-only (_ds_load) unless trusted
    else:
        if not trust:  # torch.distributed.checkpoint unpickles .metadata: check every pickled part first
            from microgpt.safety import CONSOLIDATE_TRUST, check_distcp_dir

            check_distcp_dir(p, CONSOLIDATE_TRUST)
        ckpt = _consolidate_distcp(p)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a microgpt checkpoint (no model config); was it written by train.py?")
    ckpt["state_dict"] = OrderedDict((k, v.detach().float().contiguous()) for k, v in ckpt["state_dict"].items())
    return ckpt


def read_meta(path: str | Path) -> dict[str, Any]:
    """The Lightning part of a sharded checkpoint (hyper_parameters, global_step, ...) without its tensors."""
    from microgpt.io.checkpoint import safe_load

    corrupt = "sharded checkpoint file {path} is truncated or corrupt ({detail}); resume from another checkpoint"
    p = _resolve(path)
    if is_distcp_checkpoint(p):
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        return safe_load(p / _METADATA_FILENAME, corrupt)
    tag = (p / "latest").read_text().strip()
    files = sorted((p / tag).glob("*_model_states.pt"), key=_natural)
    if not files:
        raise CheckpointError(f"{p / tag} has no DeepSpeed model-states file")
    meta = safe_load(files[0], corrupt)
    return {k: v for k, v in meta.items() if k not in _DEEPSPEED_KEYS}


def consolidate_to_file(path: str | Path, out: str | Path, trust: bool = False) -> Path:
    ckpt = consolidate(path, trust=trust)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    try:  # the promise of this file: data only, loadable without executing anything
        torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"the consolidated checkpoint would not load with weights_only ({first_line(e)})"
        ) from None
    from microgpt.io.atomic import atomic_write

    out = Path(out).expanduser()
    atomic_write(out, buf.getvalue(), what="consolidated checkpoint")  # temp file beside it, fsync, rename
    return out


COMMAND = KeyValueCommand(
    "python -m microgpt.consolidate",
    HELP,
    {"ckpt": None, "out": None, "trust": "false"},
    required=("ckpt",),
    typed=False,
    error=CheckpointError,
)


def main(argv: list[str] | None = None) -> None:
    from microgpt.cli import exit_on_error

    @exit_on_error
    def _main() -> None:
        args = COMMAND.parse(sys.argv[1:] if argv is None else argv).options
        src = _resolve(args["ckpt"])
        out = Path(args.get("out") or src.with_name(src.stem + "-consolidated.ckpt"))
        trust = str(args["trust"]).lower() in ("1", "true", "yes")
        from microgpt.io.atomic import check_writable_dir

        check_writable_dir(out.parent)  # one line before gathering the shards, not a traceback after
        written = consolidate_to_file(src, out, trust=trust)
        meta = torch.load(written, map_location="cpu", weights_only=True)
        n = sum(v.numel() for v in meta["state_dict"].values())
        from microgpt.console import consolidate_summary

        print(consolidate_summary(src, written, meta.get("global_step"), n), flush=True)

    _main()


if __name__ == "__main__":
    main()
