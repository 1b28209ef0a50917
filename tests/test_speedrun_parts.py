"""The speedrun's parts against hand-written formulas: relu^2 MLP, QK-norm, logit soft-capping,
zero-initialised projections, the lr schedule shapes, Newton-Schulz orthogonalisation and MuonAdamW
(its AdamW half against torch.optim.AdamW, its Muon half against a one-step hand computation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from microgpt.components.attention import CausalSelfAttention
from microgpt.config import GPTConfig
from microgpt.errors import ConfigError
from microgpt.model import GPT, Cache
from microgpt.optim import MuonAdamW, orthogonalize
from microgpt.registry import MLP

V = 23


def cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def test_relu2_mlp_is_relu_squared():
    torch.manual_seed(0)
    c = cfg(mlp="relu2")
    mlp = MLP.build("relu2", c)
    x = torch.randn(2, 5, 32)
    h = x @ mlp.fc.weight.T
    want = (torch.clamp(h, min=0) ** 2) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
    # unlike GELU it is exactly zero for negative pre-activations
    assert mlp.fc.weight.shape == (4 * 32, 32)


def test_qk_norm_attention_matches_naive_reference():
    torch.manual_seed(0)
    c = cfg(qk_norm=True)
    attn = CausalSelfAttention(c).eval()
    x = torch.randn(2, 7, 32)
    B, T, nh, hd = 2, 7, 4, 8
    q, k, v = (x @ attn.qkv.weight.T).split(32, dim=-1)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))

    def unit_rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)

    q, k = unit_rms(q), unit_rms(k)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    want = (att @ v).transpose(1, 2).reshape(B, T, 32) @ attn.proj.weight.T
    torch.testing.assert_close(attn(x), want, rtol=1e-4, atol=1e-5)
    # and it changes the result: the same weights without qk_norm give something else
    plain = CausalSelfAttention(cfg()).eval()
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(plain(x), want, atol=1e-3)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_qk_norm_kv_cache_decoding_matches_full_forward(position):
    torch.manual_seed(0)
    model = GPT(cfg(qk_norm=True, position=position)).eval()
    idx = torch.randint(0, V, (1, 10))
    full = model(idx)
    cache = Cache(2)
    steps = [model(idx[:, :4], cache)] + [model(idx[:, t : t + 1], cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_logit_softcap_bounds_logits_by_formula():
    torch.manual_seed(0)
    capped = GPT(cfg(logit_softcap=2.0, init_std=0.5)).eval()
    plain = GPT(cfg(init_std=0.5)).eval()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, V, (2, 9))
    raw = plain(idx)
    assert raw.abs().max() > 2.0  # the test would be vacuous otherwise
    torch.testing.assert_close(capped(idx), 2.0 * torch.tanh(raw / 2.0))
    assert capped(idx).abs().max() < 2.0
    with pytest.raises(ConfigError, match="logit_softcap"):
        cfg(logit_softcap=0.0)


def test_zero_init_proj_starts_blocks_as_identity():
    torch.manual_seed(0)
    m = GPT(cfg(zero_init_proj=True))
    projs = [p for n, p in m.named_parameters() if n.endswith("proj.weight")]
    assert len(projs) == 4 and all(torch.count_nonzero(p) == 0 for p in projs)
    # each block adds zero to the residual stream at init
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(m.blocks[0](x), x)
    assert all(torch.count_nonzero(p) > 0 for n, p in GPT(cfg()).named_parameters() if n.endswith("proj.weight"))


@pytest.mark.parametrize("shape", ["linear", "wsd"])
def test_lr_schedule_shapes_by_hand(shape):
    from microgpt.lit import lr_lambda

    warm, decay, ratio = 10, 110, 0.0
    vals = [lr_lambda(s, warm, decay, ratio, shape=shape, cooldown_fraction=0.5) for s in range(130)]
    assert vals[0] == pytest.approx(1 / 11) and vals[9] == pytest.approx(10 / 11)
    if shape == "linear":
        assert vals[10] == pytest.approx(1.0) and vals[60] == pytest.approx(0.5) and vals[109] == pytest.approx(0.01)
    else:  # flat for the first half of the decay window, then a straight line to 0
        assert vals[10] == vals[60] == pytest.approx(1.0)
        assert vals[85] == pytest.approx(0.5) and vals[109] == pytest.approx(0.02)
    assert vals[110] == vals[129] == 0.0


def test_orthogonalize_gives_near_unit_singular_values():
    torch.manual_seed(0)
    for rows, cols in [(64, 16), (16, 64), (32, 32)]:
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        g = u @ torch.diag(torch.logspace(-2, 0, k)) @ v.T  # singular values from 0.01 to 1: ratio 100
        o = orthogonalize(g * 7.0)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, (rows, cols, s.min(), s.max())
        # same singular vectors: o is (close to) u v^T, the orthogonal factor of g
        assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ v.T).flatten(), dim=0) > 0.95


def _named_groups(model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in params if p.dim() >= 2]
    no_decay = [(n, p) for n, p in params if p.dim() < 2]
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": 0.1},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def test_muon_adamw_routes_block_matrices_to_muon_and_the_rest_to_adamw():
    torch.manual_seed(0)
    model = GPT(cfg(tie_embeddings=False))
    opt = MuonAdamW(_named_groups(model), lr=1e-2)
    muon = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    adam = {n for g in opt.param_groups if not g["use_muon"] for n in g["param_names"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {"wte.weight", "lm_head.weight", "pos.wpe.weight"} <= adam
    assert not muon & adam
    with pytest.raises(ValueError, match="param_names"):
        MuonAdamW(model.parameters())


def test_muon_adamw_adam_half_equals_torch_adamw():
    torch.manual_seed(0)
    a, b = GPT(cfg()), GPT(cfg())
    b.load_state_dict(a.state_dict())
    for m in (a, b):  # blocks frozen: otherwise Muon's different block updates change every other gradient
        m.blocks.requires_grad_(False)
    ours = MuonAdamW(_named_groups(a), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ref_groups = [
        {"params": [p for p in b.parameters() if p.requires_grad and p.dim() >= 2]},
        {"params": [p for p in b.parameters() if p.requires_grad and p.dim() < 2], "weight_decay": 0.0},
    ]
    ref = torch.optim.AdamW(ref_groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    idx = torch.randint(0, V, (2, 12))
    wte0 = a.wte.weight.detach().clone()
    for _ in range(4):
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            F.cross_entropy(m(idx[:, :-1]).reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
            o.step()
    assert (a.wte.weight - wte0).abs().max() > 1e-3  # it did train
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_muon_step_by_hand_and_state_dict_resume():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    group = {"params": [w], "param_names": ["blocks.0.fc.weight"], "weight_decay": 0.0}
    opt = MuonAdamW([group], lr=0.1, momentum=0.9, nesterov=True)
    g = torch.randn(8, 4)
    w0 = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    # momentum buffer = g; nesterov update direction = g + 0.9 * g; scaled to AdamW's RMS: 0.2 * sqrt(8)
    want = w0 - 0.1 * 0.2 * math.sqrt(8) * orthogonalize(1.9 * g)
    torch.testing.assert_close(w.detach(), want)
    # the buffer survives a state_dict round trip: a resumed optimizer takes the same next step
    clone = torch.nn.Parameter(w.detach().clone())
    opt2 = MuonAdamW([{**group, "params": [clone]}], lr=0.1, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    w.grad = g.clone()
    clone.grad = g.clone()
    opt.step()
    opt2.step()
    torch.testing.assert_close(w.detach(), clone.detach())


@pytest.mark.slow
def test_speedrun_experiment_trains_with_every_default_on(tmp_path):
    """experiment=shakespeare_speedrun as a user runs it (callbacks, logger, print_sample all on), shortened:
    the high peak lr with its linear decay lowers the val loss, and the lr really follows that schedule."""
    import csv

    from conftest import SHAKESPEARE, run_cli

    run = tmp_path / "run"
    p = run_cli(
        [
            "train.py",
            "experiment=shakespeare_speedrun",
            f"data.path={SHAKESPEARE}",
            "trainer.max_steps=80",
            "trainer.val_check_interval=40",
            "scheduler.warmup_steps=10",
            f"hydra.run.dir={run}",
        ],
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    vals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(vals) >= 2 and vals[-1] < vals[0] < math.log(63), vals  # 63 = the fixture's char vocab
    lrs = {int(r["step"]): float(v) for r in rows for k, v in r.items() if k.startswith("lr-") and v}
    after_warmup = {s: lr for s, lr in lrs.items() if 10 <= s < 80}
    assert len(after_warmup) >= 3, lrs
    for s, lr in after_warmup.items():  # warmup 10, then a straight line from 8e-3 to 0 at step 80
        assert lr == pytest.approx(8e-3 * (1 - (s - 10) / 70), rel=1e-4, abs=1e-9), (s, lr)
    assert "--- sample ---" in p.stdout  # print_sample's default: on
