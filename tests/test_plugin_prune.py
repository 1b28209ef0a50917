"""The prune plugin against independent references: the cubic schedule formula, sorted magnitudes,
naive per-index importance sums and a finite-difference loss change, models with the removed
heads / neurons / layers zeroed by hand, identical key/value heads, and real training runs."""

from __future__ import annotations

import itertools
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SHAKESPEARE, compose, run_cli

import microgpt
from microgpt.config import GPTConfig
from microgpt.errors import ConfigError
from microgpt.model import GPT, build_model
from microgpt.plugins import check_plugins, load_plugin

prune = load_plugin("prune")
V = 13


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, **kw) -> GPT:
    d = dict(vocab_size=V, block_size=8, n_layer=3, n_head=4, n_embd=16)
    d.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**d)).eval()


def randomize(model: GPT, seed: int = 1) -> GPT:
    """Non-trivial norms and biases too (the init leaves them at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(seed=2, b=3, t=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


# ---------------------------------------------------------------- unstructured


def test_sparsity_schedule_is_zhu_gupta_cubic():
    s_i, s_f, t0, t1 = 0.1, 0.8, 10, 50
    for t in [0, 9, 10, 11, 20, 30, 37, 49, 50, 51, 500]:
        if t < t0:
            want = s_i
        elif t >= t1:
            want = s_f
        else:  # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
            want = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3
        assert prune.sparsity_at(t, s_f, t0, t1, s_i) == pytest.approx(want, abs=1e-12)
    assert prune.sparsity_at(30, 0.8, 10, 50) == pytest.approx(0.8 * (1 - 0.5**3))
    ups = [t for t in range(100) if prune.unstructured.is_update_step(t, 10, 45, 10)]
    assert ups == [10, 20, 30, 40, 45]


def masked_model(**kw) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16), **kw})
    cfg.converters = [{"name": "prune", "targets": ["blocks.*.weight"]}]
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_masks_remove_the_smallest_weights_and_only_grow(scope):
    model = masked_model()
    names = [n for n, _ in model.prune_masks.items()]
    assert names and all(n.startswith("blocks.") and n.endswith(".weight") for n in names)
    assert all(model.get_parameter(n).dim() == 2 for n in names)  # norm vectors are never masked
    orig = {n: model.get_parameter(n).detach().clone() for n in names}
    prune.update_masks_(model, 0.3, scope)
    first = {n: m.clone() for n, m in model.prune_masks.items()}
    prune.update_masks_(model, 0.6, scope)
    groups = [[n] for n in names] if scope == "layer" else [names]
    for group in groups:
        w = torch.cat([orig[n].flatten() for n in group]).abs()
        keep = torch.cat([model.prune_masks.get_buffer(n.replace(".", "__")).flatten() for n in group])
        assert int((~keep).sum()) == round(0.6 * w.numel())
        assert w[~keep].max() <= w[keep].min()  # every pruned |w| is below every kept one
    for n, m in model.prune_masks.items():
        p = model.get_parameter(n)
        assert torch.equal(p[~m], torch.zeros_like(p[~m]))  # pruned weights are zero
        assert torch.equal(p[m], orig[n][m])  # kept weights untouched
        assert not (~first[n] & m).any()  # pruned once -> pruned for good
    if scope == "layer":
        assert prune.sparsity_of(model) == pytest.approx(0.6, abs=1e-3)


def test_masks_survive_strict_state_dict_loading():
    model = masked_model()
    prune.update_masks_(model, 0.5)
    sd = model.state_dict()
    assert any(k.startswith("prune_masks.") for k in sd)
    fresh = build_model(model.config)  # what microgpt.load does: replay converters, then strict load
    assert all(m.all() for _, m in fresh.prune_masks.items())
    fresh.load_state_dict(sd, strict=True)
    for (_, m1), (_, m2) in zip(model.prune_masks.items(), fresh.prune_masks.items()):
        assert torch.equal(m1, m2) and not m1.all()
    x, _ = batch()
    assert torch.equal(model(x), fresh(x))
    # weights stored unmasked (DeepSpeed's fp32 master copy) are masked as they load
    dense = {k: (torch.randn_like(v) if k.endswith(".weight") else v) for k, v in sd.items()}
    fresh.load_state_dict(dense, strict=True)
    for n, m in fresh.prune_masks.items():
        p = fresh.get_parameter(n)
        assert torch.equal(p[~m], torch.zeros_like(p[~m])) and torch.equal(p[m], dense[n][m])
    with pytest.raises(RuntimeError):  # without the converter the masks are unexpected keys
        GPT(GPTConfig(**{**model.config.to_dict(), "converters": []})).load_state_dict(sd, strict=True)


def test_mask_grads_and_reapply_keep_pruned_weights_zero_under_adamw():
    model = masked_model()
    prune.update_masks_(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(3):
        x, y = batch(seed=s)
        loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
        loss.backward()
        prune.mask_grads_(model)
        for n, m in model.prune_masks.items():
            assert torch.equal(model.get_parameter(n).grad[~m], torch.zeros(int((~m).sum())))
        opt.step()
        opt.zero_grad()
        prune.apply_masks_(model)
    assert prune.sparsity_of(model) == pytest.approx(0.5, abs=1e-3)


def test_l1_term_is_weight_times_mean_abs_of_the_model_it_finds():
    class M:
        model = make()

    term = prune.L1Term(0.5, ["blocks.*.weight"])
    out = term(M, None, {"loss": torch.tensor(2.0)})
    ws = [p for n, p in M.model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    mean_abs = torch.cat([w.detach().abs().flatten() for w in ws]).mean()
    assert float(out["l1"]) == pytest.approx(float(mean_abs), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(0.5 * float(mean_abs), rel=1e-5)
    assert out["loss"].requires_grad
    # another plugin (share) may replace the model after prune's prepare: the term follows it
    M.model = make()
    with torch.no_grad():
        for p in M.model.parameters():
            p.fill_(0.25)
    assert float(term(M, None, {})["l1"]) == pytest.approx(0.25)


def test_bake_drops_masks_and_converter():
    model = masked_model()
    prune.update_masks_(model, 0.4)
    x, _ = batch()
    ref = model(x)
    baked = prune.bake_masks(model)
    assert not hasattr(baked, "prune_masks") and baked.config.converters == []
    assert torch.equal(baked(x), ref)
    GPT(baked.config).load_state_dict(baked.state_dict(), strict=True)


# ---------------------------------------------------------------- importance scores


def naive_units(
    model: GPT, t: dict[str, torch.Tensor], b: int, structure: str, mode: str, out_only: bool
) -> list[float]:
    """Per-unit sums by explicit index lists (the reference for importance.unit_sums). out_only: only the
    weights whose zeroing removes the unit (proj columns; a block's proj weights and biases)."""
    c = model.config
    nh, nkv, hd, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
    get = lambda name: t.get(f"blocks.{b}.{name}")  # noqa: E731
    if structure == "layers":
        outs = [f"blocks.{b}.{m}.proj.{k}" for m in ("attn", "mlp") for k in ("weight", "bias")]
        return [
            sum(float(v.sum()) for k, v in t.items() if k.startswith(f"blocks.{b}.") and (not out_only or k in outs))
        ]
    if structure == "mlp":
        out = []
        for j in range(c.hidden_dim):
            s = sum(float(get("mlp.proj.weight")[r, j]) for r in range(C))
            for name in ("mlp.fc", "mlp.gate") if not out_only else ():
                if get(f"{name}.weight") is not None:
                    s += sum(float(get(f"{name}.weight")[j, col]) for col in range(C))
                if get(f"{name}.bias") is not None:
                    s += float(get(f"{name}.bias")[j])
            out.append(s)
        return out

    def rows(start, heads):
        total = 0.0
        if out_only:
            return total
        for h in heads:
            for i in range(hd):
                r = start + h * hd + i
                total += sum(float(get("attn.qkv.weight")[r, col]) for col in range(C))
                if get("attn.qkv.bias") is not None:
                    total += float(get("attn.qkv.bias")[r])
        return total

    def proj_cols(heads):
        return sum(float(get("attn.proj.weight")[r, h * hd + i]) for h in heads for i in range(hd) for r in range(C))

    if mode == "query":
        return [rows(0, [h]) + proj_cols([h]) for h in range(nh)]
    g = nh // nkv
    return [
        rows(0, range(k * g, (k + 1) * g))
        + proj_cols(range(k * g, (k + 1) * g))
        + rows(nh * hd, [k])
        + rows((nh + nkv) * hd, [k])
        for k in range(nkv)
    ]


SCORE_CASES = [
    ({"attention": "mha"}, "group"),
    ({"attention": "gqa", "n_kv_head": 2}, "group"),
    ({"attention": "gqa", "n_kv_head": 2}, "query"),
    ({"attention": "mqa"}, "query"),
]


@pytest.mark.parametrize("arch,mode", SCORE_CASES)
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_scores_match_hand_computed_sums(arch, mode, mlp):
    model = randomize(make(n_layer=2, n_head=4, n_embd=8, bias=True, mlp=mlp, mlp_hidden=6, **arch)).double()
    batches = [batch(seed=s) for s in (3, 4, 5)]
    structures = ("heads", "mlp", "layers")
    # per-batch gradients with a plain autograd loop
    grads = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x).view(-1, V), y.view(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    w = {n: p.detach() for n, p in model.named_parameters()}
    got = {m: prune.importance(model, batches, m, structures, mode) for m in ("magnitude", "taylor", "fisher")}
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were
    for b, s in itertools.product(range(2), structures):
        mag = [v**0.5 for v in naive_units(model, {n: w[n] ** 2 for n in w}, b, s, mode, False)]
        taylor = [
            sum(abs(v) for v in vals) / len(batches)
            for vals in zip(*[naive_units(model, {n: w[n] * g[n] for n in w}, b, s, mode, True) for g in grads])
        ]
        g2 = {n: sum(g[n] ** 2 for g in grads) / len(batches) for n in w}
        fisher = naive_units(model, {n: 0.5 * w[n] ** 2 * g2[n] for n in w}, b, s, mode, True)
        for name, want in (("magnitude", mag), ("taylor", taylor), ("fisher", fisher)):
            have = got[name][s] if s == "layers" else got[name][s][b]
            have = have[b : b + 1] if s == "layers" else have
            assert torch.allclose(have, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12), (name, s, b)


@pytest.mark.parametrize("structure,unit", [("mlp", 3), ("heads", 1), ("layers", 0)])
def test_taylor_score_is_the_first_order_loss_change(structure, unit):
    """|sum w*g| over a unit's output weights ~ |L(unit removed) - L| when those weights are small."""
    model = randomize(make(n_layer=2, n_head=2, n_embd=8, mlp_hidden=8, bias=True)).double()
    blk = model.blocks[unit if structure == "layers" else 0]
    if structure == "mlp":
        outs = [(blk.mlp.proj.weight, (slice(None), unit))]
    elif structure == "heads":
        outs = [(blk.attn.proj.weight, (slice(None), slice(4 * unit, 4 * unit + 4)))]
    else:
        outs = [(t, ...) for m in (blk.attn, blk.mlp) for t in (m.proj.weight, m.proj.bias)]
    with torch.no_grad():
        for t, ix in outs:
            t[ix] *= 1e-4
    x, y = batch()
    scores = prune.importance(model, [(x, y)], "taylor", [structure])[structure]
    score = scores[unit] if structure == "layers" else scores[0, unit]

    def loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(x).view(-1, V), y.view(-1)))

    before = loss()
    with torch.no_grad():  # remove the unit: zero its output weights
        for t, ix in outs:
            t[ix] = 0
    delta = abs(loss() - before)
    assert delta > 1e-9
    assert float(score) == pytest.approx(delta, rel=1e-3)


