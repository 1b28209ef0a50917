"""The shipped Hydra configs: they all compose and resolve, presets are diffs over base, plugins stay in
their own keys, the typed model schema rejects bad settings with one line, the baby-GPT experiment
matches nanoGPT's published settings, and the lr schedule matches nanoGPT's get_lr."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from functools import partial
from pathlib import Path

import pytest
import yaml
from conftest import CONF
from hydra import compose as hcompose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError

from microgpt.errors import ConfigError

# ---- discovering what is shipped ------------------------------------------------------------------


def _defaults_groups(config_file: Path) -> set[str]:
    """Config groups named in a primary config's defaults list (`- model: micro`, `- override x: y`)."""
    groups = set()
    for entry in yaml.safe_load(config_file.read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                key = key.split()[-1]  # drop `override` / `optional`
                groups.add(key.lstrip("/"))
    return groups


TRAIN_GROUPS = _defaults_groups(CONF / "train.yaml")
ROOT_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml") if not p.stem.endswith("_base"))  # train, generate, ...
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)
PLUGIN_NAMES = sorted(p.stem for p in (CONF / "plugin").glob("*.yaml"))
MODEL_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _override_for(path: Path) -> str | None:
    """conf/GROUP/NAME.yaml -> the CLI override that selects it."""
    group = path.parent.relative_to(CONF).as_posix()
    # a group already in train.yaml's defaults (or one of Hydra's own) is swapped; others are appended
    plus = "" if group in TRAIN_GROUPS or group.startswith("hydra/") else "+"
    return f"{plus}{group}={path.stem}"


GROUP_OVERRIDES = [o for o in map(_override_for, GROUP_FILES) if o is not None]


