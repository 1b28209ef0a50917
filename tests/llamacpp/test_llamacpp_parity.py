"""llama.cpp (llama-cpp-python) as the real client of `python -m microgpt.export format=gguf`.

Two tiny models are trained here (a BPE one and a char one, a plain PyTorch loop on the Shakespeare fixture),
exported to GGUF float32 and q8_0, and run by llama.cpp on the same token ids as microgpt:
  f32   next-token logits on a held-out text within 1e-3 x the largest |logit| of microgpt's (llama.cpp's CPU
        GELU is a float16 table: see F32_REL_TOL), within 1e-3 absolute of microgpt's forward computing the GELU
        as llama.cpp does, exact (1e-4) without the GELU, greedy generation identical;
  q8_0  top-1 agreement with microgpt's float32 model on >= 99% of the held-out positions;
  tokenizer: llama.cpp's own tokenization of the held-out text gives our ids (BPE, and char: the export
  writes a char vocabulary as a byte-level BPE), also for multi-byte characters.
Opt-in (`make test-llamacpp`; tests/conftest.py ignores this folder unless MICROGPT_LLAMACPP=1). docs/llamacpp.md.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import microgpt
from microgpt.config import GPTConfig
from microgpt.data.tokenizers import BPETokenizer, CharTokenizer
from microgpt.export import export
from microgpt.model import GPT

try:
    import llama_cpp
except ImportError as e:  # only collected with MICROGPT_LLAMACPP=1 (conftest.py): the make target installs it
    raise ImportError(f"{e}; run `make test-llamacpp`, which builds and installs llama-cpp-python") from None

SHAKESPEARE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare.txt"
BLOCK = 128
N_EMBD = 128  # micro's width (at 64, q8_0 top-1 agreement on the bpe model measured 98.9%: activations are q8_0 too)
# issue 12 asked float32 logits within 1e-3. llama.cpp's CPU GELU reads a float16 table (ggml-cpu GGML_GELU_FP16:
# input and output rounded to float16, tanh approximation), so its MLP activations carry float16's relative
# precision (2^-11 ~ 4.9e-4) and the logits' error scales with their size: measured 2.3e-3 to 4.6e-3 max abs on
# these models (logits up to ~10-14; 8.4e-3 on a longer-trained one with logits to 13.6). The test allows twice
# float16's precision relative to the largest logit; everything else is exact (EXACT_TOL).
F32_REL_TOL = 1e-3
EXACT_TOL = 1e-4  # the same model with its MLP input zeroed (GELU(0) = 0 on both sides): measured 5e-6
Q8_TOP1 = 0.99  # issue 12: q8_0 top-1 agreement on >= 99% of positions
WINDOWS = 16  # held-out windows of BLOCK tokens: 2048 positions
GREEDY_NEW = 96  # tokens generated greedily after a 32-token prompt (= BLOCK in all)


def _text() -> tuple[str, str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def _train(tok, vocab_size: int, train: str, steps: int, seed: int = 0) -> GPT:
    """A 2-layer GPT-2-shaped model (learned positions, LayerNorm, biases, GELU), AdamW on random windows."""
    data = torch.tensor(tok.encode(train))
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=4, n_embd=N_EMBD, bias=True)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(len(data) - BLOCK - 1, (16,), generator=g)
        x = torch.stack([data[i : i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1 : i + BLOCK + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _save(model: GPT, tok, path: Path) -> Path:
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    hp = {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}
    torch.save({"state_dict": sd, "hyper_parameters": hp}, path)
    return path


@contextlib.contextmanager
def _no_extra_buffers():
    """llama.cpp's model loader with `use_extra_bufts = false` (llama-cli: --no-repack). On this AMX Xeon the
    default moves q8_0 matrices into ggml's AMX buffer, whose kernels crash (SIGSEGV) on any batch of more
    than one token in llama-cpp-python 0.3.36; llama-cpp-python's constructor has no argument for it."""
    orig = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = orig


def _llama(path: Path, logits_all: bool = True, vocab_only: bool = False):
    """llama.cpp with a float32 KV cache and no flash attention: its precise path (the default cache is float16)."""
    with _no_extra_buffers():
        return llama_cpp.Llama(
            str(path),
            n_ctx=BLOCK,
            n_batch=BLOCK,
            n_threads=2,
            logits_all=logits_all,
            vocab_only=vocab_only,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            flash_attn=False,
            verbose=False,
        )


