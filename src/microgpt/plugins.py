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

The contract (what microgpt reads from a plugin; everything is optional, see plugins/README.md) is
`PluginModule` for the package and `Preparer` for its callbacks. A plugin changes the model and the
training only through LitGPT's contract methods (add_converter, replace_model, set_objective,
add_loss_term, add_trainable); it never writes `module.hparams` or another plugin's config keys.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    return {name: load_plugin(name, extra_dirs) for name in names}


def plugin_origin(mods: dict[str, types.ModuleType]) -> dict[str, str]:
    """name -> the folder holding that plugin package (stored in checkpoints)."""
    return {name: str(Path(mod.__file__).resolve().parent.parent) for name, mod in mods.items()}


# ---- the contract --------------------------------------------------------------------------------------


class PluginModule(Protocol):
    """What microgpt reads from a plugin package `plugins/NAME/__init__.py` (every attribute is optional).

    Refusing settings, all run by `check_plugins` at config time, before anything is built:
      check_config(cfg)               raise ConfigError for settings this plugin cannot support
      CONFLICTS: dict[str, str]       other plugin names -> why they cannot be combined with this one
      needs_full_weights(cfg) -> bool True: every rank needs whole weight matrices, so strategies that shard
                                      parameters (FSDP, DeepSpeed stage 3, see strategies.shards_parameters)
                                      are refused
    What the core asks of a model this plugin's converters built (io/, report; they never name a plugin):
      bake(model) -> model            the same function with this plugin's converters folded into plain
                                      weights (a model with no converters of this plugin is returned as is)
      QUANTIZED_ARTIFACT: str         file name of this plugin's quantized artifact next to a checkpoint
      write_quantized(model, path, tokenizer: dict, plugins: dict) -> dict
                                      write that artifact for `model`; returns {"bytes": int, "kind": str}
      load_quantized(path) -> (model, tokenizer | None)
                                      read it back
      describe_quantized(model) -> str  what a model read back is, in a few words ("qat 8da4w")
      quantized_format(model) -> str  the `microgpt.export format=` (int8 | int4) its artifact answers to
    Training-time pieces come from the plugin's yaml: `model.converters.NAME` (a registered converter) and
    `callbacks.NAME` (a Lightning callback, usually a `Preparer`).
    """

    CONFLICTS: dict[str, str]
    QUANTIZED_ARTIFACT: str

    def check_config(self, cfg: Any) -> None: ...

    def needs_full_weights(self, cfg: Any) -> bool: ...

    def bake(self, model: Any) -> Any: ...

    def write_quantized(self, model: Any, path: Any, tokenizer: dict, plugins: dict) -> dict[str, Any]: ...

    def load_quantized(self, path: Any) -> tuple[Any, Any]: ...

    def describe_quantized(self, model: Any) -> str: ...

    def quantized_format(self, model: Any) -> str: ...


@runtime_checkable
class Preparer(Protocol):
    """A callback with `prepare(module, datamodule)`: `microgpt.training.train.run` calls it once the model is
    built (and `init_from`'s weights are in it), before the optimizer exists and before `trainer.fit`, in the
    order of `callbacks`. It changes the run through the LitGPT contract only:
      module.add_converter(spec)          apply a registered converter and record it in the model config
      module.replace_model(model)         swap in a rebuilt GPT (its config is what checkpoints record)
      module.set_objective(fn, owner)     own the base loss fn(module, batch) -> {"loss", **logs}; one plugin
      module.add_loss_term(name, fn)      add fn(module, batch, out) -> {"loss": term, **logs} to the loss,
                                          after the objective, in the order terms were added
      module.add_trainable(name, nn_module)  train extra parameters that are not part of the model
    """

    def prepare(self, module: Any, datamodule: Any) -> None: ...


def hook(mod: types.ModuleType, name: str) -> Callable | None:
    """A plugin's contract hook `name`, or None when the plugin does not define it."""
    fn = getattr(mod, name, None)
    return fn if callable(fn) else None


def check_plugins(cfg: Any, mods: dict[str, types.ModuleType]) -> None:
    """The one place where plugin settings and combinations are refused, at config time (one-line ConfigError)."""
    for name, mod in mods.items():
        for other, why in getattr(mod, "CONFLICTS", {}).items():
            if other in mods:
                raise ConfigError(f"plugins '{name}' and '{other}' cannot be combined: {why}")
    needs_full = [name for name, mod in mods.items() if hook(mod, "needs_full_weights") and mod.needs_full_weights(cfg)]
    if needs_full:
        from microgpt.training.strategies import shards_parameters

        sharded = shards_parameters((cfg.get("trainer") or {}).get("strategy"))
        if sharded:
            raise ConfigError(
                f"plugin {needs_full[0]} needs whole weight matrices on every rank, but trainer.strategy ({sharded}) "
                "shards them; use strategy=auto, ddp or deepspeed (stage 1/2)"
            )
    for mod in mods.values():
        check = hook(mod, "check_config")
        if check is not None:
            check(cfg)


def converter_owners(model: Any) -> Iterator[types.ModuleType]:
    """The plugin packages whose registered converters `model` records, each once, in converter order."""
    from microgpt.registry import CONVERTER

    seen: list[str] = []
    for spec in model.config.converters:
        name = spec.get("name")
        if name not in CONVERTER:
            continue
        parts = CONVERTER.get(name).__module__.split(".")
        if parts[0] == NAMESPACE and len(parts) > 1 and parts[1] not in seen:
            seen.append(parts[1])
            yield importlib.import_module(f"{NAMESPACE}.{parts[1]}")


def bake(model: Any) -> Any:
    """`model` with every plugin converter folded into plain weights where its plugin knows how (`bake`)."""
    for mod in converter_owners(model):
        fn = hook(mod, "bake")
        if fn is not None:
            model = fn(model)
    return model


def quantizer(model: Any) -> types.ModuleType | None:
    """The plugin that writes `model`'s quantized artifact (`write_quantized`), if one of its converters has one."""
    for mod in converter_owners(model):
        if hook(mod, "write_quantized") is not None:
            return mod
    return None


def artifact_reader(path: str | os.PathLike) -> types.ModuleType | None:
    """The available plugin whose `QUANTIZED_ARTIFACT` has `path`'s suffix (it reads it with `load_quantized`)."""
    suffix = Path(path).suffix
    for plugin in available():
        mod = load_plugin(plugin)
        artifact = getattr(mod, "QUANTIZED_ARTIFACT", None)
        if artifact and Path(artifact).suffix == suffix and hook(mod, "load_quantized") is not None:
            return mod
    return None
