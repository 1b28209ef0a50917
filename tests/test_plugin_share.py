"""The share plugin against independent references: per-parameter means written out by hand, parameter
counts from the shapes, a plain GPT built with the shared config, and short real runs (fine-tune from a
trained checkpoint, resume, reload, and stacked with distill + qat)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SHAKESPEARE, compose

import microgpt
import microgpt.train as train_mod
from microgpt.config import GPTConfig
from microgpt.errors import ConfigError
from microgpt.model import GPT, build_model
from microgpt.plugins import load_plugin

share = load_plugin("share")
V = 65
QUIET = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_sample=false",
    "logger=none",
    "callbacks.lr_monitor=null",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": V, "block_size": 16, "n_layer": 4, "n_head": 2, "n_embd": 32, **kw})


def model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg(**kw)).eval()


def block_params(m: GPT, i: int) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in m.blocks[i].named_parameters()}


# ---- the transformation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "n_layer", "want"),
    [(None, 6, 6), (2, 4, 2), (2.0, 4, 2), (0.5, 4, 2), (0.5, 3, 2), (0.25, 4, 1), (0.01, 6, 1), (6, 6, 6)],
)
def test_n_unique_is_a_count_or_a_fraction_rounded_up(value, n_layer, want):
    assert share.resolve_n_unique(value, n_layer) == want


@pytest.mark.parametrize("bad", [0, -1, 1.5, 5, True, "two"])
def test_bad_n_unique_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="n_unique"):
        share.resolve_n_unique(bad, 4)


def test_shared_blocks_are_the_mean_of_the_layers_they_replace_and_share_storage():
    base = model(tie_embeddings=False)
    shared = share.share_model(base, 2, tie_embeddings=True)
    assert shared is not base and len(shared.blocks) == 2
    assert shared.config.n_unique_layers == 2 and shared.config.tie_embeddings and shared.lm_head is None
    # exact parameter count from the shapes: C = n_embd, H = 4C; per block 2 LayerNorms (weight only, no
    # bias), qkv (3C x C), proj (C x C), fc (H x C), mlp proj (C x H); wte V x C, wpe T x C, final norm C
    C, H, T = 32, 128, 16
    per_block = 2 * C + 3 * C * C + C * C + H * C + C * H
    assert sum(p.numel() for p in shared.parameters()) == V * C + T * C + 2 * per_block + C
    assert sum(p.numel() for p in base.parameters()) == 2 * V * C + T * C + 4 * per_block + C
    # block j = (layer j + layer j + 2) / 2, parameter by parameter; the tied embedding = (wte + lm_head) / 2
    for j in range(2):
        got, a, b = block_params(shared, j), block_params(base, j), block_params(base, j + 2)
        assert set(got) == set(a)
        for n in got:
            torch.testing.assert_close(got[n], (a[n] + b[n]) / 2, atol=1e-7, rtol=0, msg=n)
    torch.testing.assert_close(shared.wte.weight, (base.wte.weight + base.lm_head.weight) / 2, atol=1e-7, rtol=0)
    torch.testing.assert_close(shared.pos.wpe.weight, base.pos.wpe.weight, atol=0, rtol=0)
    # one set of tensors per unique block, reused at depth j and j + 2; the head reads the embedding
    assert shared.layer(0) is shared.layer(2) and shared.layer(1) is shared.layer(3)
    assert shared.layer(0) is not shared.layer(1)
    assert shared.layer(0).attn.qkv.weight.data_ptr() == shared.layer(2).attn.qkv.weight.data_ptr()
    assert shared.output_weight is shared.wte.weight
    # it computes what a plain GPT with the shared config computes with those weights
    plain = GPT(cfg(n_unique_layers=2, tie_embeddings=True)).eval()
    plain.load_state_dict(shared.state_dict(), strict=True)
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(shared(x), plain(x), atol=0, rtol=0)


def test_uneven_and_already_shared_models_average_every_depth_once():
    # 6 layers into 4 blocks: block 0 = mean(l0, l4), block 1 = mean(l1, l5), blocks 2 and 3 unchanged
    base = model(seed=1, n_layer=6)
    shared = share.share_model(base, 4, tie_embeddings=True)  # the head is already tied: nothing to tie
    assert len(shared.blocks) == 4 and shared.config.n_unique_layers == 4
    want = {0: [0, 4], 1: [1, 5], 2: [2], 3: [3]}
    for j, src in want.items():
        for n, p in block_params(shared, j).items():
            ref = sum(block_params(base, i)[n] for i in src) / len(src)
            torch.testing.assert_close(p, ref, atol=1e-7, rtol=0, msg=f"block {j} {n}")
    torch.testing.assert_close(shared.wte.weight, base.wte.weight, atol=0, rtol=0)
    # a model already sharing 4 blocks over 8 layers (depth d runs block d % 4) into 2 blocks: block 0
    # serves depths 0, 2, 4, 6, which ran blocks 0, 2, 0, 2
    base = model(seed=2, n_layer=8, n_unique_layers=4)
    shared = share.share_model(base, 2)
    for n, p in block_params(shared, 0).items():
        torch.testing.assert_close(p, (block_params(base, 0)[n] + block_params(base, 2)[n]) / 2, atol=1e-7, rtol=0)
    with pytest.raises(ConfigError, match="already shares"):
        share.share_model(base, 6)
    assert share.share_model(base, 4) is base  # nothing to do


def test_masks_fold_with_or_and_converters_are_rebuilt():
    # prune masks (bool buffers keyed blocks__i__...) follow their blocks: a weight stays if any replaced layer kept it
    sd = {
        "blocks.0.w": torch.tensor([1.0, 0.0, 0.0]),
        "blocks.1.w": torch.tensor([3.0, 0.0, 2.0]),
        "prune_masks.blocks__0__w": torch.tensor([True, False, False]),
        "prune_masks.blocks__1__w": torch.tensor([True, False, True]),
        "wte.weight": torch.ones(2),
        "lm_head.weight": torch.zeros(2),
    }
    out = share.fold_state_dict(sd, n_layer=2, n_unique=1, tie_embeddings=True)
    assert set(out) == {"blocks.0.w", "prune_masks.blocks__0__w", "wte.weight"}
    assert out["blocks.0.w"].tolist() == [2.0, 0.0, 1.0]
    assert out["prune_masks.blocks__0__w"].tolist() == [True, False, True]
    assert out["wte.weight"].tolist() == [0.5, 0.5]
    # a model with recorded converters keeps them, rebuilt on the shared blocks
    load_plugin("prune")  # registers the `prune` converter
    conv = [{"name": "prune", "targets": ["blocks.*.weight"]}]
    torch.manual_seed(3)
    pruned = build_model(cfg(converters=conv)).eval()
    shared = share.share_model(pruned, 2)
    assert shared.config.converters == conv
    names = {n for n, _ in shared.prune_masks.items()}
    assert names and all(n.startswith(("blocks.0.", "blocks.1.")) for n in names)


def test_check_config_refuses_what_cannot_work(tmp_path):
    base = ["model=nano", "+plugin=share"]
    with pytest.raises(ConfigError, match="init_from=CKPT.*model.n_unique_layers"):
        share.check_config(compose(base))
    ok = [*base, f"init_from={tmp_path}"]
    share.check_config(compose(ok))
    with pytest.raises(ConfigError, match="n_unique"):
        share.check_config(compose([*ok, "plugins.share.n_unique=1.5"]))
    with pytest.raises(ConfigError, match="nothing to do"):
        share.check_config(compose([*ok, "plugins.share.n_unique=null", "plugins.share.tie_embeddings=false"]))
    # prune's L1 term follows the model share swaps in, so both orders work
    share.check_config(
        compose(["model=nano", "+plugin=[prune,share]", f"init_from={tmp_path}", "plugins.prune.l1=1e-4"])
    )
    share.check_config(
        compose(["model=nano", "+plugin=[share,prune]", f"init_from={tmp_path}", "plugins.prune.l1=1e-4"])
    )


# ---- training runs -------------------------------------------------------------------------------------


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def run_recorded(overrides: list[str], out: Path) -> tuple[dict, Recorder]:
    rec = Recorder()
    orig = train_mod.build_callbacks
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod, "build_callbacks", lambda c: [*orig(c), rec])
        result = train_mod.run(compose(overrides, out))
    return result, rec


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("share-data") / "small.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


def nano(text: Path, *extra: str) -> list[str]:
    return [
        "model=nano",
        "data=text",
        f"data.path={text}",
        "data.eval_batches=2",
        "scheduler.warmup_steps=2",
        *QUIET,
        *extra,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory, text) -> dict:
    """The trained model to compress: 4 layers, its own output head."""
    out = tmp_path_factory.mktemp("share-base")
    result, _ = run_recorded(
        nano(
            text,
            "model.n_layer=4",
            "model.tie_embeddings=false",
            "trainer.max_steps=40",
            "trainer.val_check_interval=40",
            "optimizer.lr=1e-2",
        ),
        out,
    )
    return result


SHARE_RUN = [
    "+plugin=share",
    "plugins.share.n_unique=2",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "optimizer.lr=3e-3",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='step{step}'",
    "callbacks.model_checkpoint.every_n_train_steps=10",
]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, text, base):
    out = tmp_path_factory.mktemp("share-run")
    result, rec = run_recorded(nano(text, f"init_from={base['last_ckpt']}", *SHARE_RUN), out)
    return result, rec, out


def mean_model(base_ckpt: str) -> GPT:
    """The shared starting point, built by hand: plain GPT with n_unique_layers=2 and a tied head whose
    weights are written out as means of the base checkpoint's tensors."""
    b, _ = microgpt.load(base_ckpt)
    sd = b.state_dict()
    want = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            if int(i) < 2:
                want[k] = (v + sd[f"blocks.{int(i) + 2}.{rest}"]) / 2
        elif k == "wte.weight":
            want[k] = (v + sd["lm_head.weight"]) / 2
        elif k != "lm_head.weight":
            want[k] = v
    m = GPT(GPTConfig.from_dict({**b.config.to_dict(), "n_unique_layers": 2, "tie_embeddings": True}))
    m.load_state_dict(want, strict=True)
    return m.eval()


