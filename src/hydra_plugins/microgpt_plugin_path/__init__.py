"""Plugins in one step: a plugin folder on MICROGPT_PLUGIN_PATH may carry its own config.

Hydra finds this module through the `hydra_plugins` namespace. For every folder on the plugin path
(microgpt.plugins.plugin_dirs: $MICROGPT_PLUGIN_PATH, ./plugins, the repository's plugins/):
  NAME/plugin.yaml   becomes the `plugin/NAME` config, so `+plugin=NAME` composes it;
  NAME/conf/         is added to the config search path as it is (any groups: conf/model/x.yaml, ...).
No `hydra.searchpath=[file://...]` is needed. The repository's own conf/ comes first, so a shipped
conf/plugin/NAME.yaml wins over a plugin.yaml of the same name.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

SCHEME = "microgpt-plugins"
GROUP = "plugin"
FILE = "plugin.yaml"


def _plugin_dirs() -> list[str]:
    try:
        from microgpt.plugins import plugin_dirs
    except ImportError:  # microgpt not importable: nothing to add
        return []
    return plugin_dirs()


def plugin_yamls() -> dict[str, Path]:
    """NAME -> NAME/plugin.yaml for the plugin folders on the path (the first folder with NAME wins)."""
    found: dict[str, Path] = {}
    for d in _plugin_dirs():
        for pkg in sorted(Path(d).iterdir()):
            f = pkg / FILE
            if pkg.name not in found and f.is_file() and (pkg / "__init__.py").is_file():
                found[pkg.name] = f
    return found


class PluginYamlSource(ConfigSource):
    """A read-only config tree with one group, `plugin`, whose options are the plugin.yaml files."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _name(self, config_path: str) -> str | None:
        p = self._normalize_file_name(config_path).strip("/")
        group, _, file = p.rpartition("/")
        if group != GROUP or not file.endswith(".yaml"):
            return None
        return file[: -len(".yaml")]

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._name(config_path)
        f = plugin_yamls().get(name) if name else None
        if f is None:
            raise ConfigLoadError(f"Config not found: {config_path}")
        text = f.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(OmegaConf.load(f) or {}),
            path=f"file://{f.parent}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        p = config_path.strip("/")
        return p == "" or (p == GROUP and bool(plugin_yamls()))

    def is_config(self, config_path: str) -> bool:
        name = self._name(config_path)
        return name is not None and name in plugin_yamls()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        p = config_path.strip("/")
        if p == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) and plugin_yamls() else []
        if p == GROUP and results_filter in (None, ObjectType.CONFIG):
            return sorted(plugin_yamls())
        return []


class PluginPathSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="microgpt-plugin-yaml", path=f"{SCHEME}://")
        seen = set()
        for d in _plugin_dirs():
            for pkg in sorted(Path(d).iterdir()):
                conf = pkg / "conf"
                if conf.is_dir() and (pkg / "__init__.py").is_file() and conf not in seen:
                    seen.add(conf)
                    search_path.append(provider=f"microgpt-plugin-{pkg.name}", path=f"file://{os.fspath(conf)}")