# ---------------------------------------------------------------- structured pruning


def zeroed_reference(model: GPT, p: dict) -> GPT:
    """The original model with the removed units' contributions zeroed by hand."""
    ref = GPT(model.config).double()
    ref.load_state_dict(model.state_dict())
    c = model.config
    hd = c.head_dim
    with torch.no_grad():
        for b, block in enumerate(ref.blocks):
            if b not in p["layers"]:  # a block whose residual branches output 0 is the identity
                for lin in (block.attn.proj, block.mlp.proj):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            for h in set(range(c.n_head)) - set(p["q"][b]):
                block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
            for j in set(range(c.hidden_dim)) - set(p["neurons"][b]):
                block.mlp.proj.weight[:, j] = 0
    return ref


STRUCT_CASES = [
    dict(attention="mha"),
    dict(attention="gqa", n_kv_head=2),
    dict(attention="mqa"),
    dict(attention="gqa", n_kv_head=2, position="rope", mlp="swiglu", norm="rmsnorm"),
    dict(attention="sliding", window=3, n_kv_head=4),
]


@pytest.mark.parametrize("arch", STRUCT_CASES, ids=lambda a: "-".join(str(v) for v in a.values()))
@pytest.mark.parametrize("bias", [False, True])
def test_physically_pruned_model_equals_zeroed_original(arch, bias):
    model = randomize(make(n_layer=3, n_head=4, n_embd=16, bias=bias, **arch)).double()
    x, y = batch()
    scores = prune.importance(model, [(x, y)], "taylor")
    p = prune.plan(model, scores, heads=0.5, mlp=0.25, layers=1)
    small = prune.apply_plan(model, p)
    c, s = model.config, small.config
    assert s.n_layer == 2 and s.mlp_hidden == c.hidden_dim - c.hidden_dim // 4 and s.head_dim == c.head_dim
    assert s.n_head % s.n_kv_head == 0
    if c.n_kv_head > 1:  # whole k/v groups go
        assert (s.n_head, s.n_kv_head) == (c.n_head // 2, c.n_kv_head // 2)
    else:  # MQA: query heads go, the single k/v head stays
        assert (s.n_head, s.n_kv_head) == (2, 1)
    assert small.num_params() < model.num_params()
    # every removed unit had the lowest scores of its layer
    for b in p["layers"]:
        kept = p["kv"][b] if c.n_kv_head > 1 else p["q"][b]
        dropped = set(range(len(scores["heads"][b]))) - set(kept)
        assert max(float(scores["heads"][b][i]) for i in dropped) <= min(float(scores["heads"][b][i]) for i in kept)
    dropped_layer = (set(range(3)) - set(p["layers"])).pop()
    assert float(scores["layers"][dropped_layer]) == float(scores["layers"].min())
    ref = zeroed_reference(model, p)
    assert torch.allclose(small(x), ref(x), atol=1e-10)
    # the smaller config rebuilds the smaller model (what microgpt.load does)
    GPT(GPTConfig.from_dict(s.to_dict())).double().load_state_dict(small.state_dict(), strict=True)


def test_prune_shared_blocks_heads_and_mlp():
    model = randomize(make(n_layer=4, n_unique_layers=2, n_head=4, n_embd=16)).double()
    x, y = batch()
    scores = prune.importance(model, [(x, y)], "fisher", ["heads", "mlp"])
    assert scores["heads"].shape == (2, 4)
    p = prune.plan(model, scores, heads=2, mlp=0.5)
    small = prune.apply_plan(model, p)
    assert (small.config.n_head, small.config.n_unique_layers, len(small.blocks)) == (2, 2, 2)
    assert torch.allclose(small(x), zeroed_reference(model, p)(x), atol=1e-10)
    with pytest.raises(ConfigError, match="n_unique_layers"):
        prune.plan(model, {**scores, "layers": torch.ones(2)}, layers=1)


def test_structured_pruning_errors_are_clear():
    model = make(n_head=4, n_embd=16)
    s = prune.importance(model, None, "magnitude")
    with pytest.raises(ConfigError, match="removes nothing"):
        prune.plan(model, s, heads=0.05)
    with pytest.raises(ConfigError, match="keep at least one"):
        prune.plan(model, s, heads=4)
    with pytest.raises(ConfigError, match="head_mode=query"):
        prune.plan(model, s, heads=1, mode="query")
    with pytest.raises(ConfigError, match="needs data"):
        prune.importance(model, None, "taylor")
    with pytest.raises(ConfigError, match="must divide"):
        prune.to_gqa(model, 3)
    with pytest.raises(ConfigError, match="converters"):
        qat_like = make()
        qat_like.config.converters = [{"name": "qat"}]
        prune.prune_structured(qat_like, s, heads=1)


def test_mlp_multiple_rounds_kept_width_up():
    model = make(n_embd=16)  # hidden 64
    s = prune.importance(model, None, "magnitude", ["mlp"])
    assert prune.plan(model, s, mlp=0.5, mlp_multiple=24)["config"].mlp_hidden == 48
    assert prune.plan(model, s, mlp=0.5)["config"].mlp_hidden == 32


# ---------------------------------------------------------------- head reduction


@pytest.mark.parametrize(
    "arch,target",
    [
        (dict(attention="mha"), 2),
        (dict(attention="mha"), 1),
        (dict(attention="mha", position="rope"), 2),
        (dict(attention="gqa", n_kv_head=4, n_head=8), 2),
        (dict(attention="sliding", window=3), 2),
    ],
)
def test_kv_merge_with_identical_heads_in_each_group_is_exact(arch, target):
    model = randomize(make(**{"n_head": 4, "n_embd": 32, **arch}))
    c = model.config
    nh, nkv, hd = c.n_head, c.n_kv_head, c.head_dim
    r = nkv // target
    with torch.no_grad():  # copy the first k/v head of each future group over the rest of the group
        for b in model.blocks:
            w = b.attn.qkv.weight
            for base in (nh * hd, (nh + nkv) * hd):
                for g in range(target):
                    src = w[base + g * r * hd : base + (g * r + 1) * hd].clone()
                    for j in range(1, r):
                        w[base + (g * r + j) * hd : base + (g * r + j + 1) * hd] = src
    x, _ = batch()
    merged = prune.to_gqa(model, target)
    want = "mqa" if target == 1 else ("sliding" if c.attention == "sliding" else "gqa")
    assert (merged.config.attention, merged.config.n_kv_head, merged.config.n_head) == (want, target, nh)
    assert merged.num_params() < model.num_params()
    assert torch.allclose(merged(x), model(x), atol=1e-5)
    rebuilt = GPT(GPTConfig.from_dict(merged.config.to_dict()))
    rebuilt.load_state_dict(merged.state_dict(), strict=True)


def test_kv_merge_is_the_mean_of_the_group():
    model = randomize(make(n_head=4, n_embd=16, n_layer=1))
    merged = prune.to_gqa(model, 2)
    hd = 4
    w, m = model.blocks[0].attn.qkv.weight, merged.blocks[0].attn.qkv.weight
    assert torch.equal(m[: 4 * hd], w[: 4 * hd])  # queries untouched
    for kind in range(2):  # k then v
        old, new = w[(4 + 4 * kind) * hd :], m[(4 + 2 * kind) * hd :]
        for g in range(2):
            want = (old[2 * g * hd : (2 * g + 1) * hd] + old[(2 * g + 1) * hd : (2 * g + 2) * hd]) / 2
            assert torch.allclose(new[g * hd : (g + 1) * hd], want)


# ---------------------------------------------------------------- config


def test_compose_adds_converter_and_callback_and_checks(tmp_path):
    from microgpt.train import model_config

    cfg = compose(["+plugin=prune", "model=nano"], tmp_path)
    assert cfg.callbacks.prune._target_ == "microgpt_plugins.prune.Prune"
    mc = model_config(cfg, 50)
    assert mc.converters == [{"name": "prune", "targets": ["blocks.*.weight"], "enabled": True}]
    mods = {"prune": prune}
    check_plugins(cfg, mods)
    check_plugins(compose(["+plugin=prune", "strategy=deepspeed"], tmp_path), mods)  # ZeRO-2: whole params
    check_plugins(compose(["+plugin=prune", "strategy=fsdp", "plugins.prune.sparsity=0"], tmp_path), mods)
    for bad, msg in [
        ("plugins.prune.sparsity=1.0", "sparsity"),
        ("plugins.prune.end_step=0", "start_step < end_step"),
        ("plugins.prune.scope=row", "scope"),
        ("strategy=fsdp", "shards"),
        ("strategy=deepspeed_stage_3", "shards"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            check_plugins(compose(["+plugin=prune", bad], tmp_path), mods)


# ---------------------------------------------------------------- training runs


def _quiet(steps: int) -> list[str]:
    return [
        "model=nano",
        "debug=fast",
        f"trainer.max_steps={steps}",
        "logger=none",
        "callbacks.lr_monitor=null",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_model_summary=false",
    ]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prune-data") / "small.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, text_file):
    """12 steps of nano with masks growing to 50% over steps 0..8, checkpoints at steps 6 and 12."""
    from microgpt.train import run

    out = tmp_path_factory.mktemp("prune-run")
    ov = _quiet(12) + [
        "data=text",
        f"data.path={text_file}",
        "+plugin=prune",
        "plugins.prune.sparsity=0.5",
        "plugins.prune.end_step=8",
        "plugins.prune.frequency=2",
        "plugins.prune.l1=0.001",
        "trainer.val_check_interval=6",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.every_n_train_steps=6",
        "callbacks.model_checkpoint.filename='step{step}'",
    ]
    res = run(compose(ov, out / "a"))
    return ov, out, res


@pytest.mark.slow
def test_training_prunes_on_schedule_and_checkpoint_reloads(pruned_run):
    ov, out, res = pruned_run
    ck = out / "a" / "checkpoints"
    mid, end = torch.load(ck / "step6.ckpt", weights_only=True), torch.load(ck / "step12.ckpt", weights_only=True)
    model, _ = microgpt.load(ck / "step12.ckpt")
    assert model.config.converters[0]["name"] == "prune"
    n_masks = 0
    for name, m in model.prune_masks.items():
        n_masks += 1
        w = end["state_dict"][f"model.{name}"]
        assert (~m).sum() == round(0.5 * m.numel())  # final sparsity reached at end_step=8
        assert torch.equal(w[~m], torch.zeros_like(w[~m]))  # the stored weights are the zeroed ones
        assert torch.equal(model.get_parameter(name), w)
        # step 6 of the cubic schedule 0 -> 8: 0.5 * (1 - (1 - 6/8)^3)
        m6 = mid["state_dict"][f"model.prune_masks.{name.replace('.', '__')}"]
        assert (~m6).sum() == round(0.5 * (1 - 0.25**3) * m6.numel())
        assert not (~m6 & m).any()  # pruned at step 6 -> still pruned at step 12
    assert n_masks == 2 * 4  # qkv, proj, fc, proj in each of nano's 2 blocks
    assert res["trainer"].callback_metrics["train_l1"] > 0  # the L1 term was in the objective


@pytest.mark.slow
def test_resume_mid_pruning_matches_uninterrupted(pruned_run):
    from microgpt.train import run

    ov, out, _ = pruned_run
    run(compose([*ov, f"ckpt_path={out / 'a' / 'checkpoints' / 'step6.ckpt'}"], out / "b"))
    a = torch.load(out / "a" / "checkpoints" / "step12.ckpt", weights_only=True)["state_dict"]
    b = torch.load(out / "b" / "checkpoints" / "step12.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_cli_prunes_checkpoint_which_loads_and_trains_on(pruned_run, text_file, tmp_path):
    from microgpt.train import _instantiate, run

    ov, out, _ = pruned_run
    src = out / "a" / "checkpoints" / "step12.ckpt"
    dst = tmp_path / "pruned.ckpt"
    # the data comes from the checkpoint's own record of it
    r = run_cli(["plugins/prune/cli.py", f"ckpt={src}", "heads=0.5", "mlp=0.5", "batches=2", f"out={dst}"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    base, _ = microgpt.load(src)
    small, tok = microgpt.load(dst)
    c = small.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.n_layer) == (1, 1, 16, 64, 2)
    assert c.converters == [] and not hasattr(small, "prune_masks")  # unstructured masks baked in
    assert summary["params_after"] == small.num_params() < base.num_params() == summary["params_before"]

    # a short run from the pruned weights lowers its val loss (same fixed val windows); with +plugin=prune
    # the init_from model gets masks added and recorded (structured, then unstructured pruning)
    ft = [*_quiet(15), "data=text", f"data.path={text_file}", f"init_from={dst}", "+plugin=prune"]
    cfg = compose([*ft, "plugins.prune.sparsity=0.3", "plugins.prune.end_step=10"], tmp_path / "ft")
    dm = _instantiate(cfg.data, "data", tokenizer_obj=tok)
    dm.setup("fit")
    with torch.no_grad():
        before = sum(
            float(F.cross_entropy(small(x).view(-1, c.vocab_size), y.view(-1))) for x, y in dm.val_dataset()
        ) / len(dm.val_dataset())
    res = run(cfg)
    assert res["val_loss"] < before - 0.05, (before, res["val_loss"])
    tuned, _ = microgpt.load(res["last_ckpt"])
    assert tuned.config.n_head == 1 and tuned.config.converters[0]["name"] == "prune"
    assert prune.sparsity_of(tuned) == pytest.approx(0.3, abs=2e-3)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from microgpt_plugins.prune import cli

    for argv, msg in [
        ([f"ckpt={tmp_path / 'nope.ckpt'}", "heads=0.5"], "does not exist"),
        (["heads=0.5"], "ckpt=PATH is required"),
        (["ckpt=x", "hedas=0.5"], "unknown option 'hedas'"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and msg in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_scores_are_all_reduced_across_ranks(tmp_path):
    """Two gloo ranks with one batch each give the single-process scores over both batches."""
    script = tmp_path / "dist.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, os, sys, torch, torch.distributed as dist
            from microgpt import GPT, GPTConfig
            # importance.py alone (the package would import Lightning: slow to start twice)
            spec = importlib.util.spec_from_file_location("imp", {str(ROOT / "plugins" / "prune" / "importance.py")!r})
            imp = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(imp)

            def model():
                torch.manual_seed(0)
                return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)).double()

            def data(r):
                g = torch.Generator().manual_seed(r)
                return torch.randint(0, 13, (2, 8), generator=g), torch.randint(0, 13, (2, 8), generator=g)

            def worker(rank):
                torch.set_num_threads(1)
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
                dist.init_process_group("gloo", rank=rank, world_size=2)
                for m in ("taylor", "fisher"):
                    got = imp.importance(model(), [data(rank)], m)
                    if rank == 0:
                        torch.save(got, {str(tmp_path)!r} + f"/{{m}}.pt")
                dist.destroy_process_group()

            if __name__ == "__main__":
                torch.multiprocessing.start_processes(worker, nprocs=2, start_method="fork")
            """
        )
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli([str(script), str(port)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)).double()
    data = []
    for rk in (0, 1):
        g = torch.Generator().manual_seed(rk)
        data.append((torch.randint(0, 13, (2, 8), generator=g), torch.randint(0, 13, (2, 8), generator=g)))
    for m in ("taylor", "fisher"):
        dist_scores = torch.load(tmp_path / f"{m}.pt", weights_only=True)
        local = prune.importance(model, data, m)
        for k in local:
            assert torch.allclose(dist_scores[k], local[k], rtol=1e-9), (m, k)
