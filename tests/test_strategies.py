"""Distributed strategies end to end on 2 CPU processes: ddp, fsdp (FSDP2), deepspeed (ZeRO-2), ZeRO-3.

Every run trains the same nano model with one block shared over both layers and a tied head, on the same
per-process batches. The references are independent of the code under test:
- the live model itself: a callback inside the training processes measures the sharded model's loss on the
  whole val split, which `python -m microgpt.evaluate` on the (consolidated) checkpoint must reproduce;
- Lightning's own DDP checkpoint (plain torch): sharding changes only float summation order, so every
  strategy must reach the same weights and optimizer state as DDP;
- DeepSpeed's own zero_to_fp32 export, and a plain PyTorch training loop for DDP vs one process.

Training runs are `python train.py ...` subprocesses in their own process group with a timeout; the group
is killed on timeout and checked empty afterwards (no orphaned rank-1 process).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PY, ROOT, SHAKESPEARE, compose

STRATEGIES = ["ddp", "fsdp", "deepspeed", "deepspeed_stage_3"]
SHARDED = ["fsdp", "deepspeed", "deepspeed_stage_3"]
STEPS, VAL_EVERY, BATCH, EVAL_BATCHES, SEED = 30, 10, 6, 4, 1337
RUN_TIMEOUT = 240  # s per training subprocess: ~10 s on an idle 2-core machine, minutes when it is shared
# a resumed run continues on a strategy that accepts a single-file checkpoint: DeepSpeed itself resumes
# only from its own directory, so its consolidated file moves to ddp (ZeRO-2) and fsdp (ZeRO-3)
RESUME_WITH = {"ddp": "ddp", "fsdp": "fsdp", "deepspeed": "ddp", "deepspeed_stage_3": "fsdp"}

# float32 training in different reduction orders (allreduce vs reduce-scatter, sharded vs whole matmuls):
# measured max differences after 30 steps were ~1e-7 on weights and ~1e-8 on Adam moments; weights move
# by ~1e-2 over the run, so these bounds are ~100x the noise and ~1000x below any real divergence
WEIGHT_ATOL, MOMENT_ATOL = 1e-5, 1e-6
# same weights, same batches, same forward code; only summation order (thread count) can differ:
# a few float32 ulps of a ~3.5 mean over thousands of tokens
LOSS_RTOL = 1e-5

PROBE = '''
import gc
import json

import lightning as L
import torch
import torch.nn.functional as F


class FullValProbe(L.Callback):
    """At the end of training: the live (sharded) model's loss over the whole val split, computed the
    way `python -m microgpt.evaluate` computes it. Every rank runs every batch (sharded parameters are
    gathered inside forward); rank 0 writes the result."""

    def __init__(self, out: str, batch_size: int = 16):
        self.out, self.batch_size = out, batch_size

    def on_train_start(self, trainer, pl_module):
        # every rank: the cyclic GC as Python sets it (train.py limits it during its start-up only)
        with open(f"{self.out}.gc{trainer.global_rank}", "w") as f:
            json.dump({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}, f)

    def on_train_end(self, trainer, pl_module):
        pl_module.eval()
        nll, n = 0.0, 0
        with torch.no_grad():
            for x, y in trainer.datamodule.full_val_batches(self.batch_size):
                logits = pl_module(x)
                nll += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
                n += y.numel()
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump({"val_loss": nll / n, "tokens": n, "global_step": trainer.global_step}, f)
'''


# ---- processes ------------------------------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    """Is any non-zombie process left in process group pgid?"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def run_group(args: list[str], timeout: float = RUN_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in a new process group; on timeout the whole group (all ranks) is killed. Fails the test
    when a process of the group (e.g. rank 1) outlives rank 0 by more than a few seconds."""
    # one thread per process (as conftest.run_cli): 2 ranks on 2 cores, nothing oversubscribed
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.Popen(
        [PY, *args], cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\n{err[-4000:]}")
    deadline = time.monotonic() + 15
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(p.pid):
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"processes of `{' '.join(args)}` outlived it (orphaned ranks); killed them")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ok(cp: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert cp.returncode == 0, f"exit {cp.returncode}: {' '.join(map(str, cp.args[1:]))}\n{cp.stderr[-5000:]}"
    return cp


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """metrics.csv -> ({step: train_loss}, {step: val_loss})."""
    train, val = {}, {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train_loss"):
                train[int(row["step"])] = float(row["train_loss"])
            if row.get("val_loss"):
                val[int(row["step"])] = float(row["val_loss"])
    return train, val


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strategies")


@pytest.fixture(scope="module")
def text(work) -> Path:
    """~60 KB of tiny Shakespeare (54k train / 6k val characters)."""
    p = work / "small.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def probe_env(work) -> dict:
    d = work / "probe"
    d.mkdir()
    (d / "strategy_probe.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])}


def _extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "microgpt" / "torch_extensions")


@pytest.fixture(scope="session")
def deepspeed_ready():
    """DeepSpeed JIT-builds its CPU communication helper (~30 s) the first time: build it once into the
    cache (TORCH_EXTENSIONS_DIR, as `make` sets it), outside any test's timing; later sessions find it."""
    ext = _extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)
    if not any(ext.glob("deepspeed_shm_comm/*.so")):
        code = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
        ok(run_group(["-c", code], timeout=600))
    yield


