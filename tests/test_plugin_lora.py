"""The lora plugin: LoRA/DoRA adapters on a trained base, adapter-only checkpoints, merge, and its stacks.

Every base here is a nano model trained for a few steps on the embedded stdlib corpus (or a random GPT-2
built by `transformers`), so nothing reads ../shared. Tolerances: the merged model computes W + s B A once
instead of x W^T + s (x A^T) B^T, a different float32 summation order: a few ulps, measured ~2e-7 on
these logits; 1e-5 is the issue's bound. Reloads (the same math) are compared exactly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, run_cli

import microgpt
from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError
from microgpt.model import GPT, build_model
from microgpt.plugins import load_plugin
from microgpt.training.train import run

QUIET = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_model_summary=false",
    "print_sample=false",
]
DATA = ["data=stdlib", "data.source_options.max_bytes=60000"]
FAST = ["model=nano", "debug=fast", "scheduler.warmup_steps=2", "optimizer.lr=1e-2"]
TUNE = ["trainer.max_steps=30", "trainer.val_check_interval=15", "plugins.lora.dropout=0.0"]
# the fine-tuning task: a small Python snippet the stdlib-trained base has never seen repeated
TASK_TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n" * 400
MERGE = str(ROOT / "plugins" / "lora" / "merge.py")


@pytest.fixture(scope="module")
def lora():
    return load_plugin("lora")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(run_dir: Path, key: str = "train_loss") -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def _went_down(losses: list[float], margin: float = 0.05) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin


def _probe(vocab: int, t: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model, x) -> torch.Tensor:
    return model.eval()(x)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lora-base") / "run"
    return run(compose([*FAST, *DATA, "trainer.max_steps=60", *QUIET], output_dir=out))["last_ckpt"]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> list[str]:
    p = tmp_path_factory.mktemp("lora-task") / "task.txt"
    p.write_text(TASK_TEXT, encoding="utf-8")
    return ["data=text", f"data.path={p}"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base, task):
    """One LoRA fine-tune of `base` (adapters on qkv, proj, fc), shared by the reload/merge tests."""
    out = tmp_path_factory.mktemp("lora-tuned") / "run"
    res = run(compose([*FAST, *task, *TUNE, f"init_from={base}", "+plugin=lora", *QUIET], output_dir=out))
    return res


# ---- the layer, without training -------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_start_as_the_base_and_merge_to_the_same_logits(lora, dora):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True))
    spec = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "dora": dora}
    adapted = build_model(GPTConfig.from_dict({**plain.config.to_dict(), "converters": [spec]}))
    adapted.load_state_dict(plain.state_dict(), strict=False)  # plain keys land on `.base`; DoRA's m = ||W||
    x = _probe(61)
    ref = _logits(plain, x)
    assert (_logits(adapted, x) - ref).abs().max().item() == 0.0  # B = 0 (and m = ||W||): exactly the base
    assert len(lora.lora_layers(adapted)) == 8  # qkv, attn.proj, fc, mlp.proj in 2 blocks
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_(0, 0.2)
            if dora:
                layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    live = _logits(adapted, x)
    assert (live - ref).abs().max().item() > 0.05  # the adapters change the function
    merged = lora.merge(adapted)
    assert merged.config.converters == [] and type(merged) is GPT
    assert set(merged.state_dict()) == set(plain.state_dict())  # a plain model: no adapter tensors left
    assert (_logits(merged, x) - live).abs().max().item() <= 1e-5


def test_targets_and_options_are_checked(lora):
    m = GPT(GPTConfig(vocab_size=61, n_layer=1, n_head=2, n_embd=32, block_size=32))
    with pytest.raises(ConfigError, match=r"\['wq'\] match no Linear.*attn.proj.*qkv"):
        lora.lora(m, targets=["qkv", "wq"])
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        lora.lora(m, rank=0)
    only_mlp = lora.lora(GPT(m.config), targets=["mlp.proj"])
    assert list(lora.lora_layers(only_mlp)) == ["blocks.0.mlp.proj"]
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        lora.lora(only_mlp)


def test_frozen_parameters_get_no_gradient_and_extras_train_on_request(lora):
    m = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True))
    lora.lora(m, rank=2, train_norms=True, train_biases=True)
    m(_probe(61)).sum().backward()
    for name, p in m.named_parameters():
        leaf = name.split(".")[-1]
        expect = leaf.startswith("lora_") or "norm" in name or leaf == "bias"
        assert p.requires_grad == expect, name
        assert (p.grad is not None) == expect, name
    assert not m.wte.weight.requires_grad and not m.blocks[0].attn.qkv.base.weight.requires_grad


# ---- training, adapter-only checkpoints, reload, merge ------------------------------------------------------------


def test_lora_trains_only_adapters_and_writes_a_small_adapter(tuned, base, lora):
    out = Path(tuned["output_dir"])
    assert _went_down(_losses(out))
    module = tuned["module"]
    adapters = {id(p) for n, p in module.named_parameters() if n.split(".")[-1].startswith("lora_")}
    opt = module.trainer.optimizers[0]
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == adapters and len(held) == len(adapters) == 16
    assert all(id(p) in adapters for p in opt.state)  # optimizer state exists only for adapters
    # the base did not move: every non-adapter tensor equals the base checkpoint's
    base_sd = microgpt.load(base)[0].state_dict()
    sd = module.model.state_dict()
    for k, v in sd.items():
        if not k.split(".")[-1].startswith("lora_"):
            assert torch.equal(v, base_sd[k.replace(".base.", ".")]), k
    assert any(
        not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        for layer in lora.lora_layers(module.model).values()
    )
    # the adapter-only checkpoint: the adapter tensors only, a few kilobytes, and where its base is
    from safetensors.torch import load_file

    ck = out / "checkpoints"
    saved = load_file(str(ck / "adapter.safetensors"))
    assert sorted(saved) == sorted(n for n in sd if n.split(".")[-1].startswith("lora_"))
    size = (ck / "adapter.safetensors").stat().st_size
    assert size < 64_000 and size * 5 < Path(base).stat().st_size
    meta = json.loads((ck / "adapter.json").read_text())
    assert meta["base"] == str(Path(base).resolve()) and len(meta["base_sha256"]) == 64
    assert meta["lora"]["rank"] == 8 and meta["tokenizer"] is None  # the base's tokenizer, not repeated


def test_adapter_reloads_in_a_fresh_process_with_the_live_logits(tuned, base, tmp_path):
    model = tuned["module"].model
    x = _probe(model.config.vocab_size)
    live = _logits(model, x)
    torch.save(x, tmp_path / "x.pt")
    adapter = Path(tuned["output_dir"]) / "checkpoints"
    code = (
        "import sys, torch, microgpt\n"
        "x = torch.load(sys.argv[2])\n"
        "for i, (src, kw) in enumerate([(sys.argv[1], {}), (sys.argv[1] + '/adapter.safetensors', {'base': sys.argv[3]})]):\n"
        "    m, tok = microgpt.load(src, **kw)\n"
        "    torch.save(m(x).detach(), sys.argv[4] + f'/out{i}.pt')\n"
    )
    p = run_cli(["-c", code, str(adapter), str(tmp_path / "x.pt"), base, str(tmp_path)], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"out{i}.pt"), live)
    # the full checkpoint of the run rebuilds the same model through the recorded converter
    assert torch.equal(_logits(microgpt.load(tuned["last_ckpt"])[0], x), live)


def test_adapter_refuses_a_base_it_was_not_trained_on(tuned, tmp_path):
    adapter = Path(tuned["output_dir"]) / "checkpoints" / "adapter.safetensors"
    other = GPT(GPTConfig.from_dict({**tuned["module"].model.config.to_dict(), "converters": []}))
    from microgpt.io.checkpoint import read_checkpoint

    hp = read_checkpoint(tuned["last_ckpt"])["hyper_parameters"]
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in other.state_dict().items()},
            "hyper_parameters": {**hp, "model": other.config.to_dict()},
        },
        tmp_path / "other.ckpt",
    )
    with pytest.raises(CheckpointError, match="not the base model adapter .* was trained on"):
        microgpt.load(adapter, base=tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not exist; pass base=PATH"):
        microgpt.load(adapter, base=tmp_path / "missing.ckpt")


def test_merge_cli_gives_a_plain_model_every_export_accepts(tuned, tmp_path):
    from microgpt.io.export import export

    live_model = tuned["module"].model
    x = _probe(live_model.config.vocab_size)
    live = _logits(live_model, x)
    adapter = Path(tuned["output_dir"]) / "checkpoints"
    out = tmp_path / "merged"
    p = run_cli([MERGE, f"ckpt={adapter}", f"out={out}"], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["merged_layers"] == 8 and report["converters"] == [] and report["max_abs_logit_diff"] <= 1e-5
    merged, _ = microgpt.load(out)
    assert merged.config.converters == [] and not any("lora" in k for k in merged.state_dict())
    assert (_logits(merged, x) - live).abs().max().item() <= 1e-5
    for fmt in ("safetensors", "hf", "int8", "gguf"):
        summary = export(out, fmt, tmp_path / fmt)
        assert summary["bytes"] > 0
    hf, _ = microgpt.load(tmp_path / "hf")  # the GPT-2 layout reads back with the adapted logits
    assert (_logits(hf, x) - live).abs().max().item() <= 1e-4
    # bad input: one line, exit status 2, nothing written
    p = run_cli([MERGE, f"ckpt={adapter}"], timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()] and "out= is required" in p.stderr
    p = run_cli([MERGE, f"ckpt={tuned['output_dir']}/nothing", f"out={tmp_path / 'x'}"], timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and not (tmp_path / "x").exists()


def test_lora_with_every_default_on(base, task, tmp_path, capsys, lora):
    """The shipped defaults (print_sample, progress bar, model summary, CSV logger, dropout 0.05)."""
    out = tmp_path / "run"
    res = run(
        compose(["model=nano", *task, "trainer.max_steps=30", f"init_from={base}", "+plugin=lora"], output_dir=out)
    )
    printed = capsys.readouterr().out
    assert "--- sample ---" in printed and "lora: training" in printed and "lora: wrote" in printed
    assert _losses(out)[-1] < _losses(out)[0]
    x = _probe(res["module"].model.config.vocab_size)
    assert torch.equal(_logits(microgpt.load(out / "checkpoints")[0], x), _logits(res["module"].model, x))


# ---- stacks -----------------------------------------------------------------------------------------------------------


def test_dora_on_an_hf_gpt2_directory(tmp_path, task, lora):
    """init_from an HF GPT-2 dir (built by transformers), DoRA with trainable biases: trains, reloads."""
    from test_interop import EOT, train_bpe
    from transformers import GPT2Config, GPT2LMHeadModel

    from microgpt.data.sources import stdlib_source

    d = tmp_path / "gpt2"
    text = stdlib_source(max_bytes=60_000)
    tok = train_bpe(text, 300)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=tok.token_to_id(EOT))
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.model.save(str(d))
    out = tmp_path / "run"
    over = [*FAST, *task, *TUNE, f"init_from={d}", "model.block_size=32", "+plugin=lora", "plugins.lora.dora=true"]
    res = run(compose([*over, "plugins.lora.train_biases=true", *QUIET], output_dir=out))
    assert _went_down(_losses(out))
    model = res["module"].model
    assert model.config.mlp == "gelu_tanh" and all(layer.dora for layer in lora.lora_layers(model).values())
    x = _probe(300)
    assert torch.equal(_logits(microgpt.load(out / "checkpoints")[0], x), _logits(model, x))
    merged = lora.merge(model)
    assert (_logits(merged, x) - _logits(model, x)).abs().max().item() <= 1e-5


def test_lora_on_a_qat_base_trains_float_adapters_over_a_frozen_fake_quantized_base(base, task, tmp_path, lora):
    from torchao.quantization.qat import FakeQuantizedLinear

    out = tmp_path / "run"
    res = run(compose([*FAST, *task, *TUNE, f"init_from={base}", "+plugin=[lora,qat]", *QUIET], output_dir=out))
    assert _went_down(_losses(out))
    model = res["module"].model
    assert [c["name"] for c in model.config.converters] == ["lora", "qat"]
    layers = lora.lora_layers(model)
    assert len(layers) == 8 and all(isinstance(m.base, FakeQuantizedLinear) for m in layers.values())
    assert all(not m.base.weight.requires_grad and m.lora_A.requires_grad for m in layers.values())
    base_w = microgpt.load(base)[0].blocks[0].attn.qkv.weight
    assert torch.equal(layers["blocks.0.attn.qkv"].base.weight, base_w)  # the quantized base did not move
    x = _probe(model.config.vocab_size)
    assert torch.equal(_logits(microgpt.load(out / "checkpoints")[0], x), _logits(model, x))


def test_lora_distilled_from_a_fully_fine_tuned_teacher(base, task, tmp_path):
    teacher = run(
        compose([*FAST, *task, "trainer.max_steps=30", f"init_from={base}", *QUIET], output_dir=tmp_path / "full")
    )
    out = tmp_path / "run"
    over = [
        *FAST,
        *task,
        *TUNE,
        f"init_from={base}",
        "+plugin=[lora,distill]",
        f"plugins.distill.teacher={teacher['last_ckpt']}",
    ]
    res = run(compose([*over, *QUIET], output_dir=out))
    assert _went_down(_losses(out, "train_ce")) and _went_down(_losses(out, "train_kd"), 0.01)
    opt = res["module"].trainer.optimizers[0]
    assert all(p.shape[0] == 8 or p.shape[1] == 8 for g in opt.param_groups for p in g["params"])  # rank-8 factors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["init_from=null"], "plugins.lora adapts a trained model: set init_from=PATH"),
        (["strategy=fsdp"], "plugins.lora supports strategy=auto or ddp"),
        (["strategy=deepspeed"], "plugins.lora supports strategy=auto or ddp"),
        (["plugins.lora.rank=-1"], "plugins.lora.rank must be a positive integer"),
        (["plugins.lora.targets=[qkv,nope]"], "plugins.lora.targets ['nope'] match no Linear"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_training(base, tmp_path, extra, message):
    cfg = compose(
        ["model=nano", *DATA, f"init_from={base}", "+plugin=lora", *QUIET, *extra], output_dir=tmp_path / "run"
    )
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # no half-made run directory


def test_lora_with_prune_is_refused_in_one_line_by_the_cli(base, tmp_path):
    args = [
        "train.py",
        "model=nano",
        *DATA,
        f"init_from={base}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "+plugin=[lora,prune]",
    ]
    p = run_cli(args, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: plugins 'lora' and 'prune' cannot be combined"), p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rows_of_tokens_the_base_lacks_train_and_merge(lora):
    """data=chat grows the vocabulary: the new rows are adapter parameters, the base rows stay frozen."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=61, n_layer=1, n_head=2, n_embd=32, block_size=32))
    grown = GPT(GPTConfig.from_dict({**base.config.to_dict(), "vocab_size": 64}))
    sd = base.state_dict()
    sd["wte.weight"] = torch.cat([sd["wte.weight"], torch.randn(3, 32)])
    grown.load_state_dict(sd)
    spec = {"name": "lora", "rank": 2, "base_vocab": 61}
    adapted = build_model(GPTConfig.from_dict({**grown.config.to_dict(), "converters": [spec]}))
    adapted.load_state_dict(grown.state_dict(), strict=False)  # a plain 64-row table splits into base + new rows
    x = torch.tensor([[1, 2, 61, 62, 63, 5]])
    assert torch.equal(_logits(adapted, x), _logits(grown, x))
    assert adapted.wte.base.weight.shape == (61, 32) and not adapted.wte.base.weight.requires_grad
    adapted.train()(x).sum().backward()
    assert adapted.wte.lora_new.grad is not None and adapted.wte.lora_new.grad.abs().sum() > 0
    assert "wte.lora_new" in lora.adapter_state(adapted, spec)
    # the adapter (new rows included) on the 61-row base rebuilds the model
    again = build_model(GPTConfig.from_dict({**grown.config.to_dict(), "converters": [spec]}))
    again.load_state_dict({**base.state_dict(), **lora.adapter_state(adapted, spec)}, strict=True)
    assert torch.equal(_logits(again, x), _logits(adapted, x))
    merged = lora.merge(adapted)
    assert merged.wte.weight.shape == (64, 32) and (_logits(merged, x) - _logits(adapted, x)).abs().max() <= 1e-5