def _build(kind: str, tmp: Path) -> SimpleNamespace:
    train, held = _text()
    if kind == "bpe":
        tok = BPETokenizer.fit(train[:150_000], vocab_size=400)
        # a padded vocabulary (448 = 7 x 64): the export names an unused slot as llama.cpp's end-of-text token
        model = _train(tok, 448, train, steps=300)
    else:
        tok = CharTokenizer.fit(train + held)  # the alphabet of the whole file (the held-out part has an "X")
        model = _train(tok, tok.vocab_size, train, steps=300)
    ck = _save(model, tok, tmp / f"{kind}.ckpt")
    export(ck, "gguf", tmp / f"{kind}-f32")
    export(ck, "gguf", tmp / f"{kind}-q8", dtype="q8_0")
    ids = tok.encode(held)
    windows = torch.tensor(ids[: WINDOWS * BLOCK]).view(WINDOWS, BLOCK)
    with torch.no_grad():
        ref = model(windows)  # (WINDOWS, BLOCK, vocab) float32
    return SimpleNamespace(
        kind=kind,
        tok=tok,
        model=model,
        held=held,
        ids=ids,
        windows=windows,
        ref=ref,
        f32=tmp / f"{kind}-f32" / "model.gguf",
        q8=tmp / f"{kind}-q8" / "model.gguf",
    )


@pytest.fixture(scope="module", params=["bpe", "char"])
def trained(request, tmp_path_factory):
    torch.set_num_threads(2)
    return _build(request.param, tmp_path_factory.mktemp(request.param))


def _llama_logits(llm, windows: torch.Tensor) -> torch.Tensor:
    out = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        out.append(torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32)))
    return torch.stack(out)


def test_llama_cpp_float32_logits_match_microgpts(trained):
    llm = _llama(trained.f32)
    assert llm.n_vocab() == trained.model.config.vocab_size and llm.n_ctx() >= BLOCK
    got = _llama_logits(llm, trained.windows)
    ref = trained.ref
    assert ref.abs().max() > 5  # trained logits, not a comparison of near-zero tensors
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    n = ref.shape[0] * ref.shape[1]
    print(f"\n{trained.kind} f32: max |llama.cpp - microgpt| = {diff:.2e} over {n} positions (max |logit| {scale:.2f})")
    tol = F32_REL_TOL * scale
    assert diff <= tol, (diff, tol)
    # top-1 agrees wherever microgpt's top two are not within the float16 GELU's error of each other
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * tol
    assert decided.float().mean() > 0.9
    assert torch.equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])


def test_everything_but_the_fp16_gelu_matches_exactly(trained, tmp_path):
    """Embeddings, LayerNorms, attention, biases, the head: exact once the GELU's input is zero on both sides."""
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc.weight.zero_()
            block.mlp.fc.bias.zero_()
        ref = model(trained.windows[:4])
    export(_save(model, trained.tok, tmp_path / "m.ckpt"), "gguf", tmp_path / "g")
    got = _llama_logits(_llama(tmp_path / "g" / "model.gguf"), trained.windows[:4])
    assert ref.abs().max() > 5
    diff = (got - ref).abs().max().item()
    print(f"\n{trained.kind} f32 without the MLP's GELU: max |llama.cpp - microgpt| = {diff:.2e}")
    assert diff <= EXACT_TOL, diff


