"""Structured pruning / head reduction of a checkpoint, as a command:

    python plugins/prune/cli.py ckpt=RUN/checkpoints/best.ckpt heads=0.5 mlp=0.5 out=pruned.ckpt
    python plugins/prune/cli.py ckpt=... kv_heads=2 out=gqa.ckpt            # MHA -> GQA (mean-merged k/v)
    python plugins/prune/cli.py ckpt=... layers=1 method=fisher batches=16 data=text data.path=FILE

Options (key=value):
  ckpt        the checkpoint (.ckpt or run directory)                                   (required)
  out         where to write the pruned checkpoint          (default: <ckpt stem>-pruned.ckpt beside it)
  heads       fraction in [0,1) or count of attention heads to remove per layer (k/v groups for
              mha/gqa, query heads inside each group for mqa; head_mode=group|query to choose)
  mlp         fraction in [0,1) or count of MLP neurons to remove per layer (mlp_multiple=M rounds the kept width up)
  layers      fraction in [0,1) or count of whole layers to remove
  kv_heads    merge key/value heads down to this many (1 = MQA), after any pruning
  method      taylor (default) | fisher | magnitude: how heads / neurons / layers are ranked
  batches     training batches the taylor / fisher scores are accumulated over (default 8)
  data...     the text to score on, as for train.py (data=text data.path=FILE, data.batch_size=...);
              default: the data recorded in the checkpoint
  device      cpu (default) | cuda
A model trained with unstructured pruning is baked (masks applied, then dropped); with no other option
that is all the command does. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

OPTIONS = {
    "ckpt": None,
    "out": None,
    "heads": 0,
    "mlp": 0,
    "layers": 0,
    "kv_heads": None,
    "method": "taylor",
    "batches": 8,
    "head_mode": "auto",
    "mlp_multiple": 1,
    "device": "cpu",
}


def parse(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """key=value options for this command, and the rest (data.*, seed=...) as Hydra overrides."""
    from microgpt.keyvalue import KeyValueCommand

    command = KeyValueCommand(
        "python plugins/prune/cli.py", __doc__, OPTIONS, required=("ckpt",), overrides=("data", "paths", "seed")
    )
    args = command.parse(argv)
    return args.options, args.overrides


def batches_for(ckpt: dict, model, tokenizer, overrides: list[str], n: int):
    """n training batches of the checkpoint's data (or the data named in `overrides`)."""
    from hydra import compose, initialize_config_dir

    from microgpt.cli import CONF_DIR
    from microgpt.errors import ConfigError
    from microgpt.training.train import build_from_config

    if not any(o.lstrip("+~").startswith("data") for o in overrides):
        saved = ckpt.get("TokenDataModule") or {}
        src, path = saved.get("source"), saved.get("path")
        if src == "text" and path and Path(path).exists():
            overrides = [*overrides, "data=text", f"data.path={path}"]
        elif src in ("stdlib", "shakespeare"):
            overrides = [*overrides, f"data={src}"]
        else:
            raise ConfigError(
                "importance scores need the training text and the checkpoint does not say where it is; "
                "pass data=text data.path=FILE (or method=magnitude, which needs no data)"
            )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["ckpt=unused", *overrides])
    dm = build_from_config(cfg.data, "data", tokenizer_obj=tokenizer, block_size=model.config.block_size)
    dm.setup("fit")
    ds = dm.train_dataset()
    return [ds.batch(k) for k in range(n)]


def run(argv: list[str]) -> dict[str, Any]:
    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.errors import ConfigError
    from microgpt.io.checkpoint import model_from_checkpoint, read_checkpoint, resolve_checkpoint
    from microgpt.plugins import load_plugin

    prune = load_plugin("prune", extra_dirs=[Path(__file__).resolve().parents[1]])
    opts, overrides = parse(argv)
    src = resolve_checkpoint(opts["ckpt"])
    ckpt = read_checkpoint(src)
    model = model_from_checkpoint(ckpt).to(opts["device"])
    tokenizer = tokenizer_from_dict(ckpt["hyper_parameters"]["tokenizer"])
    before = model.num_params()
    before_cfg = model.config.to_dict()
    if opts["method"] not in prune.METHODS:
        raise ConfigError(f"method must be one of {', '.join(prune.METHODS)}, got {opts['method']!r}")

    model = prune.bake_masks(model)
    wanted = [s for s in ("heads", "mlp", "layers") if opts[s]]
    if wanted:
        batches = None
        if opts["method"] != "magnitude":
            batches = batches_for(ckpt, model, tokenizer, overrides, int(opts["batches"]))
        scores = prune.importance(model, batches, opts["method"], wanted, opts["head_mode"])
        model = prune.prune_structured(
            model, scores, opts["heads"], opts["mlp"], opts["layers"], opts["head_mode"], int(opts["mlp_multiple"])
        )
    if opts["kv_heads"] is not None:
        model = prune.to_gqa(model, int(opts["kv_heads"]))

    out = Path(opts["out"]) if opts["out"] else src.with_name(f"{src.stem}-pruned.ckpt")
    after = model.num_params()
    changed = {k: [before_cfg[k], v] for k, v in model.config.to_dict().items() if before_cfg.get(k) != v}
    info = {"source": str(src), **{k: opts[k] for k in ("heads", "mlp", "layers", "kv_heads", "method")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(prune.pruned_checkpoint(ckpt, model.cpu(), info), out)
    summary = {
        "out": str(out),
        "params_before": before,
        "params_after": after,
        "ratio": after / before,
        "changed": changed,
    }
    print(f"pruned {src} -> {out}: {before:,} -> {after:,} parameters ({after / before:.1%})", flush=True)
    for k, (a, b) in changed.items():
        print(f"  {k}: {a} -> {b}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    from microgpt.cli import exit_on_error, quiet_env

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        parse(argv)  # prints the help and the keys
        return
    quiet_env()
    print(json.dumps(exit_on_error(run)(argv)), flush=True)


if __name__ == "__main__":
    main()
