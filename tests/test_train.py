"""Integration tests of training: real (tiny) runs checked against independent references.

References are a plain PyTorch loop, analytic values (ln vocab), naive re-implementations (greedy
decoding without a KV cache, evaluation by an explicit loop over the val text) or a second run.
Runs are in-process through `microgpt.train.run` where possible; subprocesses only for CLI behaviour.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

import microgpt
import microgpt.train as train_mod
from microgpt.errors import TrainingError
from microgpt.model import GPT

pytestmark = pytest.mark.slow

# keep output small and skip what a test does not look at
QUIET = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_sample=false",
]
NO_LOGGER = ["logger=none", "callbacks.lr_monitor=null"]  # LearningRateMonitor needs a logger
STEP_CKPTS = [  # a checkpoint every N steps, all kept, named by step: step10.ckpt
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='step{step}'",
]


def nano(path: Path, *extra: str) -> list[str]:
    return ["model=nano", "data=text", f"data.path={path}", *QUIET, *extra]


class Recorder(L.Callback):
    """Per-step training losses as Lightning saw them, and the weights training started from."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.init_state: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.init_state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])  # global_step counts finished steps


def run_recorded(cfg, monkeypatch) -> tuple[dict, Recorder]:
    """train.run(cfg) with a Recorder appended to the configured callbacks."""
    rec = Recorder()
    orig = train_mod.build_callbacks
    with monkeypatch.context() as m:
        m.setattr(train_mod, "build_callbacks", lambda c: [*orig(c), rec])
        result = train_mod.run(cfg)
    return result, rec


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


# ---- 1. golden first steps against a plain PyTorch loop ------------------------------------------------


def nanogpt_lr(it: int, lr: float, warmup: int, decay: int, min_lr: float) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr, then flat."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_first_steps_match_plain_pytorch_loop(tmp_path, small_text, monkeypatch, precision):
    """Lightning's steps against a hand-written loop. bf16-mixed: the reference autocasts like Lightning and
    clips with a plain (unfused) AdamW; microgpt's run uses the fused AdamW and clips itself (Lightning refuses
    to clip for a fused optimizer under mixed precision), so this also checks that the clipping happens."""
    n = 5
    cfg = compose(
        nano(
            small_text,
            f"trainer.max_steps={n}",
            f"trainer.val_check_interval={n}",
            "data.eval_batches=1",
            "optimizer.lr=3e-3",  # large enough, with a short warmup and cosine, that the schedule matters
            "scheduler.warmup_steps=2",
            "trainer.gradient_clip_val=0.5",
            f"trainer.precision={precision}",
            *NO_LOGGER,
        ),
        tmp_path / "run",
    )
    result, rec = run_recorded(cfg, monkeypatch)
    module, trainer = result["module"], result["trainer"]
    assert trainer.optimizers[0].defaults["fused"] is True  # fp32 and bf16-mixed both take the fused AdamW
    bf16 = precision == "bf16-mixed"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    assert sorted(rec.losses) == list(range(n))
    lit_losses = [rec.losses[k] for k in range(n)]

    # the reference: same initial weights, same batches, AdamW + nanoGPT lr schedule + grad-norm clipping
    model = GPT(module.model.config)
    model.load_state_dict(rec.init_state)
    model.train()
    no_decay_names = {"wte.weight", "pos.wpe.weight"}  # embeddings, like norms and biases, are not decayed
    named = list(model.named_parameters())
    decay = [p for name, p in named if p.dim() >= 2 and name not in no_decay_names]
    no_decay = [p for name, p in named if not (p.dim() >= 2 and name not in no_decay_names)]
    o = cfg.optimizer
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batches = dm.train_dataset()
    ref, norms = [], []
    for it in range(n):
        lr = nanogpt_lr(it, o.lr, cfg.scheduler.warmup_steps, n, cfg.scheduler.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.batch(it)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        ref.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)))
        opt.step()
    assert max(norms) > 2 * cfg.trainer.gradient_clip_val  # the clipping changes these updates

    # bf16 matmuls round differently once fused and unfused AdamW's last bits differ: looser, still far below
    # what a missing clip (updates up to 2x larger) or a wrong schedule would move
    loss_tol, weight_tol = (2e-3, 2e-4) if bf16 else (1e-5, 1e-6)
    assert lit_losses == pytest.approx(ref, abs=loss_tol, rel=0)
    # the updates themselves, including the last one no loss above reflects
    trained = module.model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained[k], v, atol=weight_tol, rtol=0, msg=f"{k} differs from the reference loop")
    # same parameter groups: decay exactly on the non-embedding matrices
    names = {id(p): name for name, p in module.model.named_parameters()}
    groups = trainer.optimizers[0].param_groups
    lit_wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    ref_wd = {name: (o.weight_decay if p.dim() >= 2 and name not in no_decay_names else 0.0) for name, p in named}
    assert lit_wd == ref_wd
    # a near-uniform init predicts every token with probability ~1/V
    vocab = module.model.config.vocab_size
    assert vocab == len(set(small_text.read_text(encoding="utf-8")))
    assert abs(lit_losses[0] - math.log(vocab)) < 0.15


