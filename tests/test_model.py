"""The GPT and its components against independent references: naive attention, complex-number RoPE,
full-forward decoding, hand-computed heads, formula parameter counts and one-line layer formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import microgpt.model as model_mod
from microgpt.components.attention import CausalSelfAttention
from microgpt.components.position import RotaryPosition, apply_rotary
from microgpt.config import GPTConfig
from microgpt.errors import ConfigError, MicroGPTError
from microgpt.model import GPT, Block, Cache, sample
from microgpt.registry import ATTENTION, MLP, NORM

V = 23  # vocab of the small test models

# attention variant -> (GPTConfig overrides, expected number of key/value heads with n_head=4)
VARIANTS = {
    "mha": ({"attention": "mha"}, 4),
    "gqa": ({"attention": "gqa", "n_kv_head": 2}, 2),
    "mqa": ({"attention": "mqa"}, 1),
    "sliding": ({"attention": "sliding", "window": 3}, 4),
    "sliding_gqa": ({"attention": "sliding", "window": 3, "n_kv_head": 2}, 2),
}
CORE = ["mha", "gqa", "mqa", "sliding"]
POSITIONS = ["learned", "rope"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread only spins, and on a loaded 2-core machine the
    spinning made this file ~4x slower in CPU time. Restored afterwards for other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(variant: str = "mha", position: str = "learned", **kw) -> GPTConfig:
    d = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, position=position)
    d.update(VARIANTS[variant][0])
    d.update(kw)
    return GPTConfig(**d)


def make_model(variant: str = "mha", position: str = "learned", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(make_cfg(variant, position, **kw)).eval()


def rand_idx(b: int, t: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- independent references


def complex_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on (..., T, hd) as complex multiplication; microgpt pairs the halves: z = x[:h] + i x[h:]."""
    hd = x.shape[-1]
    h = hd // 2
    freqs = theta ** (-torch.arange(h, dtype=torch.float64) * 2 / hd)  # (h,)
    angles = pos.double()[:, None] * freqs[None, :]  # (T, h)
    rot = torch.polar(torch.ones_like(angles), angles)
    z = torch.view_as_complex(torch.stack([x[..., :h].double(), x[..., h:].double()], dim=-1).contiguous())
    z = z * rot
    return torch.cat([z.real, z.imag], dim=-1)


def naive_attention(attn: CausalSelfAttention, x: torch.Tensor, nh: int, nkv: int, window, rope_theta=None):
    """Loop over heads with explicit masks, in float64, from the module's own weights."""
    B, T, C = x.shape
    hd = C // nh
    x = x.double()
    w, b = attn.qkv.weight.double(), attn.qkv.bias
    qkv = x @ w.T + (0 if b is None else b.double())
    q = qkv[..., : nh * hd].reshape(B, T, nh, hd).transpose(1, 2)
    k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(B, T, nkv, hd).transpose(1, 2)
    v = qkv[..., (nh + nkv) * hd :].reshape(B, T, nkv, hd).transpose(1, 2)
    if rope_theta is not None:
        pos = torch.arange(T)
        q, k = complex_rope(q, pos, rope_theta), complex_rope(k, pos, rope_theta)
    group = nh // nkv
    # repeat each kv head for its group of query heads: query head h reads kv head h // group
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    out = torch.empty(B, nh, T, hd, dtype=torch.float64)
    for h in range(nh):
        scores = torch.einsum("btd,bsd->bts", q[:, h], k[:, h]) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.einsum("bts,bsd->btd", scores.softmax(-1), v[:, h])
    y = out.transpose(1, 2).reshape(B, T, nh * hd)
    pb = attn.proj.bias
    return y @ attn.proj.weight.double().T + (0 if pb is None else pb.double())


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", CORE)
def test_causality(variant, position):
    model = make_model(variant, position)
    idx = rand_idx(2, 12)
    base = model(idx)
    for t in (0, 5, 11):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % V
        out = model(idx2)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t:] - base[:, t:]).abs().max() > 1e-4