@pytest.fixture(scope="module", autouse=True)
def _clean_dev_shm():
    """DeepSpeed's shared-memory allreduce can leave ~66 MB buffers per rank in /dev/shm: remove ours."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) if Path("/dev/shm").is_dir() else set()
    yield
    if Path("/dev/shm").is_dir():
        for f in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
            f.unlink(missing_ok=True)


def _train_args(text: Path, run_dir: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "train.py",
        "model=nano",
        "model.n_unique_layers=1",  # both layers use one block; the head reads wte (tie_embeddings default)
        "data=text",
        f"data.path={text}",
        f"data.batch_size={BATCH}",
        f"data.eval_batches={EVAL_BATCHES}",
        f"strategy={strategy}",
        "trainer.devices=2",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={VAL_EVERY}",
        "trainer.log_every_n_steps=1",
        "scheduler.warmup_steps=2",
        f"scheduler.decay_steps={STEPS}",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.lr_monitor=null",
        # print_sample stays on (the default): a sharded model's sample needs every rank (issue 13)
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(request, work, text, probe_env):
    """strategy -> its 2-process run (trained once per module, on first use)."""
    cache: dict[str, dict] = {}

    def get(strategy: str) -> dict:
        if strategy in cache:
            return cache[strategy]
        if strategy.startswith("deepspeed"):
            request.getfixturevalue("deepspeed_ready")
        run_dir = work / strategy
        probe_out = work / f"{strategy}-probe.json"
        extra = ["+callbacks.probe._target_=strategy_probe.FullValProbe", f"+callbacks.probe.out={probe_out}"]
        cp = ok(run_group(_train_args(text, run_dir, strategy, *extra), env=probe_env))
        # the default end-of-run sample: generated on every rank, printed once
        assert cp.stdout.count("--- sample ---") == 1, cp.stdout[-3000:]
        last = run_dir / "checkpoints" / "last.ckpt"
        if strategy in SHARDED:
            assert last.is_dir(), f"{strategy} should save a sharded directory"
            ckpt = run_dir / "consolidated.ckpt"
            cp = ok(run_group(["-m", "microgpt.consolidate", f"ckpt={last}", f"out={ckpt}"], timeout=120))
            assert "consolidated" in cp.stdout
        else:
            assert last.is_file()
            ckpt = last
        for rank in (0, 1):  # each training process, however the strategy started it, resumed its GC
            seen = json.loads(Path(f"{probe_out}.gc{rank}").read_text())
            assert seen["threshold"] == list(gc.get_threshold()), (strategy, rank, seen)  # the interpreter's defaults
            assert seen["frozen"] > 100_000 or sys.version_info >= (3, 14), (strategy, rank, seen)
        train, val = read_metrics(run_dir)
        cache[strategy] = {
            "dir": run_dir,
            "last": last,
            "ckpt": ckpt,
            "train": train,
            "val": val,
            "probe": json.loads(probe_out.read_text()),
        }
        return cache[strategy]

    return get


@pytest.fixture(scope="module")
def resumed(work, text, runs):
    """strategy -> a run resumed from its (consolidated) checkpoint for 10 more steps."""
    cache: dict[str, dict] = {}

    def get(strategy: str) -> dict:
        if strategy not in cache:
            src = runs(strategy)
            run_dir = work / f"{strategy}-resumed"
            args = _train_args(text, run_dir, RESUME_WITH[strategy], f"ckpt_path={src['ckpt']}")
            args = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={STEPS + 10}" for a in args]
            ok(run_group(args))
            train, _ = read_metrics(run_dir)
            last = run_dir / "checkpoints" / "last.ckpt"
            if last.is_dir():  # fsdp saved a distcp directory: read it through the consolidator
                from microgpt.consolidate import consolidate

                final = consolidate(last)
            else:
                final = load_ckpt(last)
            cache[strategy] = {"train": train, "final": final}
        return cache[strategy]

    return get


# ---- short runs: learning, consolidation, evaluation, sharing -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_short_run_learns_and_its_checkpoint_evaluates_like_the_live_model(strategy, runs, text):
    r = runs(strategy)
    ck = load_ckpt(r["ckpt"])  # weights_only: a consolidated file is data only
    hp = ck["hyper_parameters"]
    assert {"model", "tokenizer"} <= set(hp) and ck["global_step"] == STEPS
    assert ck["state_dict"] and all(k.startswith("model.") for k in ck["state_dict"])

    # it learned: an untrained model (init std 0.02) predicts ~uniformly, loss ln(vocab)
    steps = sorted(r["val"])
    assert steps[-1] == STEPS - 1 and len(steps) == STEPS // VAL_EVERY
    first, final = r["val"][steps[0]], r["val"][steps[-1]]
    assert final < first and final < math.log(hp["model"]["vocab_size"]) - 0.3, r["val"]

    # the evaluate CLI on the checkpoint == the live model on the same full val split
    cp = ok(
        run_group(
            ["-m", "microgpt.evaluate", f"ckpt={r['ckpt']}", "data=text", f"data.path={text}", "split=val"], timeout=120
        )
    )
    ev = json.loads(cp.stdout.strip().splitlines()[-1])
    live = r["probe"]
    assert ev["tokens"] == live["tokens"]
    assert ev["val_loss"] == pytest.approx(live["val_loss"], rel=LOSS_RTOL)

    # and the loss the run logged at its last evaluation (its fixed val windows, split over both ranks)
    from microgpt import load
    from microgpt.data import TokenDataModule

    model, tok = load(r["ckpt"])
    dm = TokenDataModule(
        source="text", path=str(text), block_size=model.config.block_size, batch_size=BATCH,
        eval_batches=EVAL_BATCHES, seed=SEED, tokenizer_obj=tok,
    )  # fmt: skip
    dm.setup()
    nll = tokens = 0
    with torch.no_grad():
        for x, y in dm.val_dataset():
            nll += F.cross_entropy(model(x).view(-1, model.config.vocab_size), y.view(-1), reduction="sum").item()
            tokens += y.numel()
    assert nll / tokens == pytest.approx(final, rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tied_and_shared_weights_stay_shared(strategy, runs):
    from microgpt import load
    from microgpt.config import GPTConfig
    from microgpt.model import GPT

    r = runs(strategy)
    sd = load_ckpt(r["ckpt"])["state_dict"]
    # one block for two layers, no separate head: nothing was duplicated (or untied) by the strategy
    assert not any("lm_head" in k for k in sd)
    assert {k.split(".")[2] for k in sd if k.startswith("model.blocks.")} == {"0"}
    model, _ = load(r["ckpt"])
    fresh = GPT(GPTConfig.from_dict(model.config.to_dict()))
    assert sum(v.numel() for v in sd.values()) == fresh.num_params(non_embedding=False)
    assert model.layer(0) is model.layer(1) and model.output_weight is model.wte.weight
    # the shared uses were identical in the live run too: this single-block, tied model reproduces the live
    # sharded model's loss (test above); two diverging copies could not both be matched by one tensor
    assert load_ckpt(r["ckpt"])["hyper_parameters"]["model"]["n_unique_layers"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_runs_reach_ddps_weights_and_optimizer_state(strategy, runs):
    """DDP's last.ckpt is plain torch, written by Lightning without our code: the reference. Same data per
    rank, same math; sharding changes only float summation order."""
    ref, got = load_ckpt(runs("ddp")["ckpt"]), load_ckpt(runs(strategy)["ckpt"])
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, atol=WEIGHT_ATOL, rtol=0, msg=k)
        assert (got["state_dict"][k] - v).abs().max() < 0.01 * (v.abs().max() + 1e-3)

    (ro,), (go,) = ref["optimizer_states"], got["optimizer_states"]
    assert len(ro["param_groups"]) == len(go["param_groups"])
    for rg, gg in zip(ro["param_groups"], go["param_groups"]):
        assert (rg["lr"], rg["weight_decay"], len(rg["params"])) == (gg["lr"], gg["weight_decay"], len(gg["params"]))
        for ri, name in zip(rg["params"], gg["params"]):
            rs, gs = ro["state"][ri], go["state"][name]
            assert gs["exp_avg"].shape == got["state_dict"][name].shape, name
            assert float(gs["step"]) == float(rs["step"]) == STEPS
            torch.testing.assert_close(gs["exp_avg"], rs["exp_avg"], atol=MOMENT_ATOL, rtol=1e-3, msg=name)
            torch.testing.assert_close(gs["exp_avg_sq"], rs["exp_avg_sq"], atol=MOMENT_ATOL**2, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed", "deepspeed_stage_3"])
def test_deepspeed_consolidation_equals_deepspeeds_own_fp32_export(strategy, runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    r = runs(strategy)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(r["last"]))
    got = load_ckpt(r["ckpt"])["state_dict"]
    assert got.keys() == ref.keys()
    for k in got:
        ref_k = ref[k].contiguous() if hasattr(ref[k], "contiguous") else ref[k]
        assert torch.equal(got[k], torch.as_tensor(ref_k)), k


# ---- resume ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_continues_from_the_checkpoint(strategy, runs, resumed):
    r, res = runs(strategy), resumed(strategy)
    assert sorted(res["train"]) == list(range(STEPS, STEPS + 10))  # global_step continues at 30
    assert res["final"]["global_step"] == STEPS + 10
    # the optimizer state came along: Adam's step counter went on from 30 (a fresh optimizer would say 10)
    steps = {float(s["step"]) for s in res["final"]["optimizer_states"][0]["state"].values()}
    assert steps == {float(STEPS + 10)}
    # and the weights: the first resumed loss is where the run left off, nowhere near a fresh model's ln(V)
    last_losses = [r["train"][s] for s in range(STEPS - 5, STEPS)]
    assert abs(res["train"][STEPS] - sum(last_losses) / 5) < 0.25


@pytest.mark.slow
def test_resumed_runs_agree_across_strategies(resumed):
    """All four continue the same trajectory (same data per rank, same restored state): their losses
    after resuming agree, whichever strategy trained and whichever resumed."""
    curves = {s: resumed(s)["train"] for s in STRATEGIES}
    ref = curves["ddp"]
    for s, c in curves.items():
        for step, loss in ref.items():
            assert c[step] == pytest.approx(loss, abs=1e-4), (s, step)


def _train_accepts_sharded_directories(tmp: Path) -> bool:
    from omegaconf import OmegaConf

    from microgpt.train import resolve_ckpt_path

    d = tmp / "looks-like-deepspeed.ckpt"
    d.mkdir(exist_ok=True)
    (d / "latest").write_text("checkpoint")
    try:
        resolve_ckpt_path(OmegaConf.create({"ckpt_path": str(d), "paths": {"output_dir": str(tmp)}}))
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_deepspeed_resumes_from_its_own_directory(work, text, runs, resumed):
    """No consolidation needed to continue under the same strategy: ckpt_path=<the DeepSpeed directory>."""
    if not _train_accepts_sharded_directories(work):
        pytest.skip("microgpt.train.resolve_ckpt_path accepts only single files (sharded-directory resume not wired)")
    run_dir = work / "deepspeed-resumed-dir"
    args = _train_args(text, run_dir, "deepspeed", f"ckpt_path={runs('deepspeed')['last']}")
    args = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={STEPS + 10}" for a in args]
    ok(run_group(args))
    train, _ = read_metrics(run_dir)
    ref = resumed("ddp")["train"]
    assert sorted(train) == sorted(ref)
    for step, loss in ref.items():
        assert train[step] == pytest.approx(loss, abs=1e-4), step


@pytest.mark.slow
def test_distillation_headline_under_deepspeed(work, text, runs):
    """`python train.py model=micro strategy=deepspeed +plugin=distill ...`: the teacher (the ddp run's nano
    model) is used by the objective but never becomes part of what DeepSpeed trains, shards or saves."""
    from microgpt.config import GPTConfig
    from microgpt.consolidate import consolidate
    from microgpt.model import GPT

    teacher = runs("ddp")["last"]
    run_dir = work / "distill"
    args = _train_args(text, run_dir, "deepspeed", "+plugin=distill", f"plugins.distill.teacher={teacher}")
    args = [a for a in args if not a.startswith(("model=", "model.n_unique", "trainer.max_steps", "trainer.val_check"))]
    extra = ["model=micro", "model.block_size=32", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    ok(run_group([*args, *extra]))
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    kd = [float(r["train_kd"]) for r in rows if r.get("train_kd")]
    assert len(kd) == 4 and all(math.isfinite(v) and v > 0 for v in kd)  # the teacher's soft targets were used
    ck = consolidate(run_dir / "checkpoints" / "last.ckpt")
    student = GPT(GPTConfig.from_dict(ck["hyper_parameters"]["model"]))
    assert ck["hyper_parameters"]["model"]["n_layer"] == 4  # micro, not the nano teacher
    assert set(ck["state_dict"]) == {f"model.{k}" for k in student.state_dict()}
    assert {n for g in ck["optimizer_states"][0]["param_groups"] for n in g["params"]} == set(ck["state_dict"])


# ---- ddp vs one process ---------------------------------------------------------------------------------


def _nanogpt_lr(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay:
        return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * (lr - min_lr)


def _plain_loop(model_cfg: dict, batches: list[list[tuple]], steps: int, eval_only: bool = False) -> list[list[float]]:
    """A plain PyTorch AdamW loop (no Lightning): global batch = the ranks' batches stacked; returns each
    rank's own loss per step (what rank 0 logs). eval_only: the initial model's losses on every batch."""
    import lightning as L

    from microgpt.config import GPTConfig
    from microgpt.model import build_model

    L.seed_everything(SEED, verbose=False)  # as train.py does before building the model
    model = build_model(GPTConfig.from_dict(model_cfg))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    if eval_only:
        with torch.no_grad():
            return [[F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in b] for b in batches]
    out = []
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = _nanogpt_lr(k, 1e-3, 1e-4, warmup=2, decay=steps)
        xs, ys = zip(*batches[k])
        logits = model(torch.cat(xs))
        per_tok = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.cat(ys).view(-1), reduction="none")
        per_rank = per_tok.view(len(xs), -1).mean(1)
        loss = per_rank.mean()  # equal-size ranks: DDP's averaged gradient is this mean's gradient
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.append(per_rank.tolist())
    return out


@pytest.mark.slow
def test_ddp_matches_one_process_at_the_same_global_batch(work, text):
    """One process with batch 12 vs ddp with 2 x 6: both reproduce a plain PyTorch loop on their global
    batches (1e-5: float32 summation order), and their first losses agree within the batch-sampling noise."""
    from microgpt.data import TokenDataModule

    steps = 6
    common = ["+trainer.limit_val_batches=0", "callbacks.model_checkpoint=null", f"scheduler.decay_steps={steps}"]
    logged = {}
    for name, devices, batch in (("single", 1, 2 * BATCH), ("ddp", 2, BATCH)):
        run_dir = work / f"global-batch-{name}"
        args = _train_args(text, run_dir, "ddp" if devices > 1 else "auto", *common)
        args = [a for a in args if not a.startswith(("trainer.devices", "data.batch_size", "trainer.max_steps"))]
        ok(run_group([*args, f"trainer.devices={devices}", f"data.batch_size={batch}", f"trainer.max_steps={steps}"]))
        logged[name] = [read_metrics(run_dir)[0][k] for k in range(steps)]

    hp = load_hparams(work / "global-batch-single")
    dms = {}
    for b in (BATCH, 2 * BATCH):
        dms[b] = TokenDataModule(source="text", path=str(text), block_size=32, batch_size=b, seed=SEED)
        dms[b].setup()
    single_batches = [[dms[2 * BATCH].train_dataset(rank=0).batch(k)] for k in range(steps)]
    ddp_batches = [[dms[BATCH].train_dataset(rank=r).batch(k) for r in (0, 1)] for k in range(steps)]
    ref_single = [losses[0] for losses in _plain_loop(hp, single_batches, steps)]
    ref_ddp = [losses[0] for losses in _plain_loop(hp, ddp_batches, steps)]
    assert logged["single"] == pytest.approx(ref_single, abs=1e-5)
    assert logged["ddp"] == pytest.approx(ref_ddp, abs=1e-5)
    # the reference can tell: rank 0 training alone on its half (no gradient exchange) drifts away
    alone = [losses[0] for losses in _plain_loop(hp, [b[:1] for b in ddp_batches], steps)]
    assert max(abs(a - b) for a, b in zip(alone, logged["ddp"])) > 100 * 1e-5
    # raw first losses: same init and global batch size, different windows drawn, so they differ only by
    # batch-sampling noise; bound it by 4 sigma of the difference of two batch means at init
    init = _plain_loop(hp, [[dms[2 * BATCH].train_dataset(rank=0).batch(k)] for k in range(32)], 0, eval_only=True)
    sigma = statistics.stdev(losses[0] for losses in init)
    assert abs(logged["single"][0] - logged["ddp"][0]) <= 4 * math.sqrt(2) * sigma


def load_hparams(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "hparams.yaml").read_text())["model"]


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_strategy_is_hydras_clear_error(work):
    cp = run_group(["train.py", "strategy=bogus", f"hydra.run.dir={work / 'bogus'}"], timeout=120)
    assert cp.returncode != 0
    assert cp.returncode == 2
    line = cp.stderr.strip().splitlines()[-1]  # one line: the error and every choice
    assert line.startswith("error:") and "Could not find 'strategy/bogus'" in line
    for name in ("ddp", "fsdp", "deepspeed", "deepspeed_stage_3"):
        assert name in line.split("available options in 'strategy':")[1]
    assert not (work / "bogus").exists()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@pytest.mark.slow
def test_more_devices_than_this_machine_has_is_a_clear_error(work, text):
    n = _cores() + 1
    run_dir = work / "too-many"
    cp = run_group(["train.py", "model=nano", "data=text", f"data.path={text}", "strategy=fsdp",
                    f"trainer.devices={n}", f"hydra.run.dir={run_dir}"], timeout=120)  # fmt: skip
    assert cp.returncode == 2
    last = cp.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"trainer.devices={n}" in last and f"<={_cores()}" in last
    assert not run_dir.exists()  # refused before anything started


# ---- strategy selection (no processes) ------------------------------------------------------------------


def _strategy_from_config(name: str, *overrides: str):
    from hydra.utils import instantiate

    cfg = compose([f"strategy={name}", "trainer.devices=2", *overrides], output_dir="/tmp/unused")
    return instantiate(cfg.trainer.strategy), cfg


def test_strategy_configs_pick_lightnings_strategies_or_the_cpu_variants():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    from microgpt.strategies import CPUDeepSpeedStrategy

    cpu = not torch.cuda.is_available()
    s, cfg = _strategy_from_config("ddp")
    assert type(s) is DDPStrategy and cfg.trainer.devices == 2
    s, _ = _strategy_from_config("fsdp")
    assert type(s) is ModelParallelStrategy
    assert (s._data_parallel_size, s._tensor_parallel_size) == (2, 1)
    for name, stage, offload in (
        ("deepspeed", 2, False),
        ("deepspeed_stage_3", 3, False),
        ("deepspeed_offload", 2, True),
    ):
        s, _ = _strategy_from_config(name)
        assert type(s) is (CPUDeepSpeedStrategy if cpu else DeepSpeedStrategy), name
        assert s.config["zero_optimization"]["stage"] == stage
        assert ("offload_optimizer" in s.config["zero_optimization"]) is offload
    s, _ = _strategy_from_config("deepspeed", "trainer.accelerator=cpu")
    assert type(s) is CPUDeepSpeedStrategy


def test_deepspeed_factory_returns_lightnings_own_strategy_on_cuda(monkeypatch):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from microgpt import strategies

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    s = strategies.deepspeed(stage=3, devices=8, accelerator="auto")
    assert type(s) is DeepSpeedStrategy and s.config["zero_optimization"]["stage"] == 3
    f = strategies.fsdp(devices=4, num_nodes=2, accelerator="gpu")
    assert (f._data_parallel_size, f._tensor_parallel_size) == (8, 1)


def test_resuming_a_checkpoint_under_a_strategy_that_cannot_read_it_says_what_to_do(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from microgpt.errors import CheckpointError
    from microgpt.strategies import CPUDeepSpeedStrategy, check_resume

    ds, dcp, single = tmp_path / "ds.ckpt", tmp_path / "dcp.ckpt", tmp_path / "one.ckpt"
    ds.mkdir()
    (ds / "latest").write_text("checkpoint")  # DeepSpeed's marker
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")  # torch.distributed.checkpoint's marker
    single.write_bytes(b"")
    ddp, zero, fsdp = DDPStrategy(), CPUDeepSpeedStrategy(stage=2), ModelParallelStrategy(2, 1)
    for path, strategy in ((ds, zero), (dcp, fsdp), (single, ddp), (single, fsdp), (None, zero)):
        check_resume(path, strategy)  # fine
    with pytest.raises(CheckpointError, match="strategy=deepspeed.*microgpt.consolidate"):
        check_resume(ds, ddp)
    with pytest.raises(CheckpointError, match="strategy=fsdp.*microgpt.consolidate"):
        check_resume(dcp, zero)
    with pytest.raises(CheckpointError, match="strategy=ddp"):
        check_resume(single, zero)


def test_device_checks():
    from microgpt import strategies
    from microgpt.errors import ConfigError

    assert strategies._check_devices(1, 3, "cpu") == 3
    assert strategies._check_devices([0, 1][: min(2, _cores())], 1, "cpu") == min(2, _cores())
    with pytest.raises(ConfigError, match="CPU core"):
        strategies._check_devices(_cores() + 1, 1, "cpu")
    with pytest.raises(ConfigError, match=">= 1"):
        strategies._check_devices(0, 1, "cpu")
    with pytest.raises(ConfigError, match="not a number"):
        strategies._check_devices("two", 1, "cpu")
    with pytest.raises(ConfigError, match="stage"):
        strategies.deepspeed(stage=4, accelerator="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            strategies.ddp(devices=1, accelerator="gpu")