# ---- 2. a real run learns; run artefacts -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare) -> dict:
    """60 nano steps on the tiny Shakespeare fixture, evaluated every 10 steps (shared by the checkpoint/CLI tests)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose(
        nano(shakespeare, "trainer.max_steps=60", "trainer.val_check_interval=10", "data.eval_batches=5"), out
    )
    return train_mod.run(cfg)


def test_loss_goes_down_and_run_artifacts_are_written(trained):
    run_dir = Path(trained["output_dir"])
    rows = read_metrics(run_dir)
    assert rows and "val_loss" in rows[0]
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 6  # one eval every 10 of 60 steps
    assert val[0] - val[-1] > 0.3, f"val_loss did not drop clearly: {val}"
    assert trained["val_loss"] == pytest.approx(val[-1], abs=1e-6)
    assert trained["best_val_loss"] == pytest.approx(min(val), abs=1e-6)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    assert Path(trained["last_ckpt"]) == ckpts / "last.ckpt"
    assert Path(trained["best_ckpt"]) == ckpts / "best.ckpt"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.trainer.max_steps == 60 and saved.model.n_embd == 32 and saved.data.source == "text"


def test_finetune_trains_on_the_base_context_when_the_window_only_follows_the_preset(trained, small_text, tmp_path):
    """experiment=finetune asks for 256-token windows; the nano base has 32 positions. data.block_size follows
    the base (a warning says so); an explicit data.block_size beyond the base is one error naming both."""
    base = trained["last_ckpt"]
    over = ["experiment=finetune", f"init_from={base}", f"data.path={small_text}", *QUIET, "trainer.max_steps=2"]
    res = train_mod.run(compose([*over, "data.eval_batches=2"], tmp_path / "ft"))
    assert res["module"].model.config.block_size == 32
    assert res["trainer"].datamodule.block_size == 32
    with pytest.raises(Exception, match=r"data.block_size=64 exceeds model.block_size=32"):
        train_mod.run(compose([*over, "data.block_size=64"], tmp_path / "ft2"))


# ---- 3. exact resume ---------------------------------------------------------------------------------


def test_resume_from_mid_run_checkpoint_is_exact(tmp_path, small_text, monkeypatch):
    common = nano(
        small_text,
        "model.dropout=0.1",  # dropout draws from the global RNG: the checkpoint must carry its state
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "data.eval_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        *STEP_CKPTS,
        *NO_LOGGER,
    )
    a, rec_a = run_recorded(compose(common, tmp_path / "a"), monkeypatch)
    step10 = tmp_path / "a" / "checkpoints" / "step10.ckpt"
    assert step10.is_file(), sorted(p.name for p in step10.parent.iterdir())
    b, rec_b = run_recorded(compose([*common, f"ckpt_path={step10}"], tmp_path / "b"), monkeypatch)

    assert sorted(rec_a.losses) == list(range(20))
    assert sorted(rec_b.losses) == list(range(10, 20))
    for k in range(10, 20):
        assert rec_b.losses[k] == pytest.approx(rec_a.losses[k], abs=1e-6, rel=0), f"step {k}"
    assert b["trainer"].global_step == 20
    wa, wb = a["module"].model.state_dict(), b["module"].model.state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0, msg=f"final weight {k} differs after resume")


def test_compile_true_trains_through_the_compiled_model_with_the_same_losses(tmp_path, small_text, monkeypatch):
    # dynamo traces for real; the "eager" backend skips inductor's C++ build (tens of seconds) but still
    # hands LitGPT torch.compile's wrapper, whose truth value cannot be taken
    calls = []
    real_compile = torch.compile

    def compile_eager(model, **kw):
        calls.append(model)
        return real_compile(model, backend="eager")

    common = nano(small_text, "trainer.max_steps=6", "trainer.val_check_interval=6", "data.eval_batches=1", *NO_LOGGER)
    plain, rec_plain = run_recorded(compose(common, tmp_path / "plain"), monkeypatch)
    monkeypatch.setattr(torch, "compile", compile_eager)
    comp, rec_comp = run_recorded(compose([*common, "compile=true"], tmp_path / "comp"), monkeypatch)
    assert len(calls) == 1 and calls[0] is comp["module"].model  # the inner model, not the LightningModule
    assert sorted(rec_comp.losses) == list(range(6))
    for k in range(6):
        assert rec_comp.losses[k] == pytest.approx(rec_plain.losses[k], abs=1e-5, rel=0), f"step {k}"
    # checkpoint keys stay plain (no `_orig_mod.`): it loads into an uncompiled GPT
    ckpt = torch.load(tmp_path / "comp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    model, _ = microgpt.load(tmp_path / "comp" / "checkpoints" / "last.ckpt")
    assert model.state_dict().keys() == plain["module"].model.state_dict().keys()


# ---- 4. ckpt_path=last -------------------------------------------------------------------------------


def test_ckpt_path_last_resumes_in_the_run_dir_or_starts_fresh(tmp_path, small_text, monkeypatch):
    base = nano(small_text, "trainer.val_check_interval=5", "data.eval_batches=1", *NO_LOGGER)
    run_dir = tmp_path / "run"
    _, rec1 = run_recorded(compose([*base, "trainer.max_steps=5"], run_dir), monkeypatch)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5

    second, rec2 = run_recorded(compose([*base, "trainer.max_steps=10", "ckpt_path=last"], run_dir), monkeypatch)
    assert sorted(rec2.losses) == list(range(5, 10))  # continues at step 5, not 0
    assert second["trainer"].global_step == 10
    for k, v in model_state(saved).items():  # from the checkpoint's weights
        assert torch.equal(rec2.init_state[k], v), k

    fresh, rec3 = run_recorded(compose([*base, "trainer.max_steps=5", "ckpt_path=last"], tmp_path / "new"), monkeypatch)
    assert sorted(rec3.losses) == list(range(5))
    assert fresh["trainer"].global_step == 5
    for k, v in rec1.init_state.items():  # the same seeded init as the first run
        assert torch.equal(rec3.init_state[k], v), k


# ---- 5. microgpt.load --------------------------------------------------------------------------------


def test_load_gives_eval_model_and_tokenizer_matching_the_live_module(trained):
    last = Path(trained["last_ckpt"])
    model, tok = microgpt.load(last)
    assert isinstance(model, GPT)
    assert not any(m.training for m in model.modules())
    ids = tok.encode("ROMEO:")
    assert len(ids) == 6 and tok.decode(ids) == "ROMEO:"
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, 6, model.config.vocab_size)
    assert model.config.vocab_size == 63  # the Shakespeare fixture's distinct characters (tests/fixtures/README.md)

    live = trained["module"].model
    live.eval()
    x, y = trained["trainer"].datamodule.val_dataset()[0]
    with torch.no_grad():
        loss_live = F.cross_entropy(live(x).flatten(0, 1), y.flatten())
        loss_loaded = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert loss_loaded.item() == pytest.approx(loss_live.item(), abs=1e-6, rel=0)

    raw = torch.load(last, map_location="cpu", weights_only=True)  # plain data, no pickled code
    assert raw["hyper_parameters"]["model"]["n_embd"] == 32
    assert set(model_state(raw)) == set(model.state_dict())


# ---- 6. generate CLI ---------------------------------------------------------------------------------


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the full (cropped) context every step, no KV cache."""
    seq = list(ids)
    block = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq[-block:]]))[0, -1].argmax()))
    return seq[len(ids) :]


