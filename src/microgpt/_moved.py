"""Old module names of modules that moved into training/ and io/, kept importable.

`import microgpt.train` gives the very module object `microgpt.training.train` (so monkeypatching either name
patches both, and Hydra `_target_`s written with the old names still resolve), and
`python -m microgpt.export` runs `microgpt/io/export.py` as __main__. One table, one import hook, no shim files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

MOVED = {
    "microgpt.train": "microgpt.training.train",
    "microgpt.lit": "microgpt.training.lit",
    "microgpt.strategies": "microgpt.training.strategies",
    "microgpt.metrics": "microgpt.training.metrics",
    "microgpt.checkpoint": "microgpt.io.checkpoint",
    "microgpt.hf": "microgpt.io.hf",
    "microgpt.export": "microgpt.io.export",
    "microgpt.consolidate": "microgpt.io.consolidate",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=real.origin if real else None)
        spec.has_location = real is not None and real.has_location
        return spec

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__  # the import system overwrites __spec__; restored below
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)

    def get_code(self, fullname):  # `python -m microgpt.OLD` (runpy) runs the moved module's code
        real = importlib.util.find_spec(MOVED[fullname])
        return real.loader.get_code(real.name)


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
