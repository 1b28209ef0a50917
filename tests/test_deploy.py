"""Deploying on a CPU (docs/deploy.md): int8 exports run int8 kernels, the static-cache decode step gives the
same tokens as GPT.generate_stream, and `python -m microgpt.generate` runs an int8 export.

Speed is bench/deploy.py's business (committed results), never a timed test here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SHAKESPEARE, run_cli

import microgpt
from microgpt.config import GPTConfig
from microgpt.data.tokenizers import CharTokenizer
from microgpt.inference import Int8Embedding, Int8Linear, fast_decode_blocker, generate_stream, is_int8
from microgpt.io.export import export
from microgpt.model import GPT

pytestmark = pytest.mark.skipif(
    not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn")),
    reason="this torch build has no x86 int8 engine",
)


def save_ckpt(model: GPT, tok, path):
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": sd, "hyper_parameters": {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}}, path
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model trained for a few seconds (quantization error only shows on learned weights)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    tok = CharTokenizer.fit(text)
    data = torch.tensor(tok.encode(text))
    n = int(len(data) * 0.9)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=True)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        ix = torch.randint(n - 65, (16,), generator=g)
        x = torch.stack([data[i : i + 64] for i in ix])
        y = torch.stack([data[i + 1 : i + 65] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("deploy")
    ck = save_ckpt(model, tok, d / "m.ckpt")
    export(ck, "int8", d / "int8")
    val = data[n : n + 8 * 65].view(8, 65)
    return SimpleNamespace(model=model, tok=tok, dir=d / "int8", val=val, loss=loss.item())


def test_int8_export_loads_as_an_int8_model_with_close_logits(trained):
    """microgpt.load gives int8 modules holding the exported values; the logits stay close to float32's."""
    from safetensors.torch import load_file

    assert trained.loss < 3.0  # learned something: not an init
    model, tok = microgpt.load(trained.dir)
    assert tok == trained.tok and not model.training and is_int8(model)
    # every Linear is an int8 module running the exported int8 values (no float Linear left), the tied head too
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    raw = load_file(trained.dir / "model.safetensors")
    linears = [n for n, m in trained.model.named_modules() if isinstance(m, nn.Linear)]
    mods = dict(model.named_modules())
    for name in linears:
        m = mods[name]
        assert isinstance(m, Int8Linear) and m.q.dtype == torch.int8
        assert torch.equal(m.q, raw[f"{name}.weight"]) and torch.equal(m.scale, raw[f"{name}.weight.scale"])
    assert isinstance(model.wte, Int8Embedding) and torch.equal(model.wte.q, raw["wte.weight"])
    assert isinstance(model.lm_head, Int8Linear) and torch.equal(model.lm_head.q, raw["wte.weight"])
    x, y = trained.val[:, :-1], trained.val[:, 1:]
    with torch.inference_mode():
        ref, got = trained.model(x), model(x)
    assert ref.abs().max() > 3  # logits of a trained model, not near-zero ones
    # Tolerance: the weights are within max|w_row|/254 of fp32 (alone they move these logits by 0.02) and the
    # activations are rounded to 8 bits per call (relative error ~1/255 of each matmul's input range): measured
    # max |diff| 0.05 here. 0.25 leaves room for the kernels' rounding on another CPU, while a wrong scale,
    # transpose or a lost bias moves these logits (magnitude > 3) by whole units.
    diff = (got - ref).abs().max().item()
    assert 0 < diff <= 0.25, diff
    loss_ref = F.cross_entropy(ref.flatten(0, 1), y.flatten()).item()
    loss_got = F.cross_entropy(got.flatten(0, 1), y.flatten()).item()
    assert abs(loss_got - loss_ref) < 0.01, (loss_ref, loss_got)  # 1% perplexity; measured 3e-5
    # dequantize=True: the float model with the same (dequantized) weights
    flat, _ = microgpt.load(trained.dir, dequantize=True)
    assert not is_int8(flat) and isinstance(flat.blocks[0].attn.qkv, nn.Linear)
    w = raw["blocks.0.mlp.fc.weight"].float() * raw["blocks.0.mlp.fc.weight.scale"][:, None]
    assert torch.equal(flat.blocks[0].mlp.fc.weight, w)


