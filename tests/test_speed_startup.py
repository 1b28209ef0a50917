"""Speed parts outside the model's arithmetic: trainer.precision=auto (which precision for which machine, the
fp32 attention under CPU bf16 autocast), the lean start-up (torchmetrics without transformers/scipy/matplotlib)
and bench/gpu.sh's CPU dry run."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import PY, ROOT, SHAKESPEARE, run_cli
from omegaconf import OmegaConf

from microgpt.components.attention import CausalSelfAttention
from microgpt.config import GPTConfig
from microgpt.lean_imports import START_UP_GC_THRESHOLD, resume_gc
from microgpt.training.precision import choose_precision, resolve_precision

AMX = ["fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
AVX2 = ["fpu", "avx2", "fma"]


# ---- trainer.precision=auto ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, want",
    [
        (dict(flags=AMX, cuda=False), "bf16-mixed"),
        (dict(flags=["avx512f", "avx512_bf16"], cuda=False), "bf16-mixed"),  # Zen 4/5: AVX-512 bf16, no AMX
        (dict(flags=AVX2, cuda=False), "32-true"),  # bf16 would be emulated: much slower
        (dict(flags=AMX, cuda=False, devices=2, strategy="ddp"), "32-true"),  # CPU DDP keeps its tested precision
        (dict(flags=AMX, cuda=False, strategy={"_target_": "microgpt.training.strategies.deepspeed"}), "32-true"),
        (dict(flags=AVX2, cuda=True, cuda_bf16=True), "bf16-mixed"),
        (dict(flags=AVX2, cuda=True, cuda_bf16=False), "32-true"),
        (dict(flags=AMX, cuda=True, cuda_bf16=True, accelerator="cpu"), "bf16-mixed"),
        (dict(flags=AVX2, cuda=True, cuda_bf16=True, accelerator="cpu"), "32-true"),
    ],
)
def test_auto_precision_follows_the_hardware(kw, want):
    args = {k: kw.pop(k) for k in ("accelerator", "strategy", "devices") if k in kw}
    precision, why = choose_precision(**args, **kw)
    assert precision == want, why
    assert why  # the reason goes into the log line


def test_resolve_precision_logs_auto_and_keeps_explicit_values(caplog):
    with caplog.at_level(logging.INFO, logger="microgpt"):
        got = resolve_precision(OmegaConf.create({"precision": "auto", "accelerator": "cpu"}), flags=AMX, cuda=False)
    assert got == "bf16-mixed"
    line = [r.getMessage() for r in caplog.records if "precision=auto" in r.getMessage()]
    assert len(line) == 1 and "bf16-mixed" in line[0] and "trainer.precision=32-true" in line[0]
    caplog.clear()
    for explicit in ("32-true", "bf16-mixed", "16-mixed", 32):
        cfg = OmegaConf.create({"precision": explicit, "accelerator": "cpu"})
        assert resolve_precision(cfg, flags=AMX if explicit == "32-true" else AVX2, cuda=False) == explicit
    assert not caplog.records


def test_baby_and_speedrun_presets_use_auto():
    from conftest import compose

    for exp in ("shakespeare_baby", "shakespeare_speedrun"):
        assert compose([f"experiment={exp}"]).trainer.precision == "auto"
    assert compose([]).trainer.precision == "32-true"  # other presets keep fp32 unless asked


def test_attention_runs_in_fp32_under_cpu_bf16_autocast():
    """Under CPU bf16 autocast the qkv and output projections are bf16 matmuls and the attention itself is
    fp32: compared with a hand-written fp32 softmax attention over the same bf16 projections."""
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_embd=32)
    attn = CausalSelfAttention(c, n_kv_head=4).eval()
    seen = []  # what reaches the output projection: the attention's result
    attn.proj.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x)
        qkv = attn.qkv(x)
    assert qkv.dtype == torch.bfloat16 and y.dtype == torch.bfloat16  # the projections: bf16 matmuls
    q, k, v = (t.float().view(2, 9, 4, 8).transpose(1, 2) for t in qkv.split(32, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32)
    att, out = seen[0]
    assert att.dtype == torch.float32
    torch.testing.assert_close(att, ref, rtol=1e-5, atol=1e-6)
    assert out is y
    # the same attention in bf16 (what autocast alone would run) is measurably different
    bf = F.scaled_dot_product_attention(*(t.bfloat16() for t in (q, k, v)), is_causal=True)
    assert (bf.float() - (scores.softmax(-1) @ v)).abs().max() > 1e-4
    # gradients reach the fp32 weights through the fp32 attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x).float().square().sum().backward()
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.dtype == torch.float32
    assert torch.isfinite(attn.qkv.weight.grad).all() and attn.qkv.weight.grad.abs().sum() > 0


# ---- lean start-up ------------------------------------------------------------------------------------

_PROBE = r"""
import importlib.util, json, sys
import microgpt.cli  # what train.py imports first
import lightning, torch
from microgpt.training.metrics import LMMetrics
m = LMMetrics(bytes_per_token=2.0)
m.update(torch.tensor(1.5), 10); m.update(torch.tensor(3.0), 30)
out = {k: float(v) for k, v in m.compute().items()}
out["loaded"] = [n for n in ("transformers", "scipy", "matplotlib") if n in sys.modules]
out["installed"] = [n for n in ("transformers", "scipy", "matplotlib") if importlib.util.find_spec(n)]
if out["installed"]:
    importlib.import_module(out["installed"][0])  # still importable afterwards, for whoever asks
    out["later"] = out["installed"][0] in sys.modules
