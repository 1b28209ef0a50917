"""The first hour of a user (issue 14): what the console shows, where things went, evaluate/generate doing
what was asked, `--help`, and plugins in one step.

Two real `python train.py` runs with the shipped defaults (a few steps of the default model on the embedded
corpus): one on a pseudo-terminal, one into a pipe. The other tests reuse the pipe run's checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, compose, run_cli

STEPS, VAL_EVERY = 6, 3
SHORT = [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={VAL_EVERY}", "sample.max_new_tokens=20"]
# third-party lines a run must not show on the console (issue 14); real warnings stay visible
NOISE = [
    "litlogger",
    "Trainer already configured with model summary callbacks",
    "LeafSpec",
    "Skipping import of cpp extensions",
    "Detected no triton",
    "setup plugin",
    "FLOPs",
    "Epoch 0/",
    "GPU available",
]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_on_pty(args: list[str], cols: int = 120, timeout: float = 400, env: dict | None = None) -> tuple[int, str]:
    """Run `python ARGS` with stdout and stderr on a pseudo-terminal of `cols` columns; (status, raw output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    p = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env or _env(), stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
        else:
            os.killpg(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{args} did not finish in {timeout}s")
    finally:
        os.close(master)
    return p.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def pipe_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "run"
    r = run_cli(["train.py", *SHORT, f"hydra.run.dir={d}"], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r


@pytest.fixture(scope="module")
def pty_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pty") / "run"
    status, out = run_on_pty(["train.py", *SHORT, f"hydra.run.dir={d}"])
    assert status == 0, out[-3000:]
    return d, out


def _summary(text: str) -> dict[str, str]:
    """`key: value` lines after `=== run summary ===`."""
    tail = text.split("=== run summary ===", 1)[1]
    rows = {}
    for line in tail.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith(" "):
            rows[key.strip()] = value.strip()
    return rows


# ---- the console ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_on_a_terminal_shows_steps_and_nothing_glued_or_noisy(pty_run):
    run_dir, out = pty_run
    lines = out.replace("\r\n", "\n").split("\n")
    # the bar redraws in place (\r) with steps of max_steps, loss, tokens/s and an ETA
    bar = [seg for line in lines for seg in line.split("\r") if seg.startswith("step ")]
    final = [b for b in bar if b.startswith(f"step {STEPS}/{STEPS} ")]
    assert final, out[-2000:]
    assert re.search(r"loss \d+\.\d{3}", final[-1]) and "tok/s" in final[-1] and "ETA" in final[-1], final[-1]
    assert "\r" in out  # redrawn, not one line per step
    # Lightning's stop message on a line of its own: nothing of the bar before it on that line
    stop = [line for line in lines if "`Trainer.fit` stopped" in line]
    assert len(stop) == 1 and "step " not in stop[0].split("`Trainer.fit`")[0], stop
    assert lines[lines.index(stop[0]) - 1].startswith(f"step {STEPS}/{STEPS}: val_loss")  # after the last val line
    # validation results: each takes the bar's line (the bar is blanked out, then redrawn below)
    shown = [line.split("\r")[-1] for line in lines]  # what stays visible of each terminal line
    val = rf"step ({VAL_EVERY}|{STEPS})/{STEPS}: val_loss \d+\.\d{{4}}, \d+\.\d{{3}} bits/byte"
    assert len([x for x in shown if re.fullmatch(val, x)]) == 2, shown
    kept = [x for x in shown if x.startswith("step ") and "ETA" in x]
    assert len(kept) == 1 and kept[0].startswith(f"step {STEPS}/{STEPS} "), kept  # only the final bar stays
    for noise in NOISE:
        assert noise not in out, noise
    # a real warning stays visible: the default 100-step warmup covers this 6-step run
    assert "scheduler.warmup_steps=100 covers all of this 6-step run" in out
    # every bar line fits the 120-column terminal
    assert all(len(seg) <= 120 for seg in bar)


@pytest.mark.slow
def test_console_into_a_pipe_is_plain_lines_with_a_summary(pipe_run):
    run_dir, r = pipe_run
    out = r.stdout + r.stderr
    assert "\r" not in out and "\x1b[" not in out  # no redraws, no colour codes in a log file
    steps = re.findall(rf"^step (\d+)/{STEPS} \| loss", r.stdout, flags=re.M)
    assert steps and steps[-1] == str(STEPS)
    for noise in NOISE:
        assert noise not in out, noise
    s = _summary(r.stdout)
    assert s["run dir"] == str(run_dir)
    best, last = Path(s["best ckpt"]), Path(s["last ckpt"])
    assert best == run_dir / "checkpoints" / "best.ckpt" and best.is_file()
    assert last == run_dir / "checkpoints" / "last.ckpt" and last.is_file()
    # best val loss and bits/byte: the checkpoint callback's score and the run's bytes per token
    ck = torch.load(best, map_location="cpu", weights_only=True)
    score = min(float(v["best_model_score"]) for k, v in ck["callbacks"].items() if "ModelCheckpoint" in k)
    loss, bpb = map(float, re.fullmatch(r"loss (\S+), (\S+) bits/byte", s["best val"]).groups())
    assert loss == pytest.approx(score, abs=1e-4)
    assert bpb == pytest.approx(score / math.log(2) / ck["hyper_parameters"]["bytes_per_token"], abs=1e-3)
    m = re.fullmatch(rf"{STEPS}/{STEPS} in (\d+):(\d\d) \(([\d,]+) tok/s\)", s["steps"])
    assert m, s["steps"]
    seconds = int(m[1]) * 60 + int(m[2])
    tokens = STEPS * 12 * 64  # data.batch_size x block_size per step (the defaults)
    assert int(m[3].replace(",", "")) == pytest.approx(tokens / max(seconds, 1), rel=0.5)
    assert f"python -m microgpt.generate ckpt={best}" in s["next"]


@pytest.mark.slow
def test_one_parameter_count_everywhere(pipe_run):
    run_dir, r = pipe_run
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = {v.data_ptr(): v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    n = sum(v.numel() for v in tensors.values())  # tied weights once
    assert f"model: {n:,} parameters" in r.stdout
    assert f"total {n:,} parameters ({n:,} trainable, 0 frozen)" in r.stdout


@pytest.mark.slow
def test_train_log_has_the_losses(pipe_run):
    run_dir, _ = pipe_run
    log = (run_dir / "train.log").read_text()
    train_steps = re.findall(rf"step (\d+)/{STEPS} train_loss \d+\.\d+ lr \S+", log)
    # trainer.log_every_n_steps=10 > 6 steps: the last step is logged
    assert str(STEPS) in train_steps
    val_steps = re.findall(rf"step (\d+)/{STEPS} val_loss \d+\.\d+ val_ppl \S+ val_bpb \S+", log)
    assert val_steps == [str(VAL_EVERY), str(STEPS)]
    assert "=== run summary ===" in log
    assert "GPU available" in log  # routed to the file, not dropped


def test_quiet_keeps_known_chatter_off_and_real_warnings_on():
    import logging
    import warnings

    from microgpt.console import quiet

    quiet()
    assert not logging.getLogger("alembic.runtime.plugins").isEnabledFor(logging.INFO)  # Optuna's storage
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name in ("torchao", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("torchao").warning(
            "Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1"
        )
        logging.getLogger("torchao").warning("a real torchao problem")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging ...")
    finally:
        for name in ("torchao", "lightning.pytorch.utilities.rank_zero"):
            logging.getLogger(name).removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a real torchao problem"]
    with warnings.catch_warnings(record=True) as caught:
        quiet()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a real problem"]


def test_warmup_as_a_fraction_and_a_warning_when_it_covers_the_run(caplog):
    from microgpt.console import warmup_steps

    with caplog.at_level("WARNING", logger="microgpt"):
        assert warmup_steps(0.1, 2000) == 200
        assert warmup_steps(100, 2000) == 100
        assert not caplog.records
        assert warmup_steps(100, 50) == 100
    assert "covers all of this 50-step run" in caplog.text


# ---- evaluate and generate --------------------------------------------------------------------------------


def _held_out(tok, path: Path) -> str:
    """A stdlib module's source limited to the model's characters (an independent piece of text)."""
    import textwrap as tw

    src = Path(tw.__file__).read_text(encoding="utf-8")
    text = "".join(c for c in src if c in tok.chars)
    path.write_text(text, encoding="utf-8")
    return text


@pytest.mark.slow
def test_evaluate_scores_a_given_file_whole_and_says_how_many_tokens(pipe_run, tmp_path):
    import microgpt

    run_dir, _ = pipe_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    model, tok = microgpt.load(ckpt)
    f = tmp_path / "held_out.txt"
    text = _held_out(tok, f)
    r = run_cli(["-m", "microgpt.evaluate", f"ckpt={ckpt}", "data=text", f"data.path={f}"], timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["split"] == "all" and got["tokens"] == len(text) - 1  # char model: every character after the first
    assert f"scored {len(text) - 1:,} tokens, the whole text of {f}" in r.stderr
    # an explicit loop: each next character predicted from the block it is in
    ids = torch.tensor([tok.chars.index(c) for c in text])
    T, nll = model.config.block_size, 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, T):
            x, y = ids[s : s + T], ids[s + 1 : s + T + 1]
            x = x[: len(y)]
            nll += torch.nn.functional.cross_entropy(model(x[None])[0], y, reduction="sum").item()
    assert got["val_loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-4)


@pytest.mark.slow
def test_evaluate_without_data_uses_the_checkpoints_own_data(pipe_run):
    from microgpt.data.sources import stdlib_source

    run_dir, _ = pipe_run
    r = run_cli(["-m", "microgpt.evaluate", f"ckpt={run_dir}", "max_batches=2", "batch_size=4"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["split"] == "val" and got["source"] == "stdlib"
    assert got["tokens"] == 2 * 4 * 64  # two batches of four 64-token blocks of the run's (stdlib) val split
    n = len(stdlib_source(max_bytes=4_000_000))
    assert n - int(n * 0.9) > got["tokens"]


class Scripted(torch.nn.Module):
    """A stand-in model that "generates" a fixed token sequence."""

    def __init__(self, ids: list[int]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = ids
        self.pulled = 0

    def generate_stream(self, idx, max_new_tokens, **kw):
        for t in self.ids[:max_new_tokens]:
            self.pulled += 1
            yield torch.tensor([[t]])


def _bpe_with_eot():
    from microgpt.data.tokenizers import BPETokenizer

    tok = BPETokenizer.fit("hello world, hello there. " * 50, vocab_size=300)
    tok.tok.add_special_tokens(["<|endoftext|>"])  # as GPT-2's tokenizer has it
    return BPETokenizer(tok.tok)


def test_generation_stops_at_the_end_of_text_token():
    import io

    from microgpt.generate import stream_text
    from microgpt.stopping import end_of_text_id

    tok = _bpe_with_eot()
    eot = tok.tok.token_to_id("<|endoftext|>")
    assert end_of_text_id(tok) == eot
    before, after = tok.encode("hello world"), tok.encode(" never shown")
    model = Scripted([*before, eot, *after])
    out = io.StringIO()
    text = stream_text(model, tok, "", 100, out=out)
    assert text == "hello world" and out.getvalue() == "hello world\n"
    assert model.pulled == len(before) + 1  # nothing generated after the end-of-text token


def test_generation_stops_before_a_stop_string_and_never_prints_past_it():
    import io

    from microgpt.data.tokenizers import CharTokenizer
    from microgpt.generate import stream_text
    from microgpt.stopping import Stopper, stop_strings

    tok = CharTokenizer("abc\nXYZ")
    model = Scripted(tok.encode("abc\nab\n\nXYZ"))
    out = io.StringIO()
    stopper = Stopper(None, stop_strings("\\n\\n"))  # as typed on a shell: stop='\n\n'
    text = stream_text(model, tok, "", 100, out=out, stopper=stopper)
    assert text == "abc\nab" and out.getvalue() == "abc\nab\n" and stopper.reason == "stop string"
    assert stop_strings(None) == [] and stop_strings(["x", "yz"]) == ["x", "yz"]


@pytest.mark.slow
def test_generate_cli_reports_tokens_per_second_with_verbose(pipe_run):
    run_dir, _ = pipe_run
    r = run_cli(
        ["-m", "microgpt.generate", f"ckpt={run_dir}", "max_new_tokens=30", "verbose=true", "stop=QQQQ"], timeout=200
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"\[(\d+) tokens in [\d.]+s, ([\d.]+) tokens/s; stopped at (.+)\]", r.stderr)
    assert m and float(m[2]) > 0, r.stderr
    assert (m[1], m[3]) == ("30", "max_new_tokens") or m[3] == "stop string"
    assert "QQQQ" not in r.stdout


def test_a_qat_artifact_is_refused_with_what_to_run_instead(tmp_path):
    import microgpt
    from microgpt.errors import CheckpointError
    from microgpt.io.checkpoint import read_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    q = run / "checkpoints" / "quantized.pt"
    torch.save({"format": "microgpt-qat/1"}, q)
    # where a checkpoint is needed (init_from, a teacher, conversion): what reads it, and the checkpoint to pass
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(q)
    msg = str(e.value)
    assert f"ckpt={run}" in msg and "microgpt.load" in msg
    # microgpt.load reads quantized artifacts: this damaged one is refused saying what it lacks
    with pytest.raises(CheckpointError, match="lacks its model and state_dict record"):
        microgpt.load(q)


def test_fine_tuning_a_char_model_on_new_characters_gives_advice_that_applies(tmp_path):
    from microgpt.data import TokenDataModule
    from microgpt.data.tokenizers import CharTokenizer
    from microgpt.errors import DataError

    f = tmp_path / "new.txt"
    f.write_text("abcé—" * 200, encoding="utf-8")
    dm = TokenDataModule(source="text", path=str(f), block_size=8, tokenizer_obj=CharTokenizer("abc\n"))
    with pytest.raises(DataError) as e:
        dm.setup()
    msg = str(e.value)
    assert "2 character(s) outside the model's char vocabulary of 4" in msg and "'é'" in msg and "'—'" in msg
    assert "remove or replace them" in msg
    assert "use data.tokenizer=byte (or bpe)" not in msg  # a setting the fine-tune would ignore
    assert "needs a char vocab" not in msg


# ---- help ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, must, must_not",
    [
        (["train.py"], ["Train a small GPT", "model: micro, mini, nano, small", "Examples", "warmup_steps: 100"],
         ["model: base", "data: base", "Powered by Hydra"]),
        (["-m", "microgpt.generate"], ["Sample text", "stop: null", "verbose: false", "Examples"],
         ["strategy:", "model: micro", "== Config groups"]),
        (["-m", "microgpt.evaluate"], ["Score a trained model", "split: null", "data=text data.path=held_out.txt"],
         ["strategy:", "model: micro"]),
        (["-m", "microgpt.export"], ["Write a trained model", "format: safetensors", "Examples"], ["strategy:"]),
        (["-m", "microgpt.consolidate"], ["Turn a sharded checkpoint", "out    the file", "example:"], []),
        (["-m", "microgpt.report"], ["Compare models", "speed_repeats", "data.path=held_out.txt"], []),
    ],
)  # fmt: skip
def test_help_says_what_a_command_does_with_its_keys_and_an_example(args, must, must_not):
    r = run_cli([*args, "--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    for s in must:
        assert s in r.stdout, s
    for s in [*must_not, "../shared", "shared/data"]:  # shared-guard: help must not name the developers' folder
        assert s not in r.stdout, s


def test_make_help_has_colour_only_on_a_terminal():
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    plain = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "\x1b[" not in plain and re.search(r"^  train\s+train the default model", plain, re.M)
    status, tty = run_on_pty(["-c", "import subprocess; subprocess.run(['make', '-s', 'help'])"])
    assert status == 0 and "\x1b[36mtrain" in tty


# ---- report ----------------------------------------------------------------------------------------------------


def _fake_report(n: int = 3) -> dict:
    rows = []
    for i in range(n):
        rows.append({
            "label": "teacher" if i == 0 else f"runs/student-{i}/last", "teacher": i == 0, "params": 800_000 // (i + 1),
            "fp32_bytes": 3_300_000 // (i + 1), "bf16_bytes": 1_650_000 // (i + 1), "val_loss": 1.5 + 0.001 * i,
            "bits_per_byte": 2.1, "tokens_per_s": 1000.0, "quant_bytes": 900_000 // (i + 1), "quant_kind": "int8",
            "quant_val_loss": 1.5 + 0.001 * i, "quant_tokens_per_s": 990.0, "quant_smaller_than_teacher": 3.6 * (i + 1),
            "loss_vs_teacher": 1.0, "quant_loss_vs_teacher": 1.0, "quant_bits_per_byte": 2.1,
        })  # fmt: skip
    return {"models": rows, "data": {"path": "held_out.txt", "source": "text", "block_size": 64}, "json": "r.json"}


@pytest.mark.parametrize("cols", [60, 90, 200])
def test_report_table_fits_the_terminal(cols, monkeypatch):
    import io

    from microgpt.report import print_table

    monkeypatch.setenv("COLUMNS", str(cols))
    buf = io.StringIO()
    print_table(_fake_report(), file=buf)
    lines = buf.getvalue().splitlines()
    assert max(len(x) for x in lines) <= cols
    assert "teacher (teacher)" not in buf.getvalue() and "val loss" in buf.getvalue()
    if cols >= 200:
        assert "bf16" in buf.getvalue() and "narrow terminal" not in buf.getvalue()
    else:
        assert "narrow terminal" in buf.getvalue()


def test_report_tokens_per_second_is_a_median_after_a_warm_up(monkeypatch):
    import microgpt.report as report

    calls = []

    class M:
        def generate(self, prompt, n, temperature):
            calls.append(n)
            return torch.zeros(1, prompt.shape[1] + n, dtype=torch.long)

    clock = iter([0.0, 1.0, 10.0, 11.0, 20.0, 30.0, 40.0, 41.0, 50.0, 51.0])  # timed runs: 1s, 1s, 10s, 1s, 1s
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    rate = report.tokens_per_second(M(), torch.zeros(1, 4, dtype=torch.long), 100, repeats=5)
    assert rate == 100.0  # the 10-second outlier does not move the median
    assert calls == [100] * 6  # one full-length warm-up, untimed, then five timed runs


def test_report_png_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from microgpt.report import place_labels

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    pts = [(1e6, 1.50, "teacher", "k"), (1e6, 1.501, "student", "r"), (1.02e6, 1.502, "distilled", "b"),
           (1.01e6, 1.5005, "qat", "g")]  # fmt: skip
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    ax.set_xscale("log")
    fig.tight_layout()
    texts = place_labels(fig, ax, pts)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    assert sorted(t.get_text() for t in texts) == sorted(p[2] for p in pts)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)


# ---- plugins in one step -----------------------------------------------------------------------------------

RELU3 = """
import torch
from torch import nn
from microgpt.registry import MLP

@MLP.register("relu3")
class ReLU2(nn.Module):
    def __init__(self, cfg, **options):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)) ** 3)
"""
RELU3_YAML = """# @package _global_
plugins:
  relu3:
    note: a cubed-ReLU MLP; select it with model.mlp=relu3
"""
SMOOTH = """
import lightning as L
import torch.nn.functional as F


def smoothed(module, batch):
    x, y = batch
    logits = module(x)
    return {"loss": F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), label_smoothing=0.1)}


class LabelSmooth(L.Callback):
    def prepare(self, module, datamodule):
        module.objective = smoothed
"""
SMOOTH_YAML = """# @package _global_
plugins:
  labelsmooth: {}
callbacks:
  labelsmooth:
    _target_: microgpt_plugins.labelsmooth.LabelSmooth
"""


@pytest.fixture
def user_plugins(tmp_path, monkeypatch):
    d = tmp_path / "myplugins"
    for name, code, conf in (("relu3", RELU3, RELU3_YAML), ("labelsmooth", SMOOTH, SMOOTH_YAML)):
        (d / name).mkdir(parents=True)
        (d / name / "__init__.py").write_text(textwrap.dedent(code))
        (d / name / "plugin.yaml").write_text(conf)
    monkeypatch.setenv("MICROGPT_PLUGIN_PATH", str(d))
    yield d
    for name in ("relu3", "labelsmooth"):
        sys.modules.pop(f"microgpt_plugins.{name}", None)
    from microgpt.registry import MLP

    MLP._entries.pop("relu3", None)


def test_a_plugin_yaml_in_its_folder_is_found_through_the_plugin_path_alone(user_plugins):
    cfg = compose(["+plugin=[relu3,labelsmooth]", "model.mlp=relu3"], output_dir="/tmp/unused")
    assert cfg.plugins.relu3.note.startswith("a cubed-ReLU MLP")
    assert cfg.callbacks.labelsmooth._target_ == "microgpt_plugins.labelsmooth.LabelSmooth"
    r = run_cli(["train.py", "--help"], env={"MICROGPT_PLUGIN_PATH": str(user_plugins)}, timeout=120)
    assert re.search(r"^plugin: .*\blabelsmooth\b.*\brelu3\b", r.stdout, re.M), r.stdout[:2000]


def test_an_unknown_component_names_the_plugin_that_registers_it(user_plugins):
    from microgpt.errors import ConfigError
    from microgpt.registry import MLP

    with pytest.raises(ConfigError) as e:
        MLP.get("relu3")
    assert "unknown mlp 'relu3'" in str(e.value) and "+plugin=relu3" in str(e.value)
    with pytest.raises(ConfigError) as e:
        MLP.get("nothing_registers_this")
    assert "needs +plugin=NAME" in str(e.value)


@pytest.mark.slow
def test_a_checkpoint_records_only_the_plugins_its_model_needs(user_plugins, tmp_path):
    import microgpt
    from microgpt.train import run

    out = tmp_path / "run"
    cfg = compose(
        ["+plugin=[relu3,labelsmooth]", "model=nano", "model.mlp=relu3", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "data.source_options.max_bytes=200000", "print_sample=false",
         "callbacks.progress_bar=null", "logger=none", "callbacks.lr_monitor=null"],
        output_dir=out,
    )  # fmt: skip
    result = run(cfg)
    assert result["module"].objective.__name__ == "smoothed"  # the objective plugin did train
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ck["hyper_parameters"]["plugins"]) == {"relu3"}
    # the training-only plugin gone: the checkpoint still loads (with the component plugin on the path)
    shutil.rmtree(user_plugins / "labelsmooth")
    sys.modules.pop("microgpt_plugins.labelsmooth", None)
    model, _ = microgpt.load(out / "checkpoints" / "last.ckpt")
    assert type(model.blocks[0].mlp).__name__ == "ReLU2"


@pytest.mark.slow
def test_a_plugin_that_fails_to_import_leaves_no_run_dir(tmp_path):
    d = tmp_path / "myplugins" / "broken"
    d.mkdir(parents=True)
    (d / "__init__.py").write_text("import a_module_that_is_not_installed_xyz\n")
    (d / "plugin.yaml").write_text("# @package _global_\nplugins:\n  broken: {}\n")
    run_dir = tmp_path / "run"
    r = run_cli(
        ["train.py", "+plugin=broken", f"hydra.run.dir={run_dir}"],
        env={"MICROGPT_PLUGIN_PATH": str(tmp_path / "myplugins")},
        timeout=200,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: a plugin failed to import") and "a_module_that_is_not_installed_xyz" in err[-1]
    assert "Traceback" not in r.stderr
    assert not run_dir.exists()


def test_conf_has_no_base_presets_as_choices():
    assert not (CONF / "model" / "base.yaml").exists() and not (CONF / "data" / "base.yaml").exists()