def _leaves(node, prefix=()) -> dict[tuple, object]:
    """{path tuple: value} for every leaf of a container (lists are leaves; empty dicts are leaves too)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: node}


OUT = "/tmp/microgpt-test-config/run"  # paths.output_dir; composing creates nothing there


@functools.cache
def _composed(config_name: str, overrides: tuple[str, ...]) -> tuple[DictConfig, dict[str, str]]:
    """Compose once per (config, overrides): composition is the slow part of this file.

    Returns the config as the task function sees it (no `hydra` node; read-only, as it is shared) and
    Hydra's record of the group choices."""
    ov = [*overrides, f"paths.output_dir={OUT}"] if config_name == "train" else list(overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(config_name=config_name, overrides=ov, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_readonly(cfg, True)
    return cfg, choices


def cfg_of(*overrides: str, name: str = "train") -> DictConfig:
    return _composed(name, overrides)[0]


def container(*overrides: str) -> dict:
    return OmegaConf.to_container(cfg_of(*overrides), resolve=False)


def _resolve_all(cfg: DictConfig) -> dict:
    """Resolve every interpolation except Hydra's runtime ones (no Hydra app is running here)."""
    runtime = [p for p, v in _leaves(OmegaConf.to_container(cfg)).items() if isinstance(v, str) and "${hydra:" in v]
    if runtime:
        cfg = copy.deepcopy(cfg)
        OmegaConf.set_readonly(cfg, False)
        OmegaConf.set_struct(cfg, False)
        for path in runtime:
            OmegaConf.update(cfg, ".".join(path), OUT, merge=False)
    return OmegaConf.to_container(cfg, resolve=True)


# ---- every shipped config composes and resolves -----------------------------------------------------


def test_discovery_finds_the_shipped_groups():
    # guards the globbing itself: if it found nothing, the parametrized tests below would be vacuous
    assert {"model=nano", "model=micro", "data=text", "debug=fast", "experiment=shakespeare_baby"} <= set(
        GROUP_OVERRIDES
    )
    assert {"train", "generate", "evaluate"} <= set(ROOT_CONFIGS)
    assert _override_for(CONF / "plugin" / "x.yaml") == "+plugin=x"  # not in train.yaml's defaults: appended
    # the presets' shared bases are no choices (they would show in `--help` as `model: base, ...`)
    assert not any(o.endswith("=base") for o in GROUP_OVERRIDES)


@pytest.mark.parametrize("override", GROUP_OVERRIDES)
def test_every_group_option_composes_and_resolves(override):
    group, _, name = override.lstrip("+").partition("=")
    assert _composed("train", (override,))[1].get(group) == name  # the choice took effect
    resolved = _resolve_all(cfg_of(override))
    assert resolved["paths"]["output_dir"] == OUT
    assert {"model", "data", "optimizer", "trainer", "scheduler", "seed"} <= set(resolved)


@pytest.mark.parametrize("name", ROOT_CONFIGS)
def test_every_root_config_composes_and_resolves(name):
    overrides = () if name == "train" else ("++ckpt=x",)
    resolved = _resolve_all(cfg_of(*overrides, name=name))
    if name != "train":
        assert resolved["ckpt"] == "x"
    else:
        assert {"model", "data", "optimizer", "trainer", "callbacks", "paths"} <= set(resolved)


def test_resolve_all_really_resolves():
    # a dangling interpolation must fail, or the tests above would prove nothing
    cfg = copy.deepcopy(cfg_of())
    assert _resolve_all(cfg)["data"]["block_size"] == cfg.model.block_size  # interpolations are followed
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.broken = "${does.not.exist}"
    with pytest.raises(InterpolationKeyError):
        _resolve_all(cfg)


def test_data_presets_name_registered_sources_and_options():
    """A preset's source_options must be parameters of its source (a stale inherited option breaks data=X)."""
    import microgpt.data  # noqa: F401  (registers sources and tokenizers)
    from microgpt.registry import SOURCE, TOKENIZER

    presets = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
    assert presets
    for preset in presets:
        d = container(f"data={preset}")["data"]
        assert d["tokenizer"] in TOKENIZER, f"data={preset}: unknown tokenizer {d['tokenizer']!r}"
        if "source" not in d:  # a data module of its own (data=chat reads JSONL examples, not a text source)
            from hydra.utils import get_class

            assert get_class(d["_target_"]).__name__ != "TokenDataModule", f"data={preset}: no source"
            continue
        assert d["source"] in SOURCE, f"data={preset}: unknown source {d['source']!r}"
        params = inspect.signature(SOURCE.get(d["source"])).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        bad = set(d.get("source_options") or {}) - set(params)
        assert not bad, f"data={preset}: source {d['source']!r} takes no option(s) {sorted(bad)}"


def test_model_presets_build_valid_configs():
    from microgpt.registry import ATTENTION, MLP, NORM, POSITION
    from microgpt.train import model_config

    for preset in MODEL_PRESETS:
        cfg = model_config(cfg_of(f"model={preset}"), 65)
        for reg, value in ((ATTENTION, cfg.attention), (MLP, cfg.mlp), (NORM, cfg.norm), (POSITION, cfg.position)):
            assert value in reg, f"model={preset}: {reg.kind} {value!r} is not registered"
        raw = yaml.safe_load((CONF / "model" / f"{preset}.yaml").read_text())
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if key in raw:
                assert getattr(cfg, key) == raw[key], (preset, key)


# ---- presets are diffs over base ----------------------------------------------------------------------


BASE_KEYS = set(yaml.safe_load((CONF / "model_base.yaml").read_text()))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_preset_is_a_small_diff_over_base(preset):
    raw = yaml.safe_load((CONF / "model" / f"{preset}.yaml").read_text()) or {}
    defaults = raw.pop("defaults", [])
    assert "/model_base@_here_" in defaults, f"model/{preset}.yaml must start from model_base"
    assert len(raw) < len(BASE_KEYS), f"model/{preset}.yaml restates base instead of a diff"
    assert set(raw) <= BASE_KEYS, f"model/{preset}.yaml sets keys base does not have: {sorted(set(raw) - BASE_KEYS)}"


# ---- plugins write only their own keys ----------------------------------------------------------------


def _plugin_violations(before: dict, after: dict, name: str) -> list[str]:
    """Leaf paths that differ between two configs and lie outside the plugin's own keys."""
    allowed = (("plugins", name), ("callbacks", name), ("model", "converters", name))
    lb, la = _leaves(before), _leaves(after)
    changed = {p for p in set(lb) | set(la) if lb.get(p, KeyError) != la.get(p, KeyError)}
    # an empty dict leaf that gained children shows up as a vanished leaf; that is the parent, not a write
    changed = {p for p in changed if not (p in lb and p not in la and lb[p] == {})}
    return sorted(".".join(p) for p in changed if not any(p[: len(a)] == a for a in allowed))


def _plugin_writes(before: dict, after: dict, name: str) -> list[str]:
    lb, la = _leaves(before), _leaves(after)
    return sorted(".".join(p) for p in la if p not in lb or lb[p] != la[p])


def test_plugin_key_walker_detects_violations():
    before = container()
    after = copy.deepcopy(before)
    after["plugins"]["fake"] = {"alpha": 1}
    after["callbacks"]["fake"] = {"_target_": "x.Y"}
    after["model"]["converters"]["fake"] = {"scheme": "8da4w"}
    assert _plugin_violations(before, after, "fake") == []
    assert _plugin_writes(before, after, "fake")  # and it sees the allowed writes
    after["trainer"]["max_steps"] = 7  # changed a shared setting
    after["plugins"]["other"] = {"x": 1}  # wrote another plugin's key
    after["callbacks"]["fakeish"] = {}  # a prefix of the name is not the name
    after["fake"] = {"y": 1}  # a yaml without `# @package _global_` lands at the root
    del after["seed"]  # removed a key
    assert _plugin_violations(before, after, "fake") == [
        "callbacks.fakeish",
        "fake.y",
        "plugins.other.x",
        "seed",
        "trainer.max_steps",
    ]


@pytest.mark.parametrize("name", PLUGIN_NAMES)
def test_plugin_yaml_writes_only_its_own_keys(name):
    before, after = container(), container(f"+plugin={name}")
    assert _plugin_violations(before, after, name) == []
    assert _plugin_writes(before, after, name), f"+plugin={name} composed nothing"
    assert name in after["plugins"], f"conf/plugin/{name}.yaml must put its settings under plugins.{name}"


# ---- the typed model schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "vocab", "names"),
    [
        (["model.n_layer=abc"], 65, ["n_layer"]),
        (["+model.n_layerz=3"], 65, ["n_layerz"]),
        (["model.n_embd=100", "model.n_head=3"], 65, ["n_embd", "n_head"]),
        (["model.n_head=4", "model.n_kv_head=3", "model.attention=gqa"], 65, ["n_head", "n_kv_head"]),
        (["model.vocab_size=50"], 65, ["vocab_size", "65"]),
    ],
    ids=["not-an-int", "unknown-key", "embd-not-divisible", "kv-heads-not-divisible", "vocab-too-small"],
)
def test_model_config_rejects_bad_settings(overrides, vocab, names):
    from microgpt.train import model_config

    cfg = cfg_of("model=nano", *overrides)
    with pytest.raises(ConfigError) as ei:
        model_config(cfg, vocab)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg
    for n in names:
        assert n in msg, (n, msg)


def test_model_config_accepts_good_settings():
    # the control for the test above: the same path succeeds on a valid config
    from microgpt.train import model_config

    cfg = model_config(cfg_of("model=nano", "model.n_kv_head=1", "model.attention=gqa"), 65)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.vocab_size) == (2, 2, 1, 32, 65)
    assert model_config(cfg_of("model=nano", "model.vocab_size=80"), 65).vocab_size == 80


