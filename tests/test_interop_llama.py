"""The Llama family (Llama, Qwen2, Mistral) in and out, with `transformers` as the judge.

Each architecture is a random tiny model built with transformers' own config class and saved with
`save_pretrained`, with a tokenizer.json (special tokens, a chat template) written by HF `tokenizers`:

in   microgpt.load gives transformers' fp32 logits within 1e-4 and the same 32 greedy tokens (KV cache on
     both sides); the tokenizer's special tokens and chat template are transformers' own; fine-tuning
     and distillation take the directory as it is.
out  `export format=hf` writes a directory AutoModelForCausalLM loads as the same architecture class,
     with the source's tensors and logits; a model trained in microgpt exports as Llama / Qwen2.

Tolerance 1e-4, as in test_interop.py: both sides run the same float32 math (measured: 0.0 here, the
same SDPA kernel on both sides), and every mapped option is shown to move the logits by far more
(test_each_mapped_option_changes_the_logits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (  # dev dependency, the real client
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import microgpt
from microgpt.config import GPTConfig
from microgpt.data.sources import stdlib_source
from microgpt.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_dict
from microgpt.errors import CheckpointError
from microgpt.export import export
from microgpt.model import GPT
from tests.conftest import compose, run_cli

TOL = 1e-4
V = 320  # tokenizer vocabulary (with the special tokens)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUIET = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.lr_monitor=null",
    "trainer.enable_model_summary=false",
    "logger=none",
    "print_sample=false",
]

# name -> (model class, config class, config kwargs); the shared shape is in make_hf_dir
ARCHS = {
    # GQA, untied head, Llama 3.1 rope scaling (original context 16 < 48 tokens: the scaling matters)
    "llama-gqa-llama3": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # MHA, tied head, head_dim 24 != 64/4, linear rope scaling, a large rms_norm_eps (so eps shows in the logits)
    "llama-tied-headdim": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            num_key_value_heads=4,
            head_dim=24,
            tie_word_embeddings=True,
            rms_norm_eps=0.05,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    # q/k/v biases, one key/value head, tied head, a vocabulary padded past the tokenizer's (as Qwen2 pads)
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=V + 16)),
    # Llama's attention_bias + mlp_bias (biases everywhere: microgpt's bias=true), one key/value head
    "llama-bias-mqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    # sliding window of 8 over 48-token inputs
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_source(max_bytes=150_000)


@pytest.fixture(scope="module")
def hf_tok(corpus):
    """A byte-level BPE with ChatML special tokens, trained with HF tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    assert tok.get_vocab_size() == V
    return tok


def write_tokenizer(d: Path, tok) -> None:
    tok.save(str(d / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},  # older hub configs
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
        "model_max_length": 128,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers' init (std 0.02, norms at 1) gives near-uniform logits; noise makes every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_hf_dir(root: Path, name: str, tok) -> SimpleNamespace:
    cls, ccls, kw = ARCHS[name]
    shape = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    torch.manual_seed(0)
    hf = cls(ccls(**{**shape, **kw})).eval()
    perturb(hf)
    d = root / name
    hf.save_pretrained(d)
    write_tokenizer(d, tok)
    return SimpleNamespace(dir=d, hf=hf, name=name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, hf_tok):
    root = tmp_path_factory.mktemp("llama-family")
    return {name: make_hf_dir(root, name, hf_tok) for name in ARCHS}


def ids(b: int = 2, t: int = 48, vocab: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf, x: torch.Tensor) -> torch.Tensor:
    return hf(x).logits


@torch.no_grad()
def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None  # 32 tokens whatever they are: no early stop on eos
    hf.generation_config.pad_token_id = 0
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True)
    assert out.shape[1] == prompt.shape[1] + n
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def save_ckpt(model: GPT, tok, path: Path) -> Path:
    """A checkpoint in the layout train.py writes."""
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    hp = {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}
    torch.save({"state_dict": sd, "hyper_parameters": hp}, path)
    return path


# ---------------------------------------------------------------- in: transformers -> microgpt