def test_lora_on_chat_data_trains_the_new_token_rows_and_scores_from_the_adapter(base, tmp_path, lora):
    """data=chat adds its tokens to the base tokenizer: their rows train, the adapter carries them and the
    grown tokenizer, and the adapter (on its recorded base) is what the task scorer loads."""
    from microgpt.tasks import build_speaker_task, score

    play = ROOT / "tests" / "fixtures" / "speakers_play.txt"
    build_speaker_task(str(play), str(tmp_path / "task"), top_n=3, test_fraction=0.34)
    out = tmp_path / "run"
    chat = ["data=chat", f"data.path={tmp_path / 'task' / 'train.jsonl'}", "data.batch_size=4"]
    res = run(
        compose(["model=nano", *chat, *FAST[1:], *TUNE, f"init_from={base}", "+plugin=lora", *QUIET], output_dir=out)
    )
    model = res["module"].model
    base_vocab = microgpt.load(base)[0].config.vocab_size
    assert model.config.vocab_size > base_vocab and model.wte.lora_new.shape[0] == model.config.vocab_size - base_vocab
    assert [c.get("base_vocab") for c in model.config.converters] == [base_vocab]
    assert model.wte.lora_new.requires_grad and not model.wte.base.weight.requires_grad
    meta = json.loads((out / "checkpoints" / "adapter.json").read_text())
    assert meta["tokenizer"] is not None and meta["tokenizer"] != microgpt.load(base)[1].to_dict()
    x = torch.tensor([list(range(base_vocab - 4, model.config.vocab_size))])  # the new tokens included
    live = _logits(model, x)
    again, tok = microgpt.load(out / "checkpoints")
    assert torch.equal(_logits(again, x), live) and tok.vocab_size == model.config.vocab_size
    assert (_logits(lora.merge(model), x) - live).abs().max().item() <= 1e-5
    s = score(str(out / "checkpoints"), str(tmp_path / "task"))
    assert s["mode"] == "chat" and s["n"] > 0 and 0.0 <= s["ll_accuracy"] <= 1.0