# ---- experiment=shakespeare_baby is nanoGPT's baby GPT -------------------------------------------------


def test_shakespeare_baby_matches_nanogpt():
    import torch

    from microgpt.model import GPT
    from microgpt.train import model_config

    cfg = cfg_of("experiment=shakespeare_baby")
    m, d, o, s, t = cfg.model, cfg.data, cfg.optimizer, cfg.scheduler, cfg.trainer
    # values from ../shared/BENCHMARKS.md ("Training speed and quality, CPU")
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (4, 4, 128, 64)
    assert m.dropout == 0.0 and m.bias is False and m.tie_embeddings is True
    assert (m.position, m.mlp, m.norm, m.attention) == ("learned", "gelu", "layernorm", "mha")
    assert m.n_kv_head in (None, 4) and not m.converters
    assert d.batch_size == 12 and d.tokenizer == "char" and d.val_fraction == pytest.approx(0.1)
    assert d.block_size == 64 and d.eval_batches == 20
    assert o.lr == pytest.approx(1e-3) and s.min_lr == pytest.approx(1e-4)
    assert s.warmup_steps == 100 and s.decay_steps == 2000
    assert list(o.betas) == pytest.approx([0.9, 0.99]) and o.weight_decay == pytest.approx(0.1)
    assert cfg.decay_embeddings is True  # nanoGPT's configure_optimizers decays every 2-D parameter
    # precision=auto: fp32 like nanoGPT's CPU run, bf16-mixed only where the CPU has bf16 arithmetic (issue 9)
    assert t.gradient_clip_val == pytest.approx(1.0) and t.precision == "auto"
    assert t.val_check_interval == 250 and t.max_steps == 2000
    assert t.accumulate_grad_batches == 1
    # 0.80M parameters at vocab 65, counted by hand: per block qkv 128*384 + proj 128^2 + mlp 2*128*512 +
    # two bias-free LayerNorms 2*128; plus wte 65*128 and ln_f 128 (tied head); nanoGPT leaves wpe out
    per_block = 128 * 384 + 128 * 128 + 2 * 128 * 512 + 2 * 128
    expected_no_wpe = 4 * per_block + 65 * 128 + 128
    torch.manual_seed(0)
    model = GPT(model_config(cfg, 65))
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_no_wpe + 64 * 128
    assert round(expected_no_wpe / 1e6, 2) == 0.80


