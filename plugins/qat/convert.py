"""Convert a QAT checkpoint into a real quantized model (a separate weights-only artifact).

    python plugins/qat/convert.py ckpt=RUN_DIR_OR_CKPT [out=FILE] [text=FILE] [batch_size=16] [max_batches=N]

`out` defaults to `<checkpoint dir>/quantized.pt`. With `text=FILE` both the fake-quantized and the
converted model are evaluated on the same val split of that text (the checkpoint's tokenizer, the
data module's default 10% val fraction), so their losses can be compared. The last line printed is a
JSON report: bytes, fp32_state_dict_bytes, compression, and the two val losses when `text` is given.
Load the artifact with `microgpt_plugins.qat.load_quantized(path)`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KEYS = ("ckpt", "out", "text", "batch_size", "max_batches")


def parse(argv: list[str]) -> dict[str, str]:
    from microgpt.keyvalue import KeyValueCommand

    command = KeyValueCommand(
        "python plugins/qat/convert.py", __doc__, dict.fromkeys(KEYS), required=("ckpt",), typed=False
    )
    return {k: v for k, v in command.parse(argv).options.items() if v is not None}


def main(argv: list[str] | None = None) -> dict:
    from microgpt.plugins import load_plugin

    args = parse(sys.argv[1:] if argv is None else argv)
    qat = load_plugin("qat")
    batches_fn = None
    if args.get("text"):
        from microgpt.data.datamodule import TokenDataModule

        bs = int(args.get("batch_size", 16))
        max_batches = int(args["max_batches"]) if args.get("max_batches") else None

        def batches_fn(tokenizer, block_size):
            dm = TokenDataModule(source="text", path=args["text"], tokenizer_obj=tokenizer, block_size=block_size)
            dm.setup("validate")
            batches = list(dm.full_val_batches(bs))
            return (batches[:max_batches] if max_batches else batches), dm.bytes_per_token

    report = qat.convert_checkpoint(args["ckpt"], args.get("out"), batches_fn)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    # run as a script: its own folder must not shadow top-level modules; microgpt comes from the install
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    from microgpt.cli import exit_on_error

    exit_on_error(main)()
