"""Which plugins on the plugin path register a component name: read from their source text, not imported
(an unknown name must not run every plugin on the path)."""

from __future__ import annotations

import re
from pathlib import Path


def plugins_registering(kind_attr: str | None, name: str) -> list[str]:
    """Plugin folders whose .py files contain `<REGISTRY>.register("name")` (any registry when kind_attr is
    None), on MICROGPT_PLUGIN_PATH and the default plugin folders."""
    from microgpt.plugins import plugin_dirs

    reg = re.escape(kind_attr) if kind_attr else r"[A-Z_]+"
    pattern = re.compile(rf"\b{reg}\.register\(\s*['\"]{re.escape(name)}['\"]")
    found = []
    for d in plugin_dirs():
        for pkg in sorted(Path(d).iterdir()):
            if not (pkg / "__init__.py").is_file() or pkg.name in found:
                continue
            for f in pkg.rglob("*.py"):
                try:
                    if pattern.search(f.read_text(encoding="utf-8", errors="replace")):
                        found.append(pkg.name)
                        break
                except OSError:
                    continue
    return found


def hint(kind_attr: str | None, name: str) -> str:
    """The tail of an `unknown <kind> 'name'` error: which +plugin= would provide it."""
    names = plugins_registering(kind_attr, name)
    if names:
        opts = " or ".join(f"+plugin={n}" for n in names)
        return f"; '{name}' is registered by plugin {', '.join(names)}: add {opts} (a plugin's components exist only once it is enabled)"
    return "; a component from a plugin needs +plugin=NAME (its folder on MICROGPT_PLUGIN_PATH), or register your own"


def model_plugins(mods: dict, model_config) -> dict:
    """The subset of the enabled plugins `mods` {name: module} that the model itself needs to be rebuilt:
    those registering its attention/mlp/norm/position component or one of its converters. A plugin that
    only changes training (an objective, a callback) is no load-time dependency of the checkpoint."""
    from microgpt.registry import ATTENTION, CONVERTER, MLP, NORM, POSITION

    used = []
    for reg, name in ((ATTENTION, model_config.attention), (MLP, model_config.mlp), (NORM, model_config.norm)):
        used.append(reg._entries.get(name))
    used.append(POSITION._entries.get(model_config.position))
    used += [CONVERTER._entries.get(c.get("name")) for c in model_config.converters or []]
    modules = {getattr(obj, "__module__", "") for obj in used if obj is not None}
    prefix = "microgpt_plugins."
    return {
        n: m for n, m in mods.items() if any(mod == prefix + n or mod.startswith(prefix + n + ".") for mod in modules)
    }
