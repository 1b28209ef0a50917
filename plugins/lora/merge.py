"""Fold LoRA adapters into the base weights: a plain model every export format accepts.

    python plugins/lora/merge.py ckpt=PATH out=DIR [base=BASE] [overwrite=false]

PATH is a LoRA run's .ckpt / run dir, or an adapter (its directory or adapter.safetensors; its base is the
recorded one unless `base=` is given). DIR receives an exported safetensors model (model.safetensors +
microgpt.json), written atomically, that `microgpt.load(DIR)` reloads and `python -m microgpt.export
ckpt=DIR format=hf|int8|gguf` converts. The last line printed is a JSON summary with the largest logit
difference between the adapted and the merged model on a fixed random batch (exact up to float rounding
for a float base; a `qat` base keeps its converter and re-quantizes the merged weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

USAGE = "usage: python plugins/lora/merge.py ckpt=PATH out=DIR [base=BASE] [overwrite=false]"
KEYS = ("ckpt", "out", "base", "overwrite")


def parse(argv: list[str]) -> dict[str, str]:
    from microgpt.errors import ConfigError

    args: dict[str, str] = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"unexpected argument {a!r}; {USAGE}")
        args[key] = value
    for key in ("ckpt", "out"):
        if not args.get(key):
            raise ConfigError(f"{key}= is required; {USAGE}")
    if args.get("overwrite", "false").lower() not in ("true", "false"):
        raise ConfigError(f"overwrite must be true or false, got {args['overwrite']!r}")
    return args


def merge_checkpoint(ckpt: str, out: str, base: str | None = None, overwrite: bool = False) -> dict:
    import torch

    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.errors import CheckpointError
    from microgpt.io.checkpoint import model_from_checkpoint, read_checkpoint
    from microgpt.io.export import _files, atomic_dir, write_safetensors
    from microgpt.plugins import load_plugin

    lora = load_plugin("lora")
    ck = read_checkpoint(ckpt, base)
    hp = ck["hyper_parameters"]
    if not hp.get("tokenizer"):
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer; it was not written by microgpt's train.py")
    model = model_from_checkpoint(ck).eval()
    del ck
    merged = lora.merge(model).eval()
    c = model.config
    x = torch.randint(0, c.vocab_size, (2, min(c.block_size, 64)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - merged(x)).abs().max().item()
    plugins = {k: v for k, v in (hp.get("plugins") or {}).items() if k != "lora"}
    with atomic_dir(out, overwrite) as tmp:
        write_safetensors(merged, tokenizer_from_dict(hp["tokenizer"]), tmp, plugins)
        files = _files(tmp)
    return {
        "out": str(Path(out).expanduser()),
        "files": files,
        "merged_layers": len(lora.lora_layers(model)),
        "converters": [s["name"] for s in merged.config.converters],
        "max_abs_logit_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    report = merge_checkpoint(
        args["ckpt"], args["out"], args.get("base"), args.get("overwrite", "false").lower() == "true"
    )
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    # run as a script: its own folder must not shadow top-level modules; microgpt comes from the install
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    from microgpt.cli import exit_on_error

    exit_on_error(main)()
