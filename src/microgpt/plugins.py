"""Plugin loading.

A plugin is a folder `plugins/NAME/` (a Python package) plus `conf/plugin/NAME.yaml`. The yaml
writes only keys named after the plugin (`plugins.NAME`, `callbacks.NAME`, `model.converters.NAME`),
and `+plugin=NAME` (or `'+plugin=[a,b]'`) composes it. Before the model is built, `load_plugins`
imports each enabled plugin as `microgpt_plugins.NAME`, so its module-level `@REGISTRY.register`
decorators run and yaml `_target_: microgpt_plugins.NAME.Something` resolves.

`microgpt_plugins` is a namespace whose search path is: $MICROGPT_PLUGIN_PATH (os.pathsep-separated),
then the `plugins/` folder next to the config dir in use, then any `extra_dirs` given. A checkpoint
records which plugins built it (and where they lived); `microgpt.load` imports them again by name from
this path only, never from the recorded folder (microgpt.checkpoint.import_recorded_plugins).

A plugin package may define, at module level:
  check_config(cfg) -> None          raise ConfigError for settings it cannot support (runs before
                                     anything is built, so incompatible combinations fail at start)
  CONFLICTS: dict[str, str]          other plugin or strategy names -> why they cannot be combined
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

from microgpt.errors import ConfigError

NAMESPACE = "microgpt_plugins"
# the repository's own plugins/ folder (an editable install keeps it next to src/)
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "plugins"


def _namespace() -> types.ModuleType:
    mod = sys.modules.get(NAMESPACE)
    if mod is None:
        mod = types.ModuleType(NAMESPACE)
        mod.__path__ = []  # a namespace package: subpackages are found on this path
        sys.modules[NAMESPACE] = mod
    return mod


def plugin_dirs(extra_dirs: list[str | os.PathLike] | None = None) -> list[str]:
    dirs = [d for d in os.environ.get("MICROGPT_PLUGIN_PATH", "").split(os.pathsep) if d]
    dirs += [str(d) for d in extra_dirs or []]
    dirs += [str(Path.cwd() / "plugins"), str(DEFAULT_DIR)]
    out: list[str] = []
    for d in dirs:
        d = str(Path(d).expanduser().resolve())
        if d not in out and Path(d).is_dir():
            out.append(d)
    return out


def add_plugin_dirs(extra_dirs: list[str | os.PathLike] | None = None) -> list[str]:
    ns = _namespace()
    for d in plugin_dirs(extra_dirs):
        if d not in ns.__path__:
            ns.__path__.append(d)
    importlib.invalidate_caches()
    return list(ns.__path__)


def load_plugin(name: str, extra_dirs: list[str | os.PathLike] | None = None) -> types.ModuleType:
    """Import plugin NAME from the plugin path, or raise a one-line ConfigError naming what exists."""
    path = add_plugin_dirs(extra_dirs)
    try:
        return importlib.import_module(f"{NAMESPACE}.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"{NAMESPACE}.{name}", NAMESPACE):
            raise  # the plugin exists but one of *its* imports is missing: show the real error
        raise ConfigError(
            f"unknown plugin '{name}': no package {name}/ in {path}; available: {', '.join(available()) or 'none'} "
            "(add a folder to MICROGPT_PLUGIN_PATH to use your own)"
        ) from None


def available(extra_dirs: list[str | os.PathLike] | None = None) -> list[str]:
    names = set()
    for d in plugin_dirs(extra_dirs):
        names |= {p.name for p in Path(d).iterdir() if (p / "__init__.py").is_file()}
    return sorted(names)


def load_plugins(names: list[str], extra_dirs: list[str | os.PathLike] | None = None) -> dict[str, types.ModuleType]:
    mods = {name: load_plugin(name, extra_dirs) for name in names}
    # pairwise conflicts declared by the plugins themselves
    for name, mod in mods.items():
        for other, why in getattr(mod, "CONFLICTS", {}).items():
            if other in mods:
                raise ConfigError(f"plugins '{name}' and '{other}' cannot be combined: {why}")
    return mods


def plugin_origin(mods: dict[str, types.ModuleType]) -> dict[str, str]:
    """name -> the folder holding that plugin package (stored in checkpoints)."""
    return {name: str(Path(mod.__file__).resolve().parent.parent) for name, mod in mods.items()}