# ---- the learning-rate schedule ------------------------------------------------------------------------


def nanogpt_get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's train.py get_lr, restated."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize(
    ("lr", "warmup", "decay", "min_lr"),
    [(1e-3, 100, 2000, 1e-4), (6e-4, 0, 500, 6e-5), (1e-2, 10, 11, 0.0), (3e-4, 50, 300, 3e-4)],
)
def test_lr_lambda_matches_nanogpt(lr, warmup, decay, min_lr):
    from microgpt.lit import lr_lambda

    for it in range(decay + 200):
        want = nanogpt_get_lr(it, lr, warmup, decay, min_lr)
        got = lr * lr_lambda(it, warmup_steps=warmup, decay_steps=decay, min_lr_ratio=min_lr / lr)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), it


def test_module_scheduler_follows_nanogpt():
    """The LambdaLR that LitGPT hands Lightning gives get_lr(it) at optimizer step it."""
    import torch

    from microgpt.config import GPTConfig
    from microgpt.lit import LitGPT

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    module = LitGPT(
        model=cfg.to_dict(),
        optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.1),
        warmup_steps=5,
        decay_steps=40,
        min_lr=2e-4,
    )
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    for it in range(60):
        want = nanogpt_get_lr(it, 2e-3, 5, 40, 2e-4)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([want] * len(opt.param_groups), rel=1e-9), it
        opt.step()
        sched.step()


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_groups(decay_embeddings):
    """Decay on the matrices that multiply activations; embeddings only with decay_embeddings (nanoGPT's way)."""
    import torch

    from microgpt.config import GPTConfig
    from microgpt.lit import LitGPT

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True)
    module = LitGPT(
        model=cfg.to_dict(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        decay_embeddings=decay_embeddings,
    )
    opt = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    linears = {
        f"model.blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    }
    embeddings = {"model.wte.weight", "model.pos.wpe.weight"}
    assert by_wd[0.1] == (linears | embeddings if decay_embeddings else linears)
    rest = set(names.values()) - by_wd[0.1]
    assert rest == by_wd[0.0] and all(n.endswith("bias") or "norm" in n or n in embeddings for n in rest)
    assert any(n.endswith("bias") for n in rest) and any("norm" in n for n in rest)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_by_dimension_keeps_the_groups_of_every_shipped_preset(decay_embeddings):
    """Decay is chosen by tensor dimension (nanoGPT): the shipped presets get the groups they had under the
    old name rule (matrices but not the embedding tables, unless decay_embeddings), and a plugin's matrix
    whose name happens to contain "emb" is decayed like any matrix."""
    import torch

    from microgpt.lit import LitGPT
    from microgpt.train import model_config

    for preset in MODEL_PRESETS:
        mcfg = model_config(cfg_of(f"model={preset}", "model.n_layer=2", "model.block_size=16"), 65)
        module = LitGPT(
            model=mcfg.to_dict(),
            optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
            decay_embeddings=decay_embeddings,
        )
        module.add_trainable("emb_proj", torch.nn.Linear(4, 4, bias=True))
        opt = module.configure_optimizers()["optimizer"]
        names = {id(p): n for n, p in module.named_parameters()}
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
        # the old rule, written out: 2-D and (decay_embeddings or no "wte"/"wpe"/"emb" in the name)
        old = {
            n
            for n, p in module.model.named_parameters(prefix="model")
            if p.dim() >= 2 and (decay_embeddings or not any(s in n for s in ("wte", "wpe", "emb")))
        }
        assert decayed == old | {"emb_proj.weight"}, preset
        assert ("model.wte.weight" in decayed) is decay_embeddings
