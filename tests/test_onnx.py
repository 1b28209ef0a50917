"""format=onnx: model.onnx run by the real client (onnxruntime, driven here directly, not through microgpt's
wrapper) gives the torch model's logits, over whole sequences and through its KV cache; microgpt.load runs it
for generate / evaluate; what the graph cannot hold is refused; a failed runtime check writes nothing.

Tolerance 1e-4 absolute on fp32 logits (up to ~6 here): torch and onnxruntime run the same float32 math with
different kernels, so they differ by summation-order rounding (measured ~5e-6); a graph mistake (a lost bias,
a shifted rotary position, a stale or misplaced cache entry) moves these logits by > 1e-2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort  # the dev extra installs it (microgpt[onnx]): a core test, never skipped
import pytest
import torch

import microgpt
from microgpt.components.attention import CausalSelfAttention
from microgpt.config import GPTConfig
from microgpt.data.tokenizers import CharTokenizer
from microgpt.errors import CheckpointError, ConfigError
from microgpt.export import export
from microgpt.model import GPT
from microgpt.registry import ATTENTION, CONVERTER

TOL = 1e-4
VARIANTS = {
    # GPT-2 style: learned positions, LayerNorm with biases, exact GELU, an untied head
    "gpt2": dict(bias=True, tie_embeddings=False),
    # Llama / Mistral style: rotary positions, RMSNorm, SwiGLU, grouped-query attention, a sliding window
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", attention="sliding", n_kv_head=2, window=12),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="module")
def tok(text) -> CharTokenizer:
    return CharTokenizer("".join(sorted(set(text))))


def tiny(tok, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    m = GPT(GPTConfig(**{**cfg, **kw})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # init (std 0.02) gives near-uniform logits: noise makes every weight matter
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return m


def save_ckpt(model: GPT, tok, path: Path) -> Path:
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    hp = {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}
    torch.save({"state_dict": sd, "hyper_parameters": hp}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok, text):
    """Each variant trained-looking (perturbed), saved as a .ckpt and exported once (the gpt2 one with text=)."""
    out = {}
    for name, kw in VARIANTS.items():
        d = tmp_path_factory.mktemp(f"onnx_{name}")
        model = tiny(tok, **kw)
        ck = save_ckpt(model, tok, d / "m.ckpt")
        held = d / "held_out.txt"
        held.write_text(text[-2000:], encoding="utf-8")
        summary = export(ck, "onnx", d / "onnx", text=held if name == "gpt2" else None)
        out[name] = SimpleNamespace(model=model, ckpt=ck, dir=d / "onnx", summary=summary, held=held)
    return out


def ort_session(d: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])


def ort_run(sess, idx: torch.Tensor, past: dict | None):
    """Feed the session by its own input names; an empty cache is 0 positions long."""
    feed = {"input_ids": idx.numpy()}
    for i in sess.get_inputs()[1:]:
        if past is None:
            _, heads, _, hd = i.shape  # ('batch', n_kv_head, 'past', head_dim)
            feed[i.name] = np.zeros((idx.shape[0], heads, 0, hd), np.float32)
        else:
            feed[i.name] = past[i.name.replace("past_", "present_")]
    outs = sess.run(None, feed)
    names = [o.name for o in sess.get_outputs()]
    return outs[0], dict(zip(names[1:], outs[1:]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnxruntime_logits_match_torch_whole_and_through_the_kv_cache(variant, exported, tok):
    e = exported[variant]
    sess = ort_session(e.dir)
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "past_key_0", "past_value_0"]
    # batch and length other than the export's sample and the runtime check's: the axes are dynamic
    x = torch.randint(0, tok.vocab_size, (3, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = e.model(x).numpy()
    assert np.abs(ref).max() > 3
    full, _ = ort_run(sess, x, None)
    assert np.abs(full - ref).max() <= TOL
    logits, past = ort_run(sess, x[:, :20], None)  # prefill 20, then a 3-token chunk, then single tokens
    got = [logits]
    logits, past = ort_run(sess, x[:, 20:23], past)
    got.append(logits)
    for j in range(23, 30):
        logits, past = ort_run(sess, x[:, j : j + 1], past)
        got.append(logits)
    assert past["present_key_1"].shape[2] == 30
    assert np.abs(np.concatenate(got, axis=1) - ref).max() <= TOL
    # a shifted position or a lost cache would be far off: the check above can fail
    wrong, _ = ort_run(sess, x[:, 20:23], None)
    assert np.abs(wrong - ref[:, 20:23]).max() > 1e-2

    # every weight stored once (plus a few shape/scalar constants): a tied head is no second embedding table
    import onnx

    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(e.dir / "model.onnx")).graph.initializer)
    assert stored <= sum(p.numel() for p in e.model.parameters()) + 100 < stored + e.model.wte.weight.numel()

    m = json.loads((e.dir / "manifest.json").read_text(encoding="utf-8"))
    assert m["format"] == "onnx" and m["scheme"] == "float32"
    assert m["source_sha256"] == hashlib.sha256(e.ckpt.read_bytes()).hexdigest()
    assert m["files"] == {p.name: p.stat().st_size for p in e.dir.iterdir() if p.name != "manifest.json"}
    assert set(m["files"]) == {"model.onnx", "microgpt.json"}
    assert 0 <= m["onnx"]["max_abs_diff"] <= m["onnx"]["tolerance"] < 1e-3 and m["onnx"]["kv_cache"] is True
    assert e.summary["manifest"] == m


def test_load_generates_the_torch_models_greedy_tokens_and_evaluates_alike(exported, tok, text):
    from microgpt.evaluate import evaluate_text

    for variant, e in exported.items():
        model, tok2 = microgpt.load(e.dir)
        assert tok2 == tok and model.config == e.model.config
        prompt = torch.tensor([tok.encode("ROMEO:\nWhat"), tok.encode("JULIET:\nAnd")])
        # 40 new tokens after 10: past block_size=32, so the context-full recompute runs too
        want = e.model.generate(prompt, 40, temperature=0)
        got = model.generate(prompt, 40, temperature=0)
        assert torch.equal(got, want), variant
        assert len(set(want[0, 10:].tolist())) > 3  # not a degenerate repeat
        with torch.no_grad():
            assert (model(prompt) - e.model(prompt)).abs().max().item() <= TOL
    e = exported["gpt2"]
    model, _ = microgpt.load(e.dir)
    held = e.held.read_text(encoding="utf-8")
    ours, ref = evaluate_text(model, tok, held, 4), evaluate_text(e.model, tok, held, 4)
    assert ours["tokens"] == ref["tokens"] and ours["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5)
    m = json.loads((e.dir / "manifest.json").read_text(encoding="utf-8"))
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5) and m["val_tokens"] == ref["tokens"]


def test_generate_and_evaluate_entry_points_take_the_onnx_dir(exported, tok, capsys):
    from hydra import compose, initialize_config_dir

    from microgpt.cli import CONF_DIR
    from microgpt.evaluate import evaluate
    from microgpt.generate import generate

    e = exported["llama"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gcfg = compose("generate", [f"ckpt={e.dir}", "prompt=ROMEO:", "max_new_tokens=30", "temperature=0"])
        ecfg = compose("evaluate", [f"ckpt={e.dir}", "data=text", f"data.path={e.held}", "batch_size=4"])
    (text,) = generate(gcfg)
    want = e.model.generate(torch.tensor([tok.encode("ROMEO:")]), 30, temperature=0)[0, 6:].tolist()
    assert text == tok.decode(want)
    assert capsys.readouterr().out.startswith("ROMEO:" + text)
    result = evaluate(ecfg)
    from microgpt.evaluate import evaluate_text

    ref = evaluate_text(e.model, tok, e.held.read_text(encoding="utf-8"), 4)
    assert result["tokens"] == ref["tokens"] and result["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5)
    # training or re-exporting from the graph is refused, naming what to pass instead
    with pytest.raises(CheckpointError, match=r"is an ONNX export: .*the checkpoint it was exported from"):
        export(e.dir, "safetensors", e.dir.parent / "again")


if "onnx_test_attention" not in ATTENTION.names():

    @ATTENTION.register("onnx_test_attention")
    class PluginAttention(CausalSelfAttention):  # a plugin's attention: the graph's cached attention is not it
        pass


if "onnx_test_noop" not in CONVERTER.names():
    CONVERTER.register("onnx_test_noop")(lambda model: model)


def test_what_the_graph_cannot_hold_is_refused_naming_the_component(tok, tmp_path):
    ck = save_ckpt(tiny(tok, attention="onnx_test_attention"), tok, tmp_path / "a.ckpt")
    with pytest.raises(
        CheckpointError, match=r"format=onnx cannot represent this model: attention=onnx_test_attention"
    ) as e:
        export(ck, "onnx", tmp_path / "out" / "a")
    assert "\n" not in str(e.value)
    ck = save_ckpt(tiny(tok, converters=[{"name": "onnx_test_noop"}]), tok, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"the model was converted \(onnx_test_noop\)"):
        export(ck, "onnx", tmp_path / "out" / "c")
    with pytest.raises(ConfigError, match="format=onnx writes float32"):
        export(save_ckpt(tiny(tok), tok, tmp_path / "p.ckpt"), "onnx", tmp_path / "out" / "h", dtype="float16")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_failed_runtime_check_aborts_the_export_and_leaves_nothing(exported, tok, tmp_path, monkeypatch):
    import microgpt.io.onnx as onnx_io

    # the graph written is another model's (same shapes, other weights): onnxruntime's logits must disagree
    other = save_ckpt(tiny(tok, seed=1, **VARIANTS["gpt2"]), tok, tmp_path / "other.ckpt")

    def wrong_graph(model, path):
        shutil.copy(exported["gpt2"].dir / "model.onnx", path)

    monkeypatch.setattr(onnx_io, "export_graph", wrong_graph)
    out = tmp_path / "exports" / "o"
    with pytest.raises(CheckpointError, match=r"onnxruntime's logits differ from the torch model's by [\d.e+-]+ ") as e:
        export(other, "onnx", out)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "exports").iterdir()) == []  # no out dir, no temporary directory


def test_a_missing_onnxruntime_is_one_line_naming_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'microgpt\[onnx\]'"):
        microgpt.load(exported["gpt2"].dir)
    with pytest.raises(ConfigError, match=r"pip install 'microgpt\[onnx\]'"):
        export(exported["gpt2"].ckpt, "onnx", exported["gpt2"].dir.parent / "none")