EXPECTED_CONFIG = {
    "llama-gqa-llama3": dict(attention="gqa", n_kv_head=2, tie_embeddings=False, qkv_bias=None, window=None),
    "llama-tied-headdim": dict(attention="mha", n_kv_head=4, tie_embeddings=True, head_dim=24, norm_eps=0.05),
    "qwen2": dict(attention="gqa", n_kv_head=1, tie_embeddings=True, qkv_bias=True, bias=False, vocab_size=V + 16),
    "llama-bias-mqa": dict(attention="gqa", n_kv_head=1, bias=True, qkv_bias=None),
    "mistral": dict(attention="sliding", window=8, n_kv_head=2, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_import_matches_transformers_logits_and_greedy_tokens(name, hf_dirs):
    h = hf_dirs[name]
    model, tok = microgpt.load(h.dir)
    c = model.config
    assert (c.position, c.norm, c.mlp, c.n_layer, c.n_head, c.n_embd, c.mlp_hidden) == (
        "rope",
        "rmsnorm",
        "swiglu",
        2,
        4,
        64,
        96,
    )
    for k, v in EXPECTED_CONFIG[name].items():
        assert getattr(c, k) == v, (k, getattr(c, k), v)
    assert (model.lm_head is None) == c.tie_embeddings
    x = ids()
    ref = hf_logits(h.hf, x)
    assert ref.abs().max() > 2  # not a comparison of two near-zero tensors
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL
    prompt = ids(1, 10, seed=7)
    want = hf_greedy(h.hf, prompt, 32)
    assert torch.equal(model.generate(prompt, 32, temperature=0), want)
    assert tok.vocab_size == V


def test_each_mapped_option_changes_the_logits(hf_dirs):
    """The options the parity test relies on are not silent: getting any one wrong breaks the 1e-4 match."""

    def diff(name: str, **change) -> float:
        model, _ = microgpt.load(hf_dirs[name].dir)
        wrong = GPT(GPTConfig(**{**model.config.to_dict(), **change})).eval()
        wrong.load_state_dict(model.state_dict(), strict=False)  # qkv_bias=False: the biases are left out
        x = ids()
        with torch.no_grad():
            return (wrong(x) - model(x)).abs().max().item()

    assert diff("llama-gqa-llama3", rope_scaling=None) > 1e-3
    assert diff("llama-gqa-llama3", rope_theta=10000.0) > 1e-3
    assert diff("llama-tied-headdim", rope_scaling=None) > 1e-3
    assert diff("llama-tied-headdim", norm_eps=1e-6) > 1e-3
    assert diff("mistral", attention="gqa", window=None) > 1e-3
    assert diff("qwen2", qkv_bias=False) > 1e-3


def test_tokenizer_special_tokens_and_chat_template_are_transformers_own(hf_dirs, corpus):
    d = hf_dirs["llama-gqa-llama3"].dir
    _, tok = microgpt.load(d)
    ref = AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template == ref.chat_template == CHATML
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (ref.eos_token_id, ref.bos_token_id, ref.pad_token_id)
    assert tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.special_tokens["eos_token"] == "<|im_end|>"
    text = corpus[:70_000] + "<|im_start|>user\nhi<|im_end|>"  # > 64K characters: encoded in pieces
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}]
    rendered = ref.apply_chat_template(chat, tokenize=False)
    assert tok.encode(rendered) == ref.apply_chat_template(chat, tokenize=True, return_dict=False)
    # a checkpoint keeps them: the tokenizer record rebuilds with the same template and ids
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert (again.chat_template, again.eos_id, again.special_tokens) == (
        tok.chat_template,
        tok.eos_id,
        tok.special_tokens,
    )
    # the template in its own file (as transformers >= 4.47 saves it) wins over tokenizer_config.json's
    d2 = copy_dir(d, d.parent / "jinja")
    (d2 / "chat_template.jinja").write_text(CHATML.replace("assistant", "bot"), encoding="utf-8")
    assert microgpt.load(d2)[1].chat_template == AutoTokenizer.from_pretrained(str(d2)).chat_template != CHATML
    # tokenizers trained here have none
    bpe = BPETokenizer.fit(corpus[:5000], 300)
    assert (bpe.chat_template, bpe.special_tokens, bpe.eos_id) == (None, {}, None)


