"""The plugin contract (microgpt.plugins, LitGPT's contract methods): the shipped plugins use only it, and
each contract method does what it says."""

from __future__ import annotations

import ast
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose

from microgpt.config import GPTConfig
from microgpt.errors import ConfigError
from microgpt.plugins import check_plugins, load_plugin
from microgpt.training.lit import LitGPT
from microgpt.training.strategies import shards_parameters

PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file())
CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def _sources(name: str) -> list[Path]:
    return sorted((ROOT / "plugins" / name).rglob("*.py"))


def violations(text: str, others: list[str]) -> list[str]:
    """Where plugin source `text` steps outside the contract: `.hparams`, assigning some module's `.model` or
    `.objective`, or a config key of another plugin (plugins.X / callbacks.X / model.converters.X)."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Attribute) and node.attr == "hparams":
            found.append(f"line {node.lineno}: .hparams")
        for t in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(t, ast.Attribute) and t.attr in ("model", "objective"):
                if not (isinstance(t.value, ast.Name) and t.value.id == "self"):
                    found.append(f"line {t.lineno}: assigns .{t.attr}")
    if others:
        key = re.compile(rf"""(plugins|callbacks|converters)(\.|\[["']|\.get\(["'])({"|".join(others)})\b""")
        found += [f"another plugin's key {m.group(0)!r}" for m in key.finditer(text)]
    return found


@pytest.mark.parametrize("name", PLUGINS)
def test_shipped_plugins_use_only_the_contract(name):
    """No plugin touches `module.hparams`, assigns a LightningModule's model or objective (it calls
    replace_model / set_objective), or reads another plugin's config keys."""
    assert {"distill", "prune", "qat", "share"} <= set(PLUGINS)
    others = [p for p in PLUGINS if p != name]
    for f in _sources(name):
        assert violations(f.read_text(), others) == [], f.relative_to(ROOT)


def test_the_walk_catches_what_it_forbids():
    bad = (
        "def prepare(self, module, dm, cfg):\n"
        "    module.hparams['model'] = {}\n"
        "    module.objective = f\n"
        "    module.model = g\n"
        "    self.model = h\n"
        "    return cfg.plugins.get('prune'), cfg.callbacks.qat\n"
    )
    assert sorted(violations(bad, ["prune", "qat"])) == [
        "another plugin's key \"plugins.get('prune\"",
        "another plugin's key 'callbacks.qat'",
        "line 2: .hparams",
        "line 3: assigns .objective",
        "line 4: assigns .model",
    ]


def _module(**kw) -> LitGPT:
    return LitGPT(model=CFG.to_dict(), optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), **kw)


def test_add_converter_applies_and_records_it_in_hparams_and_checkpoints():
    load_plugin("prune")  # registers the `prune` converter
    module = _module()
    module.add_converter({"name": "prune", "targets": ["blocks.*.weight"], "enabled": True})
    spec = {"name": "prune", "targets": ["blocks.*.weight"], "enabled": True}
    assert module.model.config.converters == [spec]
    assert hasattr(module.model, "prune_masks")
    assert module.hparams["model"]["converters"] == [spec]
    ckpt = {"hyper_parameters": {"model": CFG.to_dict()}}  # a stale record is replaced from the model
    module.on_save_checkpoint(ckpt)
    assert ckpt["hyper_parameters"]["model"]["converters"] == [spec]


def test_replace_model_is_what_checkpoints_record():
    from microgpt.model import build_model

    module = _module()
    new = build_model(GPTConfig.from_dict({**CFG.to_dict(), "n_unique_layers": 1}))
    module.replace_model(new)
    assert module.model is new
    ckpt = {"hyper_parameters": {}}
    module.on_save_checkpoint(ckpt)
    assert ckpt["hyper_parameters"]["model"]["n_unique_layers"] == 1
    assert module.hparams["model"]["n_unique_layers"] == 1


def test_objective_has_one_owner_and_loss_terms_add_in_order():
    module = _module()
    x = torch.randint(0, 11, (2, 8))
    calls = []

    def objective(m, batch):
        calls.append("objective")
        return {"loss": torch.tensor(1.0), "ce": torch.tensor(1.0)}

    def term(name, value):
        def fn(m, batch, out):
            calls.append(name)
            return {"loss": torch.tensor(value), name: torch.tensor(value)}

        return fn

    module.set_objective(objective, owner="a")
    module.set_objective(objective, owner="a")  # the same plugin again (prepare run twice) is fine
    with pytest.raises(ConfigError, match="both replace the training objective"):
        module.set_objective(objective, owner="b")
    module.add_loss_term("t1", term("t1", 0.5))
    module.add_loss_term("t2", term("t2", 0.25))
    with pytest.raises(ConfigError, match="already added"):
        module.add_loss_term("t1", term("t1", 0.5))
    out = module.compute_loss((x, x))
    assert calls == ["objective", "t1", "t2"]
    assert float(out["loss"]) == 1.75 and set(out) == {"loss", "ce", "t1", "t2"}


def test_add_trainable_refuses_a_taken_name():
    module = _module()
    module.add_trainable("proj", torch.nn.Linear(8, 4))
    assert any(n.startswith("proj.") for n, _ in module.named_parameters())
    with pytest.raises(ConfigError, match="already has an attribute"):
        module.add_trainable("model", torch.nn.Linear(8, 4))


@pytest.mark.parametrize(
    "strategy, sharded",
    [
        ("auto", False),
        ("ddp", False),
        ("deepspeed", False),
        ("deepspeed_offload", False),
        ("fsdp", True),
        ("deepspeed_stage_3", True),
    ],
)
def test_one_answer_to_does_the_strategy_shard_parameters(strategy, sharded, tmp_path):
    cfg = compose([f"strategy={strategy}"], tmp_path)
    assert bool(shards_parameters(cfg.trainer.strategy)) is sharded
    assert shards_parameters("deepspeed_stage_3_offload") and shards_parameters("fsdp")
    assert not shards_parameters("deepspeed_stage_2") and not shards_parameters(None)


@pytest.mark.parametrize("plugin", ["qat", "prune"])
def test_plugins_that_need_whole_weights_are_refused_with_sharding_strategies_at_config_time(plugin, tmp_path):
    mods = {plugin: load_plugin(plugin)}
    check_plugins(compose(["model=nano", f"+plugin={plugin}", "strategy=ddp"], tmp_path), mods)
    with pytest.raises(ConfigError, match=rf"plugin {plugin} needs whole weight matrices.*fsdp"):
        check_plugins(compose(["model=nano", f"+plugin={plugin}", "strategy=fsdp"], tmp_path), mods)


def test_core_modules_name_no_plugin():
    """report and export reach plugins only through the contract (bake, quantized artifacts)."""
    for f in ("src/microgpt/report.py", "src/microgpt/io/export.py"):
        code = "\n".join(
            ln for ln in (ROOT / f).read_text().splitlines() if not ln.lstrip().startswith(("#", '"', "'"))
        )
        for name in PLUGINS:
            assert f'load_plugin("{name}")' not in code and f"microgpt_plugins.{name}" not in code, (f, name)