def compose_generate(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="generate", overrides=overrides)


def test_generate_cli_greedy_matches_in_process_and_seeds_are_reproducible(trained, tmp_path, capsys):
    from microgpt.generate import generate

    ckpt = trained["last_ckpt"]
    n = 40  # prompt + 40 > block_size 32: the context is cropped along the way
    args = [f"ckpt={ckpt}", "prompt='ROMEO:'", f"max_new_tokens={n}"]
    runs = {"greedy": [*args, "seed=1", "temperature=0"], "seed1": [*args, "seed=1", "temperature=1"]}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futs = {k: pool.submit(run_cli, ["-m", "microgpt.generate", *a], 300, tmp_path) for k, a in runs.items()}
        out = {k: f.result() for k, f in futs.items()}
    for k, p in out.items():
        assert p.returncode == 0, f"{k}: {p.stderr[-2000:]}"

    model, tok = microgpt.load(ckpt)
    ids = tok.encode("ROMEO:")
    expected = greedy_without_cache(model, ids, n)
    assert model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids) :].tolist() == expected
    assert out["greedy"].stdout == "ROMEO:" + tok.decode(expected) + "\n"

    # sampling: the same seed gives the same text (here: in another process), another seed another text
    def sample(seed: int) -> str:
        text = generate(compose_generate([*args, f"seed={seed}", "temperature=1"]))[0]
        capsys.readouterr()
        return text

    again, other = sample(1), sample(2)
    assert out["seed1"].stdout == "ROMEO:" + again + "\n"
    assert len(again) == len(other) == n  # char tokens: one character each
    assert again != other