def _llama_cpp_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's float32 GELU as written in its source (GGML_GELU_FP16): x <= -10 -> 0, x >= 10 -> x, else the
    input rounded to float16 indexes a float16 table of the tanh-approximation GELU of every float16 value."""
    xh = x.to(torch.float16).to(torch.float32)
    y = F.gelu(xh, approximate="tanh").to(torch.float16).to(torch.float32)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def test_float32_logits_within_1e_3_with_llama_cpps_gelu_arithmetic(trained):
    """Issue 12's bound (1e-3, absolute) holds once microgpt's forward computes the GELU as llama.cpp's CPU
    backend does: every other difference between the two programs is below it."""
    model = copy.deepcopy(trained.model)
    for block in model.blocks:
        mlp = block.mlp
        mlp.forward = lambda x, mlp=mlp: mlp.dropout(mlp.proj(_llama_cpp_gelu(mlp.fc(x))))
    with torch.no_grad():
        ref = model(trained.windows)
    got = _llama_logits(_llama(trained.f32), trained.windows)
    diff = (got - ref).abs().max().item()
    exact_gelu = (got - trained.ref).abs().max().item()
    print(f"\n{trained.kind} f32 vs microgpt with llama.cpp's GELU: max diff {diff:.2e} (exact GELU: {exact_gelu:.2e})")
    assert ref.abs().max() > 5
    assert diff <= 1e-3, diff
    assert diff < exact_gelu / 4  # the GELU is what separates the two (not a tolerance that hides anything else)


def test_llama_cpp_q8_0_top1_agrees_with_microgpts_float32(trained):
    got = _llama_logits(_llama(trained.q8), trained.windows)
    ref = trained.ref
    top2 = ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    near_ties = (margin < 0.05).float().mean().item()
    print(
        f"\n{trained.kind} q8_0: top-1 agreement {agree:.4f} over {margin.numel()} positions "
        f"(microgpt top-2 margin < 0.05 nats at {near_ties:.3%}), max |dlogit| {(got - ref).abs().max():.3f}"
    )
    assert agree >= Q8_TOP1, agree
    # q8_0 really is quantized: its logits are further from microgpt's than the float32 file's
    assert (got - ref).abs().max() > 0.02  # float32: <= ~0.01 (above); q8_0 measured ~0.1


def test_llama_cpp_greedy_generation_is_microgpts(trained):
    prompt = trained.ids[:32]
    with torch.no_grad():
        ours = trained.model.generate(torch.tensor([prompt]), GREEDY_NEW, temperature=0.0)[0, 32:].tolist()
    llm = _llama(trained.f32, logits_all=False)
    theirs = list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), GREEDY_NEW))
    assert theirs == ours
    assert len(set(ours)) >= 3  # a real continuation, not one repeated token (a char model loops "the the ...")
    # and llama.cpp's detokenizer prints our text
    assert llm.detokenize(theirs).decode("utf-8") == trained.tok.decode(ours)


def test_llama_cpp_tokenizes_held_out_text_as_microgpt_does(trained):
    llm = _llama(trained.f32, logits_all=False, vocab_only=True)
    theirs = llm.tokenize(trained.held.encode("utf-8"), add_bos=False, special=False)
    assert theirs == trained.ids
    assert llm.detokenize(theirs).decode("utf-8") == trained.held


def test_text_completion_runs_end_to_end_in_llama_cpp(trained):
    """The way a user runs the GGUF: text in, text out (tokenize, greedy decode, stop rules, detokenize)."""
    llm = _llama(trained.f32, logits_all=False)
    if trained.kind == "char":
        # no end-of-text token and no spare slot: llama.cpp's gpt2 default (id 11) stays its end of generation
        assert llm.token_eos() == 11 and trained.tok.vocab_size > 11
        return
    assert llm.token_eos() >= trained.tok.vocab_size  # the padded vocabulary's unused slot, not id 11
    prompt = trained.held[:200]
    ids = trained.tok.encode(prompt)
    n = BLOCK - len(ids)
    with torch.no_grad():
        ours = trained.model.generate(torch.tensor([ids]), n, temperature=0.0)[0, len(ids) :].tolist()
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == trained.tok.decode(ours)


UNICODE = "naïve café — 日本語 😀 x² ½\n\tend. Ünïcödé!  two  spaces\n\n"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_multibyte_characters_tokenize_as_microgpt_does(kind, tmp_path):
    """Characters of 2, 3 and 4 UTF-8 bytes: the char export's merges join each one back into its token."""
    text = UNICODE * 3 + SHAKESPEARE.read_text(encoding="utf-8")[:5000]
    tok = CharTokenizer.fit(text) if kind == "char" else BPETokenizer.fit(text, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, bias=True))
    export(_save(model, tok, tmp_path / "m.ckpt"), "gguf", tmp_path / "g")
    llm = _llama(tmp_path / "g" / "model.gguf", logits_all=False, vocab_only=True)
    for sample in (UNICODE, text):
        assert llm.tokenize(sample.encode("utf-8"), add_bos=False) == tok.encode(sample)
    back, _ = microgpt.load(tmp_path / "g")  # the file still reads back in microgpt
    assert back.config.vocab_size == tok.vocab_size