print(json.dumps(out))
"""


def _probe(**env) -> dict:
    p = subprocess.run(
        [PY, "-c", _PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_lean_startup_keeps_torchmetrics_integrations_out_and_metrics_right():
    lean = _probe(MICROGPT_LEAN_IMPORTS="1")
    assert lean["loaded"] == []
    # token-weighted mean: (1.5 * 10 + 3.0 * 30) / 40, by hand
    assert lean["loss"] == pytest.approx(2.625)
    assert lean["perplexity"] == pytest.approx(math.exp(2.625), rel=1e-6)
    assert lean["bits_per_byte"] == pytest.approx(2.625 / math.log(2) / 2.0, rel=1e-6)
    if lean["installed"]:
        assert lean["later"] is True
        # switched off, torchmetrics imports what it finds (the reason the switch exists)
        full = _probe(MICROGPT_LEAN_IMPORTS="0")
        assert set(full["loaded"]) & set(full["installed"]), full
        assert full["loss"] == pytest.approx(2.625)


_EXIT_PROBE = r"""
import atexit, logging, sys
atexit.register(lambda: print("tabulate at exit:", "tabulate" in sys.modules))  # runs last (LIFO)
if sys.argv[1] == "info":  # someone reads dynamo's logs (as TORCH_LOGS would): the report stays
    logging.getLogger("torch._dynamo.utils").setLevel(logging.INFO)
import torch._dynamo.utils
from microgpt.lean_imports import skip_dynamo_exit_report
skip_dynamo_exit_report()
"""


def test_dynamo_exit_report_is_dropped_only_when_its_logger_drops_it():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for level, formatted in (("default", False), ("info", True)):
        p = subprocess.run([PY, "-c", _EXIT_PROBE, level], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert f"tabulate at exit: {formatted}" in p.stdout, (level, p.stdout)


def test_resume_gc_freezes_the_start_up_and_restores_the_collectors_defaults():
    saved = gc.get_threshold()
    gc.set_threshold(700, START_UP_GC_THRESHOLD, START_UP_GC_THRESHOLD)  # what train.py sets before its imports
    try:
        frozen = gc.get_freeze_count()
        resume_gc()
        assert gc.get_threshold() == (700, 10, 10)  # Python's defaults
        assert gc.get_freeze_count() > frozen
        now = gc.get_freeze_count()
        resume_gc()  # thresholds as usual (a library user, the next job of a multirun): nothing is frozen again
        assert gc.get_freeze_count() == now
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


_GC_PROBE = """
import gc, json, os
import lightning as L


