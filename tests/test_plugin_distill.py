"""The distill plugin: divergences against independent formulas, and real short runs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from microgpt.errors import ConfigError
from microgpt.plugins import load_plugin
from microgpt.train import run
from tests.conftest import compose

distill = load_plugin("distill")
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false"]


def _train_losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "js"])
def test_divergence_matches_reference(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    T = 2.0
    p_s, p_t = (s / T).softmax(-1).double(), (t / T).softmax(-1).double()

    def kl(p, q):  # KL(p || q), explicit sum
        return (p * (p / q).log()).sum(-1).mean()

    ref = {"forward_kl": kl(p_t, p_s), "reverse_kl": kl(p_s, p_t)}
    m = (p_s + p_t) / 2
    ref["js"] = 0.5 * kl(p_t, m) + 0.5 * kl(p_s, m)
    got = distill.divergence(s, t, T, kind)
    assert got.item() == pytest.approx(ref[kind].item(), rel=1e-5, abs=1e-6)
    assert distill.divergence(t, t, T, kind).item() == pytest.approx(0.0, abs=1e-6)
    if kind == "js":  # symmetric and bounded by ln 2
        assert got.item() == pytest.approx(distill.divergence(t, s, T, kind).item(), rel=1e-5)
        assert got.item() <= math.log(2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    p = tmp_path_factory.mktemp("distill-data") / "text.txt"
    p.write_text(shakespeare.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = compose(
        [
            "model=nano",
            "model.n_embd=64",
            "debug=fast",
            "trainer.max_steps=60",
            "data=text",
            f"data.path={corpus}",
            *QUIET,
        ],
        output_dir=out,
    )
    res = run(cfg)
    return res["last_ckpt"]


def _student(corpus, out, teacher, *extra):
    return compose(
        [
            "model=nano",
            "debug=fast",
            "trainer.max_steps=20",
            "data=text",
            f"data.path={corpus}",
            "+plugin=distill",
            f"plugins.distill.teacher={teacher}",
            *QUIET,
            *extra,
        ],
        output_dir=out,
    )


@pytest.mark.slow
def test_distill_run_keeps_teacher_out_and_lowers_loss(tmp_path, corpus, teacher):
    from microgpt import load

    t_before, _ = load(teacher)
    res = run(_student(corpus, tmp_path / "s", teacher, "plugins.distill.hidden_weight=0.5"))
    module, trainer = res["module"], res["trainer"]
    # the teacher lives in the objective, not in the module tree / state_dict / optimizer
    assert all(not k.startswith("objective") and "teacher" not in k for k in module.state_dict())
    t = module.objective.teacher
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in t.parameters()}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    for (k, a), b in zip(t.state_dict().items(), t_before.state_dict().values()):
        assert torch.equal(a, b), f"teacher weight {k} changed"
    losses = _train_losses(tmp_path / "s")
    assert losses[-1] < losses[0] - 0.3
    # the student checkpoint reloads as a plain GPT: no teacher, no projection
    student, _ = load(res["last_ckpt"])
    assert sum(p.numel() for p in student.parameters()) == module.model.num_params(non_embedding=False)


@pytest.mark.slow
def test_alpha_zero_equals_plain_training(tmp_path, corpus, teacher):
    """With alpha=0 the objective is exactly cross-entropy: same losses as a run without the plugin."""
    run(_student(corpus, tmp_path / "a", teacher, "plugins.distill.alpha=0.0"))
    plain = compose(
        ["model=nano", "debug=fast", "trainer.max_steps=20", "data=text", f"data.path={corpus}", *QUIET],
        output_dir=tmp_path / "b",
    )
    run(plain)
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(a) == len(b) == 20
    assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.slow
def test_distill_resume_is_exact(tmp_path, corpus, teacher):
    ck = [
        "callbacks.model_checkpoint.every_n_train_steps=10",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='s{step}'",
    ]
    run(_student(corpus, tmp_path / "full", teacher, *ck))
    mid = tmp_path / "full" / "checkpoints" / "s10.ckpt"
    assert mid.is_file()
    run(_student(corpus, tmp_path / "resumed", teacher, f"ckpt_path={mid}"))
    full, resumed = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "resumed")
    assert resumed == pytest.approx(full[10:], abs=1e-6)


def test_missing_teacher_is_a_clear_error(tmp_path, corpus):
    cfg = _student(corpus, tmp_path / "x", "null")
    with pytest.raises(ConfigError, match="plugins.distill.teacher is not set"):
        run(cfg)
    cfg = _student(corpus, tmp_path / "y", tmp_path / "nope.ckpt")
    with pytest.raises(ConfigError, match="does not exist; train one first"):
        run(cfg)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_vocab_mismatch_is_a_clear_error(tmp_path, teacher):
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(0x41 + i % 20) for i in range(20_000)), encoding="utf-8")
    cfg = _student(other, tmp_path / "z", teacher)
    with pytest.raises(ConfigError, match="different tokenizer"):
        run(cfg)
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "js"])
def test_divergence_counts_only_the_masked_positions(kind):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 7, generator=g), torch.randn(2, 6, 7, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    picked = [(b, i) for b in range(2) for i in range(6) if mask[b, i]]
    # the same divergence over just the picked rows (no mask) vs the full tensors with the mask
    rows_s = torch.stack([s[b, i] for b, i in picked])
    rows_t = torch.stack([t[b, i] for b, i in picked])
    expected = distill.divergence(rows_s, rows_t, 1.5, kind).item()
    assert distill.divergence(s, t, 1.5, kind, mask).item() == pytest.approx(expected, rel=1e-6)
    assert distill.divergence(s, t, 1.5, kind).item() != pytest.approx(expected, rel=1e-3)  # the mask matters
    none = distill.divergence(s, t, 1.5, kind, torch.zeros_like(mask))
    assert none.item() == 0.0


def test_the_kd_term_ignores_prompt_and_padding_positions_of_chat_batches():
    """Teacher and student disagree only where labels are IGNORE_INDEX (-100): KD and CE see no difference."""
    from microgpt.data.chat_template import IGNORE_INDEX

    V = 5
    y = torch.tensor([[IGNORE_INDEX, 2, 3, IGNORE_INDEX]])
    x = torch.zeros_like(y)
    student_logits = torch.zeros(1, 4, V)
    teacher_logits = student_logits.clone()
    teacher_logits[0, 0] = torch.tensor([9.0, -9, 0, 0, 0])  # differs only at unlabelled positions
    teacher_logits[0, 3] = torch.tensor([0.0, 0, 0, 0, 7])

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, idx, return_hidden=False):
            return self.out

    class Module:
        global_step = 0
        model = Fixed(student_logits)

        def __call__(self, x):
            return self.model(x)

    obj = distill.DistillObjective(Fixed(teacher_logits), 1.0, 0.5, None, 0, "forward_kl", 0.0, {})
    out = obj(Module(), (x, y))
    assert out["kd"].item() == 0.0
    assert out["ce"].item() == pytest.approx(math.log(V), rel=1e-6)  # uniform student on the 2 labelled tokens
