"""Where train.py's start-up goes: run it with a clock on each phase (bench/startup.py runs this).

    python bench/startup_trace.py OUT.jsonl [train.py overrides...] +callbacks.first_step._target_=startup_trace.FirstStep

It does what train.py does first (limit the cyclic GC to young objects), imports what train.py imports in the same order, but one
piece at a time with a timestamp after each (Hydra; torch, through microgpt.cli; torch._dynamo, which Lightning
and every torch.optim optimizer import; Lightning's own modules), wraps Hydra's config composition and
microgpt's run/fit/resume_gc with timestamps, and then runs train.py itself. The FirstStep callback stamps the
first training step. Every stamp is one JSON line {"event", "t"} (time.time()) appended to OUT.jsonl.
"""

from __future__ import annotations

import gc
import sys

if sys.version_info < (3, 14):  # what train.py does before its imports (see there)
    gc.set_threshold(gc.get_threshold()[0], 1_000_000_000, 1_000_000_000)

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

OUT_ENV = "MICROGPT_STARTUP_TRACE"


def stamp(event: str) -> None:
    with open(os.environ[OUT_ENV], "a") as f:
        f.write(json.dumps({"event": event, "t": time.time()}) + "\n")


if __name__ == "__main__":  # the clock starts before anything heavy is imported
    os.environ[OUT_ENV] = str(Path(sys.argv[1]).resolve())
    stamp("python")
else:  # imported by Hydra for the callback, when Lightning is loaded already
    import lightning as L

    class FirstStep(L.Callback):
        def __init__(self) -> None:
            self.done = False

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if not self.done:
                self.done = True
                stamp("first_step")


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        stamp(f"{label}>")
        try:
            return fn(*args, **kwargs)
        finally:
            stamp(f"{label}<")

    setattr(owner, name, timed)


def main() -> None:
    sys.argv = ["train.py", *sys.argv[2:]]
    root = Path(__file__).resolve().parents[1]
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401

    stamp("hydra_imported")
    import microgpt.cli  # noqa: F401  (microgpt -> torch)

    stamp("torch_imported")
    import torch._dynamo  # noqa: F401

    stamp("dynamo_imported")
    import lightning  # noqa: F401

    import microgpt.training.safety  # noqa: F401
    import microgpt.training.train as train

    stamp("lightning_imported")
    import hydra._internal.hydra as hydra_app

    _wrap(hydra_app.Hydra, "compose_config", "compose")
    _wrap(train, "run", "run")
    _wrap(train, "fit", "fit")
    _wrap(train, "resume_gc", "resume_gc")
    os.chdir(root)
    runpy.run_path(str(root / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