def test_sentencepiece_style_tokenizer_encodes_long_text_as_transformers_does(tmp_path, corpus):
    """Llama 2 / TinyLlama tokenizers (Metaspace: a start marker per input) cannot be encoded in pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [corpus], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    d = tmp_path / "sp"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )
    from microgpt.data.tokenizers import HFTokenizer

    mine, ref = HFTokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    text = corpus[:70_000]
    assert mine.encode(text) == ref.encode(text, add_special_tokens=False)
    assert (mine.eos_id, mine.bos_id) == (ref.eos_token_id, ref.bos_token_id) == (2, 1)


BAD = {
    "unknown-rope-type": (
        "llama-gqa-llama3",
        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        "rope scaling type 'yarn'",
    ),
    "unknown-rope-type-v4-layout": (
        "llama-tied-headdim",
        dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
        "rope scaling type 'dynamic'",
    ),
    "partial-rotary": ("llama-gqa-llama3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "activation": ("llama-gqa-llama3", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "attention-bias-alone": ("llama-gqa-llama3", dict(attention_bias=True), "attention_bias=True with mlp_bias=False"),
    "qwen2-layer-sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "use_sliding_window=true",
    ),
    "config-deeper-than-weights": ("llama-gqa-llama3", dict(num_hidden_layers=3), r"missing .*blocks\.2\."),
    "config-shallower-than-weights": ("mistral", dict(num_hidden_layers=1), r"unexpected keys .*layers\.1\."),
    "config-wider-than-weights": ("qwen2", dict(intermediate_size=128), r"do not match their config\.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_refused_features_name_themselves_in_one_line(case, hf_dirs, tmp_path):
    src, change, pattern = BAD[case]
    d = copy_dir(hf_dirs[src].dir, tmp_path / case)
    edit_config(d, **change)
    with pytest.raises(CheckpointError, match=pattern) as e:
        microgpt.load(d)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_names_itself(tmp_path, hf_tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    write_tokenizer(tmp_path / "neox", hf_tok)
    with pytest.raises(CheckpointError, match=r"'gpt_neox' model \(GPTNeoXForCausalLM\), an architecture") as e:
        microgpt.load(tmp_path / "neox")
    msg = str(e.value)
    assert "\n" not in msg and "llama (LlamaForCausalLM)" in msg and "qwen2" in msg and "mistral" in msg


@pytest.mark.slow
def test_cli_refuses_an_unknown_rope_type_with_one_error_line_and_writes_nothing(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["llama-gqa-llama3"].dir, tmp_path / "yarn")
    edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    out = tmp_path / "out"
    r = run_cli(["-m", "microgpt.export", f"ckpt={d}", "format=hf", f"out={out}"], timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'yarn'" in errors[0] and "llama3" in errors[0], r.stderr[-2000:]
    assert not out.exists()


def test_hub_names_fail_offline_naming_the_local_directory_alternative(monkeypatch, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: tests never reach the network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # empty: nothing cached
    with pytest.raises(CheckpointError, match=r"cannot fetch hf:HuggingFaceTB/SmolLM2-135M .*local directory") as e:
        microgpt.load("hf:HuggingFaceTB/SmolLM2-135M")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_cli_with_a_hub_name_offline_stops_with_one_error_line(tmp_path, corpus):
    f = tmp_path / "t.txt"
    f.write_text(corpus[:5000], encoding="utf-8")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    r = run_cli(
        [
            "train.py",
            "experiment=finetune",
            "init_from=hf:HuggingFaceTB/SmolLM2-135M",
            f"data.path={f}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        timeout=240,
        env=env,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "hf:HuggingFaceTB/SmolLM2-135M" in errors[0] and "init_from=/path/to/SmolLM2-135M" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- out: microgpt -> transformers


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_gives_transformers_the_same_architecture_tensors_and_logits(name, hf_dirs, tmp_path):
    h = hf_dirs[name]
    out = tmp_path / "out"
    export(h.dir, "hf", out)  # an HF directory is a checkpoint like any other
    back = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is type(h.hf)
    a, b = h.hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "sliding_window"):
        if hasattr(h.hf.config, k):  # (Qwen2Config has no head_dim: hidden_size // num_attention_heads)
            assert getattr(back.config, k) == getattr(h.hf.config, k), k
    assert back.config.rope_parameters == h.hf.config.rope_parameters
    x = ids(seed=3)
    assert (hf_logits(back, x) - hf_logits(h.hf, x)).abs().max().item() <= TOL
    # the tokenizer comes back with its special tokens and chat template
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|endoftext|>"
    # and microgpt reads its own export again
    model, _ = microgpt.load(out)
    with torch.no_grad():
        assert (model(x) - hf_logits(h.hf, x)).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("kw", "cls"),
    [
        (dict(attention="gqa", n_kv_head=2), LlamaForCausalLM),
        (dict(attention="gqa", n_kv_head=1, qkv_bias=True, tie_embeddings=False), Qwen2ForCausalLM),
        (dict(attention="sliding", window=6, rope_scaling={"rope_type": "linear", "factor": 4.0}), MistralForCausalLM),
    ],
    ids=["llama", "qwen2", "mistral"],
)
def test_a_model_trained_here_exports_to_transformers_with_its_logits_and_greedy_tokens(kw, cls, tmp_path, corpus):
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=300,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        **kw,
    )
    src = GPT(cfg).eval()
    perturb(src, 1)
    tok = BPETokenizer.fit(corpus[:20_000], 300)
    ck = save_ckpt(src, tok, tmp_path / "m.ckpt")
    export(ck, "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf) is cls
    x = ids(vocab=300, seed=5)
    with torch.no_grad():
        assert (src(x) - hf_logits(hf, x)).abs().max().item() <= TOL
    prompt = ids(1, 8, vocab=300, seed=9)
    assert torch.equal(hf_greedy(hf, prompt, 32), src.generate(prompt, 32, temperature=0))


def test_models_neither_family_holds_are_refused_naming_both(tmp_path):
    m = GPT(GPTConfig(vocab_size=60, block_size=32, n_layer=1, n_head=2, n_embd=32, position="rope", norm="layernorm"))
    ck = save_ckpt(m, CharTokenizer("".join(chr(65 + i) for i in range(60))), tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"as GPT-2: position=rope .*as Llama: norm=layernorm") as e:
        export(ck, "hf", tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_rope_scaling_and_qkv_bias_are_model_settings_with_one_line_errors():
    from microgpt.errors import ConfigError
    from microgpt.train import model_config

    cfg = model_config(
        compose(["model.position=rope", "model.rope_scaling={rope_type:linear,factor:2.0}", "model.qkv_bias=true"]), 60
    )
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0} and cfg.qkv_bias and not cfg.bias
    m = GPT(cfg)
    assert m.blocks[0].attn.qkv.bias is not None and m.blocks[0].attn.proj.bias is None
    base = GPT(GPTConfig(**{**cfg.to_dict(), "rope_scaling": None}))
    assert torch.allclose(m.pos.inv_freq * 2, base.pos.inv_freq)  # linear: every frequency halved
    for bad, needle in [
        ({"rope_type": "yarn", "factor": 4.0}, "type 'yarn' is not implemented; choose one of linear, llama3"),
        ({"rope_type": "llama3", "factor": 8.0}, "lacks ['low_freq_factor'"),
        ("linear", "must be a mapping"),
    ]:
        with pytest.raises(ConfigError) as e:
            GPTConfig(position="rope", rope_scaling=bad)
        assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the SmolLM2-135M preset


def test_smollm2_preset_has_smollm2_135m_shape_and_parameter_count(tmp_path):
    from microgpt.hf import llama_config_dict
    from microgpt.train import model_config

    cfg = model_config(compose(["model=smollm2_135m"]), vocab_size=49152)
    V_, C, L, H, KV, hd, FF = 49152, 576, 30, 9, 3, 64, 1536
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.hidden_dim) == (
        V_,
        C,
        L,
        H,
        KV,
        hd,
        FF,
    )
    per_layer = C * (H * hd) + 2 * C * (KV * hd) + (H * hd) * C + 3 * C * FF + 2 * C  # q, k+v, o, swiglu, 2 norms
    formula = V_ * C + L * per_layer + C  # tied embedding/head, blocks, final norm
    assert formula == 134_515_008  # SmolLM2-135M's published size
    with torch.device("meta"):
        assert GPT(cfg).num_params() == formula
    # transformers builds the same size from the config.json an export writes
    from transformers import AutoConfig

    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(llama_config_dict(cfg, CharTokenizer("ab"))), encoding="utf-8")
    hf_cfg = AutoConfig.from_pretrained(str(d))
    assert (hf_cfg.model_type, hf_cfg.num_key_value_heads, hf_cfg.head_dim, hf_cfg.tie_word_embeddings) == (
        "llama",
        3,
        64,
        True,
    )
    with torch.device("meta"):
        assert sum(p.numel() for p in LlamaForCausalLM(hf_cfg).parameters()) == formula


# ---------------------------------------------------------------- fine-tuning and distillation


@pytest.mark.slow
def test_finetune_from_a_llama_dir_lowers_loss_keeps_the_tokenizer_and_exports(hf_dirs, corpus, tmp_path):
    from microgpt.train import run

    h = hf_dirs["llama-gqa-llama3"]
    f = tmp_path / "ft.txt"
    f.write_text(corpus, encoding="utf-8")
    cfg = compose(
        [
            "experiment=finetune",
            f"init_from={h.dir}",
            f"data.path={f}",
            "model.block_size=32",
            "model.dropout=0.0",
            "optimizer.lr=3e-3",  # a random base: the preset's 3e-5 is for real pretrained weights
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "data.eval_batches=4",
            *QUIET,
        ],
        output_dir=tmp_path / "run",
    )
    res = run(cfg)
    base, base_tok = microgpt.load(h.dir)
    dm = res["trainer"].datamodule
    with torch.no_grad():
        base_loss = sum(F.cross_entropy(base(x).flatten(0, 1), y.flatten()).item() for x, y in dm.val_dataloader()) / 4
    assert res["val_loss"] < base_loss - 0.3, (res["val_loss"], base_loss)
    tuned, tok = microgpt.load(res["last_ckpt"])
    assert tok.to_dict() == base_tok.to_dict() and tok.chat_template == CHATML
    assert tuned.config.rope_scaling == base.config.rope_scaling and tuned.config.attention == "gqa"
    # the fine-tuned model goes back to transformers as a Llama with its own logits
    export(res["last_ckpt"], "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf) is LlamaForCausalLM
    x = ids(seed=11)
    with torch.no_grad():
        assert (tuned(x) - hf_logits(hf, x)).abs().max().item() <= TOL
        assert (tuned(x) - hf_logits(h.hf, x)).abs().max().item() > 0.1  # it did change


@pytest.mark.slow
def test_lora_on_a_llama_dir_trains_adapters_only_and_merges_back_to_transformers(hf_dirs, corpus, tmp_path):
    """+plugin=lora on a Llama directory, unchanged: the base stays frozen, the adapter-only file rebuilds the
    tuned model, and the merged export is a LlamaForCausalLM with the tuned model's logits."""
    import subprocess
    import sys

    from microgpt.train import run
    from tests.conftest import ROOT

    h = hf_dirs["llama-gqa-llama3"]
    f = tmp_path / "ft.txt"
    f.write_text(corpus, encoding="utf-8")
    over = ["experiment=finetune", f"init_from={h.dir}", f"data.path={f}", "model.block_size=32"]
    over += ["model.dropout=0.0", "optimizer.lr=3e-3", "trainer.max_steps=20", "trainer.val_check_interval=20"]
    res = run(compose([*over, "data.eval_batches=4", "+plugin=lora", "plugins.lora.dropout=0.0", *QUIET],
                      output_dir=tmp_path / "run"))  # fmt: skip
    base, _ = microgpt.load(h.dir)
    tuned = res["module"].model.eval()
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable), sorted(trainable)[:5]
    x = ids(seed=12)
    with torch.no_grad():
        live = tuned(x)
        assert (live - base(x)).abs().max().item() > 1e-3  # the adapters learned something
    adapter = Path(res["output_dir"]) / "checkpoints" / "adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size < 0.2 * sum(p.numel() * 4 for p in base.parameters())
    from_adapter, _ = microgpt.load(adapter, base=h.dir)
    with torch.no_grad():
        assert (from_adapter(x) - live).abs().max().item() <= 1e-5
    merged = tmp_path / "merged"
    p = subprocess.run(
        [sys.executable, str(ROOT / "plugins" / "lora" / "merge.py"), f"ckpt={res['last_ckpt']}", f"out={merged}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    export(str(merged), "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf) is LlamaForCausalLM
    with torch.no_grad():
        assert (hf_logits(hf, x) - live).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "student",
    [
        ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.attention=gqa", "model.n_kv_head=1"],
        [],  # GPT-shaped (learned positions, LayerNorm, GELU)
    ],
    ids=["llama-student", "gpt-student"],
)
def test_distill_from_a_llama_teacher_into_a_smaller_student(student, hf_dirs, corpus, tmp_path):
    from microgpt.plugins import load_plugin
    from microgpt.train import run

    Distill = load_plugin("distill").Distill
    h = hf_dirs["llama-gqa-llama3"]
    f = tmp_path / "d.txt"
    f.write_text(corpus, encoding="utf-8")
    cfg = compose(
        [
            "model=nano",
            *student,
            "debug=fast",
            "trainer.max_steps=6",
            "data=text",
            f"data.path={f}",
            "data.tokenizer=hf",
            f"data.tokenizer_path={h.dir}",
            "+plugin=distill",
            f"plugins.distill.teacher={h.dir}",
            *QUIET,
        ],
        output_dir=tmp_path / "run",
    )
    res = run(cfg)
    cb = next(c for c in res["trainer"].callbacks if isinstance(c, Distill))
    x = ids(2, 32, seed=4)
    with torch.no_grad():
        assert (cb.teacher(x) - hf_logits(h.hf, x)).abs().max().item() <= TOL
    assert res["module"].objective.teacher is cb.teacher  # the student trained against it
    student_model, student_tok = microgpt.load(res["last_ckpt"])
    assert student_model.num_params() < cb.teacher.num_params()
    assert student_tok.chat_template == CHATML and student_tok.vocab_size == V