# ---- 7. evaluate CLI ---------------------------------------------------------------------------------


def test_evaluate_cli_matches_an_independent_loop_over_the_val_split(trained, shakespeare, small_text, tmp_path):
    ckpt = trained["last_ckpt"]  # trained on the whole fixture, evaluated on the val split of its first 60 KB
    args = ["-m", "microgpt.evaluate", f"ckpt={ckpt}", "data=text", f"data.path={small_text}", "split=val"]
    p = run_cli(args, 300, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"val_loss", "perplexity", "bits_per_byte", "tokens"} <= set(res)
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]), rel=1e-9)

    # independent: a char vocabulary is the sorted set of characters; val = the last 10% of the tokens
    stoi = {c: i for i, c in enumerate(sorted(set(shakespeare.read_text(encoding="utf-8"))))}
    text = small_text.read_text(encoding="utf-8")
    assert text.isascii()
    tokens = torch.tensor([stoi[c] for c in text])
    n_train = int(len(tokens) * 0.9)
    val = tokens[n_train:]
    model, _ = microgpt.load(ckpt)
    T = model.config.block_size
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val) - 1, T):  # non-overlapping blocks; the last one may be shorter
            x, y = val[i : i + T], val[i + 1 : i + T + 1]
            x = x[: len(y)]
            nll += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
            count += len(y)
    assert res["tokens"] == count == len(val) - 1
    assert res["val_loss"] == pytest.approx(nll / count, abs=1e-4)
    n_bytes = len(text[n_train + 1 :].encode("utf-8"))  # the bytes of the predicted characters
    expected_bpb = res["val_loss"] / math.log(2) * res["tokens"] / n_bytes
    assert res["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-9)


# ---- 8. NaN loss -------------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(tmp_path, small_text, monkeypatch):
    from microgpt import lit

    orig = lit.cross_entropy

    def poisoned(module, batch):
        out = orig(module, batch)
        if module.global_step == 5:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(lit, "cross_entropy", poisoned)  # LitGPT picks its default objective up at init
    cfg = compose(
        nano(
            small_text,
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "data.eval_batches=1",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            *STEP_CKPTS,
            *NO_LOGGER,
        ),
        tmp_path / "run",
    )
    with pytest.raises(TrainingError, match=r"\bstep 5\b"):
        train_mod.run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step2.ckpt").is_file() and (ckpts / "step4.ckpt").is_file()
    assert not (ckpts / "step6.ckpt").exists()
    assert torch.load(ckpts / "step4.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    model, _ = microgpt.load(ckpts / "step4.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_from_the_cli_is_one_error_line_and_exit_2(tmp_path, small_text):
    p = run_cli(
        [
            "train.py",
            *nano(small_text, "trainer.max_steps=20"),
            "optimizer.lr=1e6",
            "scheduler.warmup_steps=0",
            "scheduler.min_lr=0",
            "trainer.gradient_clip_val=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    assert re.search(r"\bat step \d+\b", errors[0]) and "nan" in errors[0].lower()
    assert "Traceback" not in p.stderr


# ---- 9. the default `make train` path ----------------------------------------------------------------


def test_default_train_py_on_embedded_data_prints_size_and_sample(tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli(
        [
            "train.py",
            "trainer.max_steps=30",
            "trainer.val_check_interval=15",
            "data.eval_batches=2",
            f"hydra.run.dir={run_dir}",
        ],
        300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"^model: ([\d,]+) parameters .*vocab (\d+), tokenizer char", p.stdout, re.M)
    assert m, p.stdout[-2000:]
    n_params, vocab = int(m[1].replace(",", "")), int(m[2])
    # micro: 4 layers of width 128, tied head, no biases; per layer 4C^2 (attention) + 8C^2 (MLP) + 2 norms;
    # every parameter counted once, the 64 x C learned position table included
    C, n_layer, block = 128, 4, 64
    assert n_params == vocab * C + block * C + n_layer * (12 * C * C + 2 * C) + C
    s = re.search(r"^--- sample ---\n(.*)\n--------------$", p.stdout, re.M | re.S)
    assert s, p.stdout[-2000:]
    assert s[1].strip() and len(s[1]) == 200  # sample.max_new_tokens char tokens, empty prompt
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # Lightning's messages reach the console once (not also through its own handler) and the run's train.log
    console = p.stdout + p.stderr
    assert console.count("`Trainer.fit` stopped: `max_steps=30` reached") == 1, console[-3000:]
    assert "`Trainer.fit` stopped" in (run_dir / "train.log").read_text()
    assert "exists and is not empty" not in console  # the run dir holds Hydra's files by design: no warning


# ---- 10. a user plugin from outside the repository ---------------------------------------------------

PLUGIN = textwrap.dedent(
    '''
    """A user attention: mha times a learnable output gain."""
    import torch
    import torch.nn as nn

    from microgpt.components.attention import CausalSelfAttention
    from microgpt.registry import ATTENTION


    @ATTENTION.register("myattn")
    class GainAttention(CausalSelfAttention):
        def __init__(self, cfg):
            super().__init__(cfg, n_kv_head=cfg.n_head)
            self.gain = nn.Parameter(torch.ones(()))

        def forward(self, x, rot=None, cache=None):
            return self.gain * super().forward(x, rot, cache)
    '''
)
PLUGIN_YAML = "# @package _global_\nplugins:\n  myattn: {}\n"


def test_user_plugin_from_a_temporary_folder_trains_and_reloads(tmp_path, small_text):
    (tmp_path / "myplugins" / "myattn").mkdir(parents=True)
    (tmp_path / "myplugins" / "myattn" / "__init__.py").write_text(PLUGIN)
    (tmp_path / "myconf" / "plugin").mkdir(parents=True)
    (tmp_path / "myconf" / "plugin" / "myattn.yaml").write_text(PLUGIN_YAML)
    run_dir = tmp_path / "run"
    p = run_cli(
        [
            "train.py",
            *nano(small_text, "debug=fast"),
            f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",  # the plugin's yaml lives outside conf/
            "+plugin=myattn",
            "model.attention=myattn",
            f"hydra.run.dir={run_dir}",
        ],
        300,
        env={"MICROGPT_PLUGIN_PATH": str(tmp_path / "myplugins")},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # a fresh process without the plugin on its path: the checkpoint names the plugin but never chooses its
    # code, so loading stops with one line saying where it was and how to make it available
    code = (
        "import sys, microgpt; m, _ = microgpt.load(sys.argv[1]); a = m.layer(0).attn; "
        "print(type(a).__module__, type(a).__name__, m.config.attention, float(a.gain))"
    )
    q = run_cli(["-c", code, str(ckpt)], 300, tmp_path, env={"MICROGPT_PLUGIN_PATH": ""})
    assert q.returncode != 0
    err = q.stderr.strip().splitlines()[-1]
    assert "plugin 'myattn'" in err and str(tmp_path / "myplugins") in err and "MICROGPT_PLUGIN_PATH" in err, err
    # with the user's plugin path set, load() imports it by name
    q = run_cli(["-c", code, str(ckpt)], 300, tmp_path, env={"MICROGPT_PLUGIN_PATH": str(tmp_path / "myplugins")})
    assert q.returncode == 0, q.stderr[-2000:]
    module, cls, name, gain = q.stdout.split()
    assert (module, cls, name) == ("microgpt_plugins.myattn", "GainAttention", "myattn")
    assert abs(float(gain) - 1.0) > 1e-4  # the plugin's own parameter was trained