@pytest.mark.slow
def test_fine_tune_starts_from_the_mean_lowers_loss_and_reloads_shared(shared_run, base):
    result, rec, out = shared_run
    live = result["module"].model.eval()
    assert len(live.blocks) == 2 and live.lm_head is None and live.layer(0) is live.layer(2)
    base_model, tok = microgpt.load(base["last_ckpt"])
    C, V_, T = 32, base_model.config.vocab_size, 32
    per_block = sum(p.numel() for p in base_model.blocks[0].parameters())
    assert live.num_params(non_embedding=False) == V_ * C + T * C + 2 * per_block + C
    assert base_model.num_params(non_embedding=False) - live.num_params(non_embedding=False) == 2 * per_block + V_ * C
    # step 0 is the loss of the hand-built mean model on the first training batch
    x, y = result["trainer"].datamodule.train_dataset().batch(0)
    with torch.no_grad():
        want = F.cross_entropy(mean_model(base["last_ckpt"])(x).flatten(0, 1), y.flatten()).item()
    assert rec.losses[0] == pytest.approx(want, abs=1e-5)
    first, last = sum(rec.losses[k] for k in range(3)) / 3, sum(rec.losses[k] for k in range(17, 20)) / 3
    assert last < first - 0.05, (first, last)
    # the checkpoint is a plain shared GPT: no converter, loads (strictly) with microgpt.load, stays shared
    ck = torch.load(result["last_ckpt"], weights_only=True)
    hp = ck["hyper_parameters"]["model"]
    assert (hp["n_unique_layers"], hp["tie_embeddings"], hp["converters"]) == (2, True, [])
    assert not any(k.startswith(("model.blocks.2.", "model.blocks.3.", "model.lm_head")) for k in ck["state_dict"])
    model, _ = microgpt.load(result["last_ckpt"])
    assert len(model.blocks) == 2 and model.layer(1) is model.layer(3) and model.lm_head is None
    xs = torch.tensor([tok.encode("ROMEO:\nWhat light is this?\n")[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model(xs), live(xs), atol=0, rtol=0)


@pytest.mark.slow
def test_resume_mid_fine_tune_gives_the_same_losses(shared_run, base, text, tmp_path):
    result, rec_a, out = shared_run
    step10 = out / "checkpoints" / "step10.ckpt"
    b, rec_b = run_recorded(
        nano(text, f"init_from={base['last_ckpt']}", *SHARE_RUN, f"ckpt_path={step10}"), tmp_path / "b"
    )
    assert sorted(rec_b.losses) == list(range(10, 20))
    for k in range(10, 20):
        assert rec_b.losses[k] == rec_a.losses[k], f"step {k}"
    wa, wb = result["module"].model.state_dict(), b["module"].model.state_dict()
    assert list(wa) == list(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_stacks_with_distill_and_qat(base, text, tmp_path):
    qat = load_plugin("qat")
    result, rec = run_recorded(
        nano(
            text,
            f"init_from={base['last_ckpt']}",
            "+plugin=[share,distill,qat]",
            "plugins.share.n_unique=1",
            f"plugins.distill.teacher={base['last_ckpt']}",
            "plugins.qat.scheme=int8",
            "trainer.max_steps=12",
            "trainer.val_check_interval=12",
            "optimizer.lr=3e-3",
        ),
        tmp_path / "s",
    )
    module = result["module"]
    assert type(module.objective).__name__ == "DistillObjective"
    assert len(module.model.blocks) == 1 and module.model.layer(0) is module.model.layer(3)
    assert len(qat.fake_quantized_linears(module.model)) == 4  # qkv, proj, fc, proj of the one shared block
    assert not any(k.startswith("teacher") for k in module.state_dict())
    first, last = sum(rec.losses[k] for k in range(3)) / 3, sum(rec.losses[k] for k in range(9, 12)) / 3
    assert math.isfinite(last) and last < first, (first, last)
    ck = torch.load(result["last_ckpt"], weights_only=True)["hyper_parameters"]["model"]
    assert ck["n_unique_layers"] == 1 and ck["converters"] == [{"name": "qat", "scheme": "int8", "group_size": 32}]
    model, tok = microgpt.load(result["last_ckpt"])
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), module.model.eval()(x), atol=0, rtol=0)
