"""Start-up: keep torchmetrics' import from loading integrations microgpt never uses.

Lightning imports torchmetrics (its version checks, its logging of Metric objects), and `import torchmetrics`
imports every optional integration it finds installed: transformers (for BERTScore), scipy (audio metrics) and
matplotlib (`Metric.plot`). With the `full`/`dev` extras installed that is ~40% of train.py's time before the
first step and ~100 MB of resident memory (bench/README.md, "start-up"). microgpt's metrics (training/metrics.py:
loss, perplexity, bits per byte) need none of them.

`install()` (called by microgpt.cli, i.e. by train.py and every other command before Lightning is imported) puts
one finder on sys.meta_path that acts only while `torchmetrics` itself is being imported:
  - inside that import, the packages in LEAN (unless already imported) look not installed, and torchmetrics'
    availability flags for them (torchmetrics.utilities.imports) are set to unavailable, so its optional
    metrics take their documented "not installed" path (BERTScore and `.plot()` say the package is missing);
  - afterwards nothing is hidden: `import transformers`, `import matplotlib` work as usual for microgpt's own
    code (HF conversion, report plots) and for plugins.
MICROGPT_LEAN_IMPORTS=0 turns it off (torchmetrics then imports everything it finds, as without microgpt).
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

LEAN = ("transformers", "scipy", "matplotlib")
_FLAGS_MODULE = "torchmetrics.utilities.imports"
_REASON = "not loaded by microgpt's lean start-up (microgpt.lean_imports; MICROGPT_LEAN_IMPORTS=0 loads it)"


def enabled() -> bool:
    return os.environ.get("MICROGPT_LEAN_IMPORTS", "1").strip().lower() not in ("0", "false", "no", "off")


class _Loader(importlib.abc.Loader):
    """The real loader, with something run before and after the module's code."""

    def __init__(self, real: importlib.abc.Loader, before=None, after=None):
        self.real, self.before, self.after = real, before, after

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        if self.before:
            self.before()
        try:
            self.real.exec_module(module)
        finally:
            if self.after:
                self.after(module)

    def __getattr__(self, name: str) -> Any:  # resource readers, get_source, ... of the real loader
        return getattr(self.real, name)


class LeanFinder(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: tuple[str, ...] = LEAN):
        self.hidden = hidden
        self.hiding: set[str] = set()  # non-empty only while torchmetrics' own import runs
        self.done = False

    def find_spec(self, fullname: str, path, target=None):
        top = fullname.partition(".")[0]
        if top in self.hiding:
            raise ModuleNotFoundError(f"No module named {fullname!r} ({_REASON})", name=fullname)
        if self.done or fullname not in ("torchmetrics", _FLAGS_MODULE):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if fullname == "torchmetrics":
            spec.loader = _Loader(spec.loader, before=self._hide, after=self._unhide)
        else:
            spec.loader = _Loader(spec.loader, after=self._flags_off)
        return spec

    def _hide(self) -> None:
        self.hiding = {name for name in self.hidden if name not in sys.modules}

    def _unhide(self, module) -> None:
        self.hiding = set()
        self.done = True
        if self in sys.meta_path:  # its work is done: later imports do not pass through it
            sys.meta_path.remove(self)
        try:  # torchmetrics asked lightning_utilities' cached package_available(): let later callers see the truth
            from lightning_utilities.core.imports import package_available

            package_available.cache_clear()
        except (ImportError, AttributeError):
            pass

    def _flags_off(self, module) -> None:
        """torchmetrics' RequirementCache flags for the hidden packages -> unavailable (checked lazily by it)."""
        for value in vars(module).values():
            req = getattr(value, "requirement", None) or getattr(value, "module", None)
            if not isinstance(req, str) or not hasattr(value, "_check_available"):
                continue
            name = req.split(";")[0].strip()
            for sep in "<>=!~[ ":
                name = name.split(sep)[0]
            if name.partition(".")[0].lower() in self.hiding:
                value.available = False
                value.message = f"Requirement {req!r} {_REASON}"


def install() -> bool:
    """Add the finder (once) unless torchmetrics is already imported or MICROGPT_LEAN_IMPORTS=0."""
    if not enabled() or "torchmetrics" in sys.modules:
        return False
    if any(isinstance(f, LeanFinder) for f in sys.meta_path):
        return True
    sys.meta_path.insert(0, LeanFinder())
    return True


def skip_dynamo_exit_report() -> None:
    """torch._dynamo registers an atexit report of compile times; it formats the table (importing `tabulate`,
    ~0.1-0.3 s at exit) even when its logger discards it. Unregister it when that logger would discard it."""
    import atexit
    import logging

    utils = sys.modules.get("torch._dynamo.utils")
    report = getattr(utils, "dump_compile_times", None)
    if report is not None and not logging.getLogger("torch._dynamo.utils").isEnabledFor(logging.INFO):
        atexit.unregister(report)


START_UP_GC_THRESHOLD = 1_000_000_000  # train.py's older-generation thresholds during its start-up


def resume_gc() -> None:
    """End of start-up: the collector as usual again, if the entry script limited it.

    train.py sets the older generations' thresholds to START_UP_GC_THRESHOLD before its imports: each
    older-generation collection during them walks all the objects torch, Lightning and Hydra have made so far
    (~570k), ~0.4 s of its start-up, while young collections (which free nearly all of its garbage) stay on.
    Here, before the first training step, the objects alive now (modules, classes, the model, the trainer: they
    live as long as the run) are moved to the permanent generation (gc.freeze), so later collections skip them,
    and Python's default thresholds come back. A no-op otherwise (a library user's process, the next job of a
    multirun).
    """
    young, older, _ = gc.get_threshold()
    if older < START_UP_GC_THRESHOLD:
        return
    gc.freeze()
    gc.set_threshold(young, 10, 10)  # Python's defaults