@pytest.mark.parametrize("position", POSITIONS)
def test_sliding_window_receptive_field(position):
    # one layer, window 3: token t reaches positions t, t+1, t+2 and nothing later
    model = make_model("sliding", position, n_layer=1)
    idx = rand_idx(1, 12)
    base = model(idx)
    t = 4
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % V
    diff = (model(idx2) - base).abs().amax(dim=(0, 2))
    assert torch.all(diff[t : t + 3] > 1e-4)
    assert torch.all(diff[:t] <= 1e-6) and torch.all(diff[t + 3 :] <= 1e-6)


def test_sliding_with_wide_window_equals_mha():
    mha = make_model("mha", "rope", seed=3)
    wide = GPT(make_cfg("sliding", "rope", window=16)).eval()
    wide.load_state_dict(mha.state_dict())
    idx = rand_idx(2, 16)
    torch.testing.assert_close(wide(idx), mha(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_matches_naive(variant, position):
    cfg = make_cfg(variant, position, bias=True)
    nkv = VARIANTS[variant][1]
    torch.manual_seed(0)
    attn = ATTENTION.build(cfg.attention, cfg).eval()
    assert isinstance(attn, CausalSelfAttention)
    assert attn.qkv.weight.shape == ((cfg.n_head + 2 * nkv) * cfg.head_dim, cfg.n_embd)
    with torch.no_grad():  # non-zero biases so they are checked too
        attn.qkv.bias.normal_(0, 0.3)
        attn.proj.bias.normal_(0, 0.3)
    x = torch.randn(2, 11, cfg.n_embd)
    rot = RotaryPosition(cfg).rotary(torch.arange(11)) if position == "rope" else None
    with torch.no_grad():
        got = attn(x, rot)
        want = naive_attention(
            attn, x, cfg.n_head, nkv, cfg.window, rope_theta=cfg.rope_theta if position == "rope" else None
        )
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_apply_rotary_matches_complex_numbers():
    cfg = GPTConfig(vocab_size=V, n_head=2, n_embd=32, position="rope", rope_theta=500.0)
    pos = torch.arange(0, 70, 7)
    x = torch.randn(3, 2, len(pos), cfg.head_dim)
    got = apply_rotary(x, RotaryPosition(cfg).rotary(pos))
    want = complex_rope(x, pos, 500.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # a rotation: norms of each (x_i, x_{i+h}) pair are preserved
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- KV cache and generation

CACHE_CASES = [(v, p, None) for v in VARIANTS for p in POSITIONS] + [
    ("mha", "learned", 2),
    ("gqa", "rope", 2),
    ("sliding", "rope", 1),
]


@pytest.mark.parametrize("variant,position,n_unique", CACHE_CASES)
def test_kv_cache_matches_full_forward(variant, position, n_unique):
    n_layer = 2 if n_unique is None else 4
    model = make_model(variant, position, n_layer=n_layer, n_unique_layers=n_unique)
    idx = rand_idx(2, 13)
    full = model(idx)
    cache = Cache(n_layer)
    with torch.no_grad():
        parts = [model(idx[:, :5], cache)]  # prefix
        parts.append(model(idx[:, 5:8], cache))  # a chunk of 3 after a cached prefix
        for t in range(8, 13):  # then one token at a time
            parts.append(model(idx[:, t : t + 1], cache))
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def greedy_reference(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with a full forward per token and no cache, cropping to block_size."""
    seq = idx
    bs = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[:, -bs:])[:, -1, :]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", CORE)
def test_greedy_generate_matches_uncached_loop(variant, position):
    # block_size 8: generation runs well past it; larger init spreads the logits (no near-ties)
    model = make_model(variant, position, block_size=8, init_std=0.5, seed=5)
    seen = set()
    for prompt_len in (3, 11):  # shorter and longer than block_size
        idx = rand_idx(2, prompt_len, seed=prompt_len)
        got = model.generate(idx, 14, temperature=0)
        want = greedy_reference(model, idx, 14)
        assert got.shape == (2, prompt_len + 14)
        assert torch.equal(got, want)
        seen |= set(got[:, prompt_len:].flatten().tolist())
    assert len(seen) >= 4  # the decoded text is not one repeated token (a weak comparison)


def test_generate_stream_yields_one_token_per_step():
    model = make_model("gqa", "rope", block_size=8, init_std=0.2)
    idx = rand_idx(3, 4)
    steps = list(model.generate_stream(idx, 5, temperature=0))
    assert len(steps) == 5 and all(s.shape == (3, 1) for s in steps)
    assert torch.equal(torch.cat([idx, *steps], 1), greedy_reference(model, idx, 5))
    assert torch.equal(model.generate(idx, 0), idx)


# ---------------------------------------------------------------- sampling


def test_sample_temperature_zero_and_top_k_one_are_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    am = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample(logits, temperature=0), am)
    for seed in range(5):
        got = sample(logits, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert got.shape == (64, 1) and torch.equal(got, am)


def _draws(logits: torch.Tensor, n: int = 4000, **kw) -> torch.Tensor:
    return sample(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kw).flatten()


def test_sample_top_p_keeps_smallest_set_reaching_p():
    # known probabilities, deliberately not sorted by token id
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    logits = probs.log()[None, :]
    by_rank = [1, 3, 4, 0, 2]  # ids in descending probability
    # p -> size of the smallest top set with mass >= p (cumulative: .4 .7 .85 .95 1.)
    for p, k in [(0.3, 1), (0.6, 2), (0.75, 3), (0.9, 4), (0.99, 5)]:
        drawn = _draws(logits, top_p=p)
        assert set(drawn.tolist()) == set(by_rank[:k]), p
    # the kept tokens are renormalised: 0.4/0.7 and 0.3/0.7
    drawn = _draws(logits, n=20000, top_p=0.6)
    assert abs((drawn == 1).float().mean().item() - 4 / 7) < 0.02


def test_sample_top_p_exact_boundary():
    # token 0 alone has mass exactly 0.5 (all values exact in binary floating point)
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]])
    assert torch.equal(logits.softmax(-1), torch.tensor([[0.5, 0.25, 0.25]]))
    assert set(_draws(logits, top_p=0.5).tolist()) == {0}


def test_sample_top_k_and_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    assert set(_draws(logits, top_k=2).tolist()) == {0, 1}
    drawn = _draws(logits, n=40000, temperature=2.0)
    freq = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    torch.testing.assert_close(freq, (logits[0] / 2.0).softmax(-1), atol=0.01, rtol=0)


# ---------------------------------------------------------------- output head


def test_tied_head_reads_embedding(tmp_path):
    model = make_model("gqa", "rope", tie_embeddings=True)
    assert model.lm_head is None
    assert model.output_weight is model.wte.weight
    idx = rand_idx(2, 9)
    logits, hidden = model(idx, return_hidden=True)
    assert len(hidden) == model.config.n_layer
    by_hand = model.norm_f(hidden[-1]) @ model.wte.weight.T
    torch.testing.assert_close(logits, by_hand, atol=1e-6, rtol=0)

    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert not any(k.startswith("lm_head") for k in sd)
    fresh = make_model("gqa", "rope", tie_embeddings=True, seed=123)
    assert not torch.equal(fresh.wte.weight, model.wte.weight)
    fresh.load_state_dict(sd)
    assert fresh.output_weight.data_ptr() == fresh.wte.weight.data_ptr()
    torch.testing.assert_close(fresh(idx), logits, atol=0, rtol=0)
    with torch.no_grad():  # still tied: editing the embedding moves the output logits
        fresh.wte.weight[3] += torch.randn(32)
    assert (fresh(idx)[..., 3] - logits[..., 3]).abs().max() > 1e-3


def test_untied_head_is_separate():
    model = make_model("mha", "learned", tie_embeddings=False)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.bias is None
    assert model.output_weight is model.lm_head.weight
    assert model.output_weight.data_ptr() != model.wte.weight.data_ptr()
    idx = rand_idx(2, 9)
    logits, hidden = model(idx, return_hidden=True)
    torch.testing.assert_close(logits, model.norm_f(hidden[-1]) @ model.lm_head.weight.T, atol=1e-6, rtol=0)
    tied_n = sum(p.numel() for p in make_model("mha", "learned").parameters())
    assert sum(p.numel() for p in model.parameters()) == tied_n + V * 32


# ---------------------------------------------------------------- cross-layer sharing


def test_cross_layer_sharing_structure():
    shared = make_model("mha", "rope", n_layer=4, n_unique_layers=2)
    two = make_model("mha", "rope", n_layer=2)
    assert len(shared.blocks) == 2
    assert shared.layer(0) is shared.layer(2) and shared.layer(1) is shared.layer(3)
    assert shared.layer(0) is not shared.layer(1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared) == count(two)
    assert count(make_model("mha", "rope", n_layer=4)) > count(shared)
    _, hidden = shared(rand_idx(1, 6), return_hidden=True)
    assert len(hidden) == 4  # depth is still n_layer


def test_shared_block_gradients_sum_over_uses():
    shared = make_model("gqa", "learned", n_layer=4, n_unique_layers=2, seed=7)
    unrolled = make_model("gqa", "learned", n_layer=4, seed=8)
    # copy the shared weights into 4 independent blocks: depth i uses unique block i % 2
    with torch.no_grad():
        for i in range(4):
            unrolled.blocks[i].load_state_dict(shared.blocks[i % 2].state_dict())
        for name in ("wte", "pos", "norm_f"):
            getattr(unrolled, name).load_state_dict(getattr(shared, name).state_dict())
    idx, tgt = rand_idx(2, 10, seed=2), rand_idx(2, 10, seed=3)
    outs = []
    for m in (shared, unrolled):
        logits = m(idx)
        outs.append(logits)
        F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)).backward()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    for u in range(2):
        g_shared = dict(shared.blocks[u].named_parameters())
        g_a = dict(unrolled.blocks[u].named_parameters())
        g_b = dict(unrolled.blocks[u + 2].named_parameters())
        for name, p in g_shared.items():
            torch.testing.assert_close(p.grad, g_a[name].grad + g_b[name].grad, atol=1e-6, rtol=1e-5)
            assert (g_b[name].grad.abs().max() > 0) or (g_a[name].grad.abs().max() == 0)


# ---------------------------------------------------------------- presets and parameter counts


def formula_params(V: int, C: int, L: int, block: int, bias: bool, hidden: int | None = None) -> int:
    """GPT with learned positions, layernorm, GELU MLP, tied head."""
    h = hidden or 4 * C
    b = 1 if bias else 0
    attn = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = C * h + b * h + h * C + b * C
    norm = C + b * C
    return V * C + block * C + L * (attn + mlp + 2 * norm) + norm


def test_gpt2_small_formula_matches_published_count():
    assert formula_params(50257, 768, 12, 1024, True) == 124_439_808  # GPT-2 small, as published


@pytest.mark.parametrize(
    "preset,dims",
    [
        ("nano", dict(C=32, L=2, block=32, bias=False)),
        ("micro", dict(C=128, L=4, block=64, bias=False)),
        ("mini", dict(C=384, L=6, block=256, bias=False)),
        ("small", dict(C=768, L=12, block=1024, bias=True)),
    ],
)
def test_preset_parameter_counts(preset, dims):
    from microgpt.train import model_config

    try:
        from tests.conftest import compose
    except ImportError:  # tests/ is not a package: pytest puts it on sys.path as the conftest's folder
        from conftest import compose

    vocab = 50257 if preset == "small" else 65
    cfg = model_config(compose([f"model={preset}"]), vocab)
    assert (cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.bias) == (dims["C"], dims["L"], dims["block"], dims["bias"])
    expected = formula_params(vocab, **dims)
    if preset == "micro":  # nanoGPT's baby GPT, spelled out: 12 C^2 per layer + 2 norms, no biases
        assert expected == 65 * 128 + 64 * 128 + 4 * (12 * 128**2 + 2 * 128) + 128
    if preset == "small":
        assert expected == 124_439_808
    if preset == "small":  # 124M parameters: count them without allocating
        with torch.device("meta"):
            model = GPT(cfg)
    else:
        torch.manual_seed(0)
        model = GPT(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_params() == expected - dims["block"] * dims["C"]  # nanoGPT's non-embedding figure
    if preset != "small":
        idx = rand_idx(2, min(cfg.block_size, 48), vocab=vocab)
        with torch.no_grad():
            logits = model(idx)
        assert logits.shape == (2, idx.shape[1], vocab)
        assert torch.isfinite(logits).all()
        # near-uniform predictions at init: loss close to ln(vocab)
        tgt = rand_idx(2, idx.shape[1], seed=9, vocab=vocab)  # not idx: a tied head favours the input token
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt.reshape(-1))
        assert abs(loss.item() - math.log(vocab)) < 0.3


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kw,keys",
    [
        (dict(n_embd=30, n_head=4), ["n_embd", "n_head"]),
        (dict(n_head=4, n_kv_head=3), ["n_head", "n_kv_head"]),
        (dict(attention="sliding"), ["window", "sliding"]),
        (dict(attention="sliding", window=0), ["window"]),
        (dict(position="rope", n_embd=12, n_head=4), ["rope", "n_embd", "n_head"]),
        (dict(n_layer=4, n_unique_layers=5), ["n_unique_layers"]),
        (dict(n_layer=0), ["n_layer"]),
    ],
)
def test_config_errors_are_one_line_and_name_keys(kw, keys):
    with pytest.raises(ConfigError) as ei:
        GPTConfig(**kw)
    msg = str(ei.value)
    assert "\n" not in msg and isinstance(ei.value, MicroGPTError)
    for k in keys:
        assert k in msg, (k, msg)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    cfg = make_cfg("sliding", "rope", n_unique_layers=1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as ei:
        GPTConfig.from_dict({**cfg.to_dict(), "n_embed": 64})
    msg = str(ei.value)
    assert "\n" not in msg and "n_embed" in msg and "n_embd" in msg
    assert make_cfg("mqa").n_kv_head == 1 and make_cfg("mha").n_kv_head == 4


# ---------------------------------------------------------------- gradient checkpointing


def test_grad_checkpointing_same_loss_and_grads(monkeypatch):
    calls = []
    real = model_mod.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(model_mod, "checkpoint", counting)
    plain = make_model("gqa", "rope", n_layer=3, seed=4).train()
    ckpt = GPT(make_cfg("gqa", "rope", n_layer=3, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    idx, tgt = rand_idx(2, 12, seed=5), rand_idx(2, 12, seed=6)
    losses = []
    for m in (plain, ckpt):
        loss = F.cross_entropy(m(idx).reshape(-1, V), tgt.reshape(-1))
        loss.backward()
        losses.append(loss)
    assert len(calls) == 3  # only the checkpointed model, once per layer
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- initialisation


def test_gpt2_scaled_init():
    torch.manual_seed(0)
    n_layer = 3
    cfg = GPTConfig(
        vocab_size=512, block_size=64, n_layer=n_layer, n_head=4, n_embd=256, bias=True, tie_embeddings=False
    )
    model = GPT(cfg)
    proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("proj.weight")])
    assert proj.numel() == n_layer * (256 * 256 + 1024 * 256)
    want = 0.02 / math.sqrt(2 * n_layer)
    assert abs(proj.std().item() / want - 1) < 0.03 and abs(proj.mean().item()) < want * 0.01
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            continue
        if p.dim() == 2:  # qkv, fc, lm_head, wte, wpe
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # norm gains
            assert torch.all(p == 1), name


# ---------------------------------------------------------------- layer formulas


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_mlp_formula(name):
    cfg = GPTConfig(vocab_size=V, n_embd=16, n_head=2, bias=True, mlp=name)
    mlp = MLP.build(name, cfg)
    _randomise(mlp)
    x = torch.randn(2, 5, 16)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    acts = {
        "gelu": 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),  # exact x * Phi(x), nanoGPT's nn.GELU()
        "gelu_tanh": 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),  # GPT-2's
    }
    out = {k: a @ mlp.proj.weight.T + mlp.proj.bias for k, a in acts.items()}
    torch.testing.assert_close(mlp(x), out[name], atol=1e-5, rtol=1e-5)
    other = "gelu_tanh" if name == "gelu" else "gelu"
    assert (mlp(x) - out[other]).abs().max() > 1e-3  # the two are told apart at this tolerance
    assert mlp.fc.weight.shape == (64, 16)


def test_swiglu_formula():
    cfg = GPTConfig(vocab_size=V, n_embd=128, n_head=2, mlp="swiglu")
    assert cfg.hidden_dim == 384  # 8/3 * 128 = 341.3 rounded up to a multiple of 64
    mlp = MLP.build("swiglu", cfg)
    _randomise(mlp)
    x = torch.randn(2, 5, 128)
    a, b = x @ mlp.gate.weight.T, x @ mlp.fc.weight.T
    want = (a * torch.sigmoid(a) * b) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_formula(bias):
    cfg = GPTConfig(vocab_size=V, n_embd=16, n_head=2, bias=bias, norm_eps=1e-3)
    ln = NORM.build("layernorm", cfg)
    assert (ln.bias is not None) == bias
    _randomise(ln)
    x = torch.randn(3, 4, 16) * 3 + 1
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-3) * ln.weight + (ln.bias if bias else 0)
    torch.testing.assert_close(ln(x), want, atol=1e-5, rtol=1e-5)


def test_rmsnorm_formula():
    cfg = GPTConfig(vocab_size=V, n_embd=16, n_head=2, norm="rmsnorm", norm_eps=1e-3)
    rn = NORM.build("rmsnorm", cfg)
    _randomise(rn)
    x = torch.randn(3, 4, 16) * 3 + 1
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * rn.weight
    torch.testing.assert_close(rn(x), want, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in rn.named_parameters()] == ["weight"]


def test_block_is_prenorm_residual():
    cfg = make_cfg("mha", "learned", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    blk = Block(cfg).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        h = x + blk.attn(blk.norm1(x))
        want = h + blk.mlp(blk.norm2(h))
        torch.testing.assert_close(blk(x), want, atol=0, rtol=0)


# ---------------------------------------------------------------- import hygiene


@pytest.mark.parametrize(
    ("modules", "banned"),
    [
        # model code reads like nanoGPT's: no framework behind it; microgpt.load() rebuilds without Hydra
        (
            "microgpt, microgpt.model, microgpt.components, microgpt.checkpoint, microgpt.data.tokenizers",
            "lightning hydra",
        ),
        # the generate CLI composes its config with Hydra but starts without Lightning's ~3 s import
        ("microgpt.generate", "lightning"),
    ],
)
def test_model_code_and_the_load_path_do_not_import_frameworks(modules, banned):
    import subprocess
    import sys

    # a fresh interpreter, so nothing another test imported can hide an import
    code = f"import sys, {modules}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({banned.split()!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{modules} imported {out.stdout.strip()}"