CONFIGS = {
    "mha-learned": dict(),
    "gqa-rope-rmsnorm-swiglu-qknorm": dict(
        attention="gqa", n_kv_head=2, position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True
    ),
    "sliding-softcap": dict(attention="sliding", window=5, logit_softcap=15.0),
    "mqa-shared-untied": dict(attention="mqa", n_unique_layers=1, tie_embeddings=False, bias=True),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_static_cache_decode_is_greedy_identical_to_generate_stream(case):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=4, n_embd=32, init_std=0.2, **CONFIGS[case])
    model = GPT(cfg).eval()
    assert fast_decode_blocker(model) is None
    idx = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    # 7 + 30 > block_size 24: covers the full-context recompute as well as the cached steps
    ref = torch.cat(list(model.generate_stream(idx, 30, temperature=0.0)), 1)
    assert len(set(ref.flatten().tolist())) > 3  # not a degenerate constant sequence
    for mode in ("eager", "trace"):  # "compile" is the same step through Inductor: bench/deploy.py checks it
        got = torch.cat(list(generate_stream(model, idx, 30, temperature=0.0, mode=mode)), 1)
        assert torch.equal(got, ref), mode
    # sampling with the same generator draws the same tokens too (same logits, same sampler)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = torch.cat(list(model.generate_stream(idx, 12, temperature=1.0, top_k=10, generator=g1)), 1)
    got = torch.cat(list(generate_stream(model, idx, 12, temperature=1.0, top_k=10, generator=g2)), 1)
    assert torch.equal(got, ref)


def test_decode_step_logits_match_the_full_forward():
    from microgpt.inference import StaticCache, decode_step
    from microgpt.model import Cache

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, init_std=0.2)).eval()
    seq = torch.randint(0, 40, (1, 12))
    with torch.inference_mode():
        full = model(seq)  # (1, 12, V): position t's logits from the whole prefix
        cache = Cache(2)
        model(seq[:, :5], cache)
        static = StaticCache(model, 1, 16, torch.float32, seq.device)
        static.fill(cache)
        for t in range(5, 12):
            logits = decode_step(model, static.k, static.v, seq[:, t : t + 1], torch.tensor([t]))
            # float32 attention over a masked 16-slot buffer vs exactly t+1 keys: summation order only
            assert (logits - full[:, t]).abs().max().item() < 1e-5


def test_a_block_it_does_not_know_falls_back_to_generate_stream():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()

    class Other(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, rot=None, cache=None):
            return self.inner(x, rot, cache)

    model.blocks[0].attn = Other(model.blocks[0].attn)
    assert "attention Other" in fast_decode_blocker(model)
    idx = torch.tensor([[1, 2, 3]])
    ref = torch.cat(list(model.generate_stream(idx, 5, temperature=0.0)), 1)
    assert torch.equal(torch.cat(list(generate_stream(model, idx, 5, temperature=0.0)), 1), ref)


def test_generate_cli_runs_an_int8_export(trained):
    model, tok = microgpt.load(trained.dir)
    prompt = "ROMEO:"
    want = model.generate(torch.tensor([tok.encode(prompt)]), 20, temperature=0.0)[0, len(prompt) :].tolist()
    r = run_cli(
        ["-m", "microgpt.generate", f"ckpt={trained.dir}", f"prompt={prompt}", "max_new_tokens=20", "temperature=0"],
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    # the same tokens as the in-process int8 model (whose int8 logits differ from float32's)
    assert r.stdout == prompt + tok.decode(want) + "\n"


@pytest.mark.parametrize("scheme", ["int8", "8da4w"])
def test_a_qat_artifact_decodes_to_the_same_tokens(scheme, tmp_path):
    """The qat plugin's real quantized model (torchao tensors) through the static-cache step: same tokens."""
    from microgpt.model import build_model
    from microgpt.plugins import load_plugin

    qat = load_plugin("qat")
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=64, init_std=0.2)).eval()
    cfg = GPTConfig.from_dict({**base.config.to_dict(), "converters": [{"name": "qat", "scheme": scheme}]})
    fake = build_model(cfg)
    fake.load_state_dict(base.state_dict())
    qat.convert_and_save(fake.eval(), tmp_path / "q.pt", tokenizer={"name": "char", "chars": "x"})
    model, _ = qat.load_quantized(tmp_path / "q.pt")
    idx = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(1))
    ref = torch.cat(list(model.generate_stream(idx, 40, temperature=0.0)), 1)
    assert len(set(ref.flatten().tolist())) > 3
    assert torch.equal(torch.cat(list(generate_stream(model, idx, 40, temperature=0.0)), 1), ref)