class Probe(L.Callback):
    def __init__(self):  # built with the trainer, at the end of start-up
        self.seen = {"start_up": gc.get_threshold()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.seen.update(first_step=gc.get_threshold(), frozen=gc.get_freeze_count())
            with open(os.environ["GC_PROBE_OUT"], "w") as f:
                json.dump(self.seen, f)
"""


def test_train_py_limits_the_gc_for_its_start_up_and_trains_with_the_defaults(tmp_path, small_text):
    (tmp_path / "gc_probe.py").write_text(_GC_PROBE)
    out = tmp_path / "seen.json"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "GC_PROBE_OUT": str(out)}
    args = ["model=nano", "data=text", f"data.path={small_text}", f"hydra.run.dir={tmp_path / 'run'}"]
    cp = run_cli(["train.py", *args, "trainer.max_steps=2", "+callbacks.gc_probe._target_=gc_probe.Probe"], env=env)
    assert cp.returncode == 0, cp.stderr[-3000:]
    seen = json.loads(out.read_text())
    defaults = list(gc.get_threshold())  # this interpreter's (pytest leaves them alone)
    assert seen["first_step"] == defaults
    if sys.version_info < (3, 14):  # older generations left alone while torch, Lightning and Hydra load
        assert seen["start_up"][1:] == [START_UP_GC_THRESHOLD, START_UP_GC_THRESHOLD]
        assert seen["frozen"] > 100_000, seen  # torch's, Lightning's and Hydra's objects: skipped by later collections


# ---- bench/gpu.sh's CPU dry run ------------------------------------------------------------------------


def test_gpu_bench_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """bench/gpu.sh --dry-run: every GPU step's command, 2 steps of a tiny model on the CPU (DeepSpeed's config
    composed only); each step reports its figures, and nothing goes into bench/results."""
    before = sorted((ROOT / "bench" / "results").glob("gpu.*"))
    p = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--data", str(SHAKESPEARE), "--out", str(tmp_path)],
        env={**os.environ, "PYTHON": PY, "OMP_NUM_THREADS": "1", "GPU_BENCH_TIMEOUT_S": "570"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"mini", "small", "ddp", "deepspeed", "speedrun"}
    assert all(r["rc"] == 0 for r in runs.values()), runs
    for name in ("mini", "small", "ddp"):
        assert doc["summary"][name]["tok_s"] > 0 and doc["summary"][name]["params"] > 0
        assert "trainer.precision=bf16-mixed" in runs[name]["command"]  # the GPU settings, tiny-CPU ones after
        assert "compile=true" in runs[name]["command"] or name == "ddp"
    assert runs["deepspeed"]["composed"] is True and "strategy=deepspeed" in runs["deepspeed"]["command"]
    assert "experiment=shakespeare_speedrun_mini" in runs["speedrun"]["command"]
    assert runs["speedrun"]["val"] and "speedrun" in doc["summary"]
    assert doc["summary"]["speedrun"]["met"] is False  # two steps on the fixture: no claim about the goal
    assert sorted((ROOT / "bench" / "results").glob("gpu.*")) == before


def test_startup_trace_stamps_every_phase_of_train_py_in_order(small_text):
    """bench/startup.py's phase profile: train.py under startup_trace.py stamps each phase once, in train.py's
    order (two Hydra compositions, then run, fit, resume_gc and the first step), and the phases tile the run."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import startup
    finally:
        sys.path.remove(str(ROOT / "bench"))
    events = startup.run_phases(1, ["model=nano", "data=text", f"data.path={small_text}", "trainer.max_steps=2"])
    order = [
        "python",
        "hydra_imported",
        "torch_imported",
        "dynamo_imported",
        "lightning_imported",
        "compose>",
        "compose<",
        "compose>#2",
        "compose<#2",
        "run>",
        "fit>",
        "resume_gc>",
        "resume_gc<",
        "first_step",
    ]
    times = [events[e] for e in order]  # a KeyError names a phase that was not stamped
    assert times == sorted(times) and times[0] > 0
    spans = startup.spans(events)
    assert set(spans) == {label for label, _, _ in startup.PHASES}
    assert all(v >= 0 for v in spans.values())
    assert sum(spans.values()) == pytest.approx(events["first_step"], abs=1e-6)  # they tile spawn -> step 1


# ---- bench/vs_nanogpt.py: seeds for nanoGPT, the val comparison over seeds ----------------------------------


def _vs_nanogpt():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vs_nanogpt
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return vs_nanogpt


def test_nanogpt_seed_config_redirects_its_fixed_seed(tmp_path):
    """The config file handed to nanoGPT's configurator, run as it runs it (exec in train.py's globals): the
    later `torch.manual_seed(1337 + seed_offset)` then seeds with N."""
    import types

    vs = _vs_nanogpt()
    assert vs.nanogpt_seed_args(1337, tmp_path) == [] and vs.nanogpt_seed_args(None, tmp_path) == []
    (path,) = vs.nanogpt_seed_args(7, tmp_path)
    seeded = []
    fake_torch = types.ModuleType("torch")
    fake_torch.manual_seed = seeded.append
    saved = sys.modules.get("torch")
    sys.modules["torch"] = fake_torch
    try:
        train_globals = {"torch": fake_torch, "seed_offset": 0}
        exec(open(path).read(), train_globals)  # what configurator.py does with a config file
        exec("torch.manual_seed(1337 + seed_offset)", train_globals)  # nanoGPT train.py's seeding line
    finally:
        sys.modules["torch"] = saved
    assert seeded == [7]


def test_val_comparison_over_seeds_uses_nanogpts_spread():
    vs = _vs_nanogpt()
    nano = {1337: 1.886, 0: 1.880, 1: 1.892, 3: 1.878}
    mean_n = sum(nano.values()) / 4
    sd_n = (sum((v - mean_n) ** 2 for v in nano.values()) / 3) ** 0.5  # sample sd, by hand
    close = vs.seed_stats({"nanoGPT": nano, "microgpt": {1337: 1.888, 0: 1.884, 1: 1.889, 3: 1.880}})
    assert close["nanoGPT"]["mean"] == pytest.approx(mean_n) and close["nanoGPT"]["sd"] == pytest.approx(sd_n)
    assert close["met"] is True
    far = vs.seed_stats({"nanoGPT": nano, "microgpt": {s: v + 2 * sd_n for s, v in nano.items()}})
    assert far["met"] is False and far["diff"] == pytest.approx(2 * sd_n)
    assert vs.seed_stats({"nanoGPT": {1337: 1.88}, "microgpt": {1337: 1.88}})["met"] is None  # no spread, no verdict
    lines, summary = vs.summarize([], [], {"nanoGPT": nano, "microgpt": nano})
    assert summary["val_seeds"]["met"] is True and "within nanoGPT's 1 sd" in lines[-1]
