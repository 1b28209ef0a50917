"""Compare models for compression: size, quality and speed in one table, a PNG and a JSON.

    python -m microgpt.report teacher=runs/teacher model=runs/student model=runs/distilled/checkpoints/best.ckpt \\
        model=runs/qat/checkpoints/quantized.pt data=text data.path=held_out.txt out=report

For every model: parameters; bytes on disk of the fp32 and bf16 exports (`microgpt.export
format=safetensors`) and of its quantized artifact (the qat plugin's `quantized.pt` when the run wrote one
or the model was trained with qat, otherwise `microgpt.export format=int8`); val loss and bits per byte
on the very same val batches; generation speed (tokens/s, batch 1, greedy, KV cache, on CPU; the median
of `speed_repeats` timed runs after a warm-up one). Prints a table that fits the terminal (narrow
terminals drop the least important columns; COLUMNS= sets the width where stdout is not a terminal), writes OUT/report.json and OUT/report.png (size vs val loss, the teacher marked), and prints
a one-line JSON summary last.

Options (key=value; `model=` may be given several times):
  model        a model: a .ckpt, a run directory, an exported or HF GPT-2 directory, or a qat artifact (.pt)
  teacher      the reference model: marked in the plot; the table gives sizes and losses relative to it
  labels       comma-separated names for the models in the order given (teacher included); default: from paths
  out          directory for report.json and report.png (default: report)
  png          false: skip the plot
  batch_size   val batch size (default 16)
  max_batches  evaluate this many val batches (default: null = the whole val split)
  block_size   evaluation context (default: the smallest block_size among the models, so that models with
               the same tokenizer see identical batches)
  gen_tokens   tokens generated for the speed measurement (default 128; 0 skips it)
  speed_repeats  timed generations per model after one warm-up; their median is reported (default 5)
  device       where val loss is computed (default cpu); speed is always measured on CPU
  data...      the text, as for train.py: data=text data.path=FILE (default: the text recorded in the
               first checkpoint)
A missing or unreadable model is `error: ...` on one line and exit status 2, before anything is computed.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microgpt.errors import CheckpointError, ConfigError, first_line

OPTIONS: dict[str, Any] = {
    "labels": None,
    "out": "report",
    "png": True,
    "batch_size": 16,
    "max_batches": None,
    "block_size": None,
    "gen_tokens": 128,
    "speed_repeats": 5,
    "device": "cpu",
}
DATA_PREFIXES = ("data", "paths", "seed")


@dataclass
class Entry:
    """One model to compare: where it is and how it is read."""

    path: str
    teacher: bool = False
    label: str = ""
    artifact: bool = False  # a plugin's quantized artifact (qat's quantized.pt), not a checkpoint
    resolved: Path | None = None
    row: dict[str, Any] = field(default_factory=dict)


# ---- arguments ----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[list[Entry], dict[str, Any], list[str]]:
    """key=value arguments -> (models in order, options, Hydra overrides for the data)."""
    from microgpt.keyvalue import KeyValueCommand

    command = KeyValueCommand(
        "python -m microgpt.report", __doc__, OPTIONS, repeatable=("model", "teacher"), overrides=DATA_PREFIXES
    )
    args = command.parse(argv)
    opts, overrides = args.options, args.overrides
    labels = next((a.partition("=")[2] for a in argv if a.startswith("labels=")), None)
    opts["labels"] = labels if labels is not None else opts["labels"]  # names stay strings ("1,2")
    entries: list[Entry] = []
    for key, val in args.repeated:
        if not val:
            raise ConfigError(f"{key}= needs a path")
        if key == "teacher" and any(e.teacher for e in entries):
            raise ConfigError("teacher= is given twice; mark one model as the teacher")
        entries.append(Entry(val, teacher=key == "teacher"))
    if not entries:
        raise ConfigError("nothing to compare: pass model=PATH (several times) and optionally teacher=PATH")
    for k in ("batch_size", "gen_tokens", "speed_repeats"):
        low = 0 if k == "gen_tokens" else 1
        if not isinstance(opts[k], int) or isinstance(opts[k], bool) or opts[k] < low:
            raise ConfigError(f"{k} must be an integer >= {low}, got {opts[k]!r}")
    for k in ("max_batches", "block_size"):
        if opts[k] is not None and (not isinstance(opts[k], int) or isinstance(opts[k], bool) or opts[k] < 1):
            raise ConfigError(f"{k} must be an integer >= 1 or null, got {opts[k]!r}")
    if opts["labels"]:
        labels = [s.strip() for s in str(opts["labels"]).split(",")]
        if len(labels) != len(entries) or not all(labels):
            raise ConfigError(f"labels= names {len(labels)} models but {len(entries)} are given; one name each")
        for e, name in zip(entries, labels):
            e.label = name
    return entries, opts, overrides


def _default_label(p: Path) -> str:
    if p.parent.name == "checkpoints":  # RUN/checkpoints/last.ckpt -> RUN/last
        return f"{p.parent.parent.name}/{p.stem}"
    return p.stem if p.is_file() else p.name


def resolve(entries: list[Entry]) -> None:
    """Check every path before any work (a bad one is a one-line error), and name the models."""
    from microgpt.io.checkpoint import resolve_checkpoint
    from microgpt.plugins import artifact_reader

    for e in entries:
        p = Path(e.path).expanduser()
        if p.suffix not in ("", ".ckpt") and artifact_reader(p) is not None:
            if not p.is_file():
                raise CheckpointError(f"quantized model {p} does not exist; pass a quantized artifact (quantized.pt)")
            e.artifact, e.resolved = True, p
        else:
            e.resolved = resolve_checkpoint(e.path)
        e.label = e.label or _default_label(p)
    seen: dict[str, int] = {}
    for e in entries:  # unique labels: the plot and the JSON key on them
        n = seen.get(e.label, 0)
        seen[e.label] = n + 1
        if n:
            e.label = f"{e.label} ({n + 1})"


# ---- loading -------------------------------------------------------------------------------------------


def load_entry(e: Entry) -> tuple[Any, Any, dict[str, Any]]:
    """(model on CPU in eval mode, tokenizer, checkpoint record: plugins, data, qat artifact beside it)."""
    from microgpt.data.tokenizers import tokenizer_from_dict
    from microgpt.io.checkpoint import model_from_checkpoint, read_checkpoint
    from microgpt.plugins import artifact_reader, quantizer

    if e.artifact:
        model, tok = artifact_reader(e.resolved).load_quantized(e.resolved)
        if tok is None:
            raise CheckpointError(f"{e.resolved} holds no tokenizer; convert a checkpoint written by train.py")
        return model, tok, {"plugins": {}, "data": {}, "artifact": e.resolved}
    ck = read_checkpoint(e.resolved)
    tok_rec = ck["hyper_parameters"].get("tokenizer")
    if tok_rec is None:
        raise CheckpointError(f"{e.path} has no tokenizer; it was not written by microgpt's train.py")
    model = model_from_checkpoint(ck).eval()
    q = quantizer(model)  # the plugin whose converter gives this model a quantized artifact, if any
    sibling = Path(e.resolved).parent / q.QUANTIZED_ARTIFACT if q is not None and Path(e.resolved).is_file() else None
    info = {
        "plugins": dict(ck["hyper_parameters"].get("plugins") or {}),
        "data": dict(ck.get("TokenDataModule") or {}),
        "artifact": sibling if sibling is not None and sibling.is_file() else None,
    }
    return model, tokenizer_from_dict(tok_rec), info


# ---- measurements --------------------------------------------------------------------------------------


def count_params(model) -> int:
    """Parameters, each shared tensor (tied head, shared blocks) once."""
    return sum(p.numel() for p in model.parameters())


def _dir_bytes(d: Path) -> int:
    return sum(os.path.getsize(f) for f in d.iterdir() if f.is_file())


def _bake(model):
    """A copy with the plugins' converters folded into plain weights where they can be (pruning masks)."""
    from microgpt.plugins import bake

    return bake(copy.deepcopy(model))


def float_sizes(model, tok, plugins: dict[str, Any], tmp: Path) -> dict[str, int]:
    """Bytes on disk of the fp32 and bf16 exports (`microgpt.export format=safetensors`: weights + microgpt.json)."""
    from microgpt.io.export import write_safetensors

    out = {}
    for dtype, key in (("float32", "fp32_bytes"), ("bfloat16", "bf16_bytes")):
        d = tmp / dtype
        d.mkdir()
        write_safetensors(model, tok, d, plugins, dtype)
        out[key] = _dir_bytes(d)
    return out


def quantized(model, tok, info: dict[str, Any], tmp: Path) -> tuple[int | None, str | None, Any]:
    """(bytes on disk, kind, the quantized model as it loads back) of the model's quantized artifact:
    its plugin's artifact when there is one (or written now, `write_quantized`), otherwise
    `microgpt.export format=int8` (every Linear and the embedding int8 per row). (None, None, None) when
    the model's converters have no quantized form."""
    from microgpt.io.checkpoint import load
    from microgpt.io.export import write_int8
    from microgpt.plugins import artifact_reader, converter_owners, quantizer

    plugins = info.get("plugins") or {}
    if info.get("artifact") is not None:
        reader = artifact_reader(info["artifact"])
        qmodel, _ = reader.load_quantized(info["artifact"])
        return os.path.getsize(info["artifact"]), reader.describe_quantized(qmodel), qmodel
    plain = _bake(model)
    if not plain.config.converters:
        d = tmp / "int8"
        d.mkdir()
        write_int8(plain, tok, d, plugins)
        return _dir_bytes(d), "int8", load(d)[0]
    q = quantizer(plain)
    # only when the quantizing plugin's converter is all that is left (its artifact holds nothing else)
    if q is not None and len(plain.config.converters) == 1 and list(converter_owners(plain)) == [q]:
        path = tmp / q.QUANTIZED_ARTIFACT
        r = q.write_quantized(plain, path, tok.to_dict(), plugins)
        return r["bytes"], r["kind"], q.load_quantized(path)[0]
    return None, None, None


def measure(model, batches: list, bytes_per_token: float, prompt: torch.Tensor, opts: dict[str, Any]) -> dict:
    """val loss and bits per byte on `batches` (on opts['device']), then tokens/s on CPU."""
    from microgpt.evaluate import evaluate_model

    ev = evaluate_model(model.to(torch.device(opts["device"])), batches, bytes_per_token)
    model.to("cpu")
    return {
        "val_loss": ev["val_loss"],
        "bits_per_byte": ev["bits_per_byte"],
        "val_tokens": ev["tokens"],
        "tokens_per_s": tokens_per_second(model, prompt, opts["gen_tokens"], opts.get("speed_repeats", 5)),
    }


def _batches_for(dm, batch_size: int, max_batches: int | None) -> list:
    return list(itertools.islice(dm.full_val_batches(batch_size), max_batches))


@torch.no_grad()
def tokens_per_second(model, prompt: torch.Tensor, n: int, repeats: int = 5) -> float | None:
    """Greedy generation of n tokens after `prompt` (1, T) on CPU, KV cache on: one full-length warm-up
    (allocations, caches), then the median of `repeats` timed runs (one run alone is noise on a busy CPU)."""
    if n <= 0:
        return None
    model.generate(prompt, n, temperature=0.0)
    rates = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = model.generate(prompt, n, temperature=0.0)
        rates.append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(rates)


# ---- the report ----------------------------------------------------------------------------------------


def _data_overrides(overrides: list[str], infos: list[dict[str, Any]]) -> list[str]:
    if any(o.lstrip("+~").startswith("data") for o in overrides):
        return overrides
    for info in infos:  # the text a checkpoint recorded
        src, path = info["data"].get("source"), info["data"].get("path")
        if src == "text" and path and Path(path).exists():
            return [*overrides, "data=text", f"data.path={path}"]
        if src in ("stdlib", "shakespeare"):
            return [*overrides, f"data={src}"]
    raise ConfigError("the models do not record their text; pass data=text data.path=FILE")


def _data_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from microgpt.cli import CONF_DIR

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="evaluate", overrides=["ckpt=unused", *overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"bad data setting: {first_line(e)}") from None


def build_report(argv: list[str]) -> dict[str, Any]:
    """Measure every model; returns the report (what report.json holds)."""
    from microgpt.plugins import artifact_reader
    from microgpt.training.train import _instantiate

    entries, opts, overrides = parse(argv)
    resolve(entries)
    if opts["png"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("the plot needs matplotlib (pip install matplotlib), or pass png=false") from None
    out_dir = Path(str(opts["out"])).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={out_dir} is a file; pass a directory")
    from microgpt.io.atomic import atomic_write, check_writable_dir

    check_writable_dir(out_dir)  # before minutes of evaluation, not after

    loaded = [load_entry(e) for e in entries]
    block = opts["block_size"] or min(m.config.block_size for m, _, _ in loaded)
    too_long = [
        e.label
        for e, (m, _, _) in zip(entries, loaded)
        if m.config.position == "learned" and block > m.config.block_size
    ]
    if too_long:
        raise ConfigError(f"block_size={block} exceeds the learned positions of {', '.join(too_long)}; lower it")
    cfg = _data_config(_data_overrides(overrides, [i for _, _, i in loaded]))
    data_by_tok: dict[str, tuple[list, float, list[int]]] = {}
    rows = []
    for e, (model, tok, info) in zip(entries, loaded):
        key = json.dumps(tok.to_dict(), sort_keys=True)
        if key not in data_by_tok:
            dm = _instantiate(cfg.data, "data", tokenizer_obj=tok, block_size=block)
            dm.setup("validate")
            batches = _batches_for(dm, opts["batch_size"], opts["max_batches"])
            data_by_tok[key] = (batches, dm.bytes_per_token, [int(t) for t in dm.val_tokens[: min(16, block)]])
        batches, bpt, prompt_ids = data_by_tok[key]
        if model.config.vocab_size < tok.vocab_size:
            raise ConfigError(f"{e.label}: vocab_size {model.config.vocab_size} < its tokenizer's {tok.vocab_size}")
        prompt = torch.tensor([prompt_ids], dtype=torch.long)
        row: dict[str, Any] = {
            "label": e.label,
            "path": str(e.resolved),
            "teacher": e.teacher,
            "params": count_params(model),
            "n_layer": model.config.n_layer,
            "n_embd": model.config.n_embd,
            "converters": [c.get("name") for c in model.config.converters],
            "tokenizer": tok.name,
        }
        with tempfile.TemporaryDirectory(prefix="microgpt-report-") as tmp:
            if e.artifact:  # the model *is* the quantized artifact
                row.update(fp32_bytes=None, bf16_bytes=None, quant_bytes=os.path.getsize(e.resolved))
                row["quant_kind"], qmodel = artifact_reader(e.resolved).describe_quantized(model), None
            else:
                row.update(float_sizes(model, tok, info["plugins"], Path(tmp)))
                row["quant_bytes"], row["quant_kind"], qmodel = quantized(model, tok, info, Path(tmp))
            row.update(measure(model, batches, bpt, prompt, opts))
            if e.artifact:
                row.update({f"quant_{k}": row[k] for k in ("val_loss", "bits_per_byte", "tokens_per_s")})
            elif qmodel is not None:
                row.update({f"quant_{k}": v for k, v in measure(qmodel, batches, bpt, prompt, opts).items()})
            else:
                row.update(quant_val_loss=None, quant_bits_per_byte=None, quant_tokens_per_s=None)
        del model, qmodel
        rows.append(row)

    teacher = next((r for r in rows if r["teacher"]), None)
    for r in rows:  # against the teacher's fp32 export and float val loss
        ref = teacher is not None and teacher["fp32_bytes"] is not None
        r["fp32_smaller_than_teacher"] = teacher["fp32_bytes"] / r["fp32_bytes"] if ref and r["fp32_bytes"] else None
        r["quant_smaller_than_teacher"] = teacher["fp32_bytes"] / r["quant_bytes"] if ref and r["quant_bytes"] else None
        r["loss_vs_teacher"] = r["val_loss"] / teacher["val_loss"] if ref else None
        r["quant_loss_vs_teacher"] = r["quant_val_loss"] / teacher["val_loss"] if ref and r["quant_val_loss"] else None
    data = cfg.data
    report = {
        "models": rows,
        "teacher": teacher["label"] if teacher else None,
        "data": {"source": data.get("source"), "path": data.get("path"), "block_size": block},
        "batch_size": opts["batch_size"],
        "max_batches": opts["max_batches"],
        "gen_tokens": opts["gen_tokens"],
        "speed_repeats": opts["speed_repeats"],
        "threads": torch.get_num_threads(),
        "device": opts["device"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report["json"] = str(out_dir / "report.json")
    report["png"] = str(out_dir / "report.png") if opts["png"] else None
    if opts["png"]:
        plot(report, out_dir / "report.png")
    atomic_write(report["json"], json.dumps(report, indent=1), what="report")
    return report


# ---- output ---------------------------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def display_label(r: dict[str, Any]) -> str:
    """The row's name; the teacher's says so unless its name already does (no "teacher (teacher)")."""
    return f"{r['label']} (teacher)" if r["teacher"] and "teacher" not in r["label"].lower() else r["label"]


# columns, most important first: narrow terminals drop them from the end of this list
COLUMNS = [
    ("model", lambda r: display_label(r)),
    ("params", lambda r: f"{r['params']:,}"),
    ("fp32", lambda r: human_bytes(r["fp32_bytes"])),
    ("val loss", lambda r: _fmt(r["val_loss"], ".4f")),
    ("quantized", lambda r: human_bytes(r["quant_bytes"])),
    ("q loss", lambda r: _fmt(r["quant_val_loss"], ".4f")),
    (
        "x smaller",
        lambda r: _fmt(r["quant_smaller_than_teacher"], ".1f") + ("x" if r["quant_smaller_than_teacher"] else ""),
    ),
    ("tok/s", lambda r: _fmt(r["tokens_per_s"], ".0f")),
    ("bpb", lambda r: _fmt(r["bits_per_byte"], ".3f")),
    ("q format", lambda r: r["quant_kind"] or "-"),
    ("loss/T", lambda r: _fmt(r["loss_vs_teacher"], ".3f")),
    ("q loss/T", lambda r: _fmt(r["quant_loss_vs_teacher"], ".3f")),
    ("q tok/s", lambda r: _fmt(r["quant_tokens_per_s"], ".0f")),
    ("bf16", lambda r: human_bytes(r["bf16_bytes"])),
]
CAPTIONS = {
    "q loss": "q = the quantized artifact",
    "x smaller": "x smaller = the teacher's fp32 export / the quantized artifact",
    "loss/T": "loss/T = val loss / the teacher's",
}


def table(report: dict[str, Any], columns: list[str] | None = None):
    """The rich table: float model columns, its quantized artifact's, and both against the teacher."""
    from rich.table import Table

    names = columns or [c for c, _ in COLUMNS]
    data = report["data"]
    title = f"compression report: {data.get('path') or data.get('source')} (context {data['block_size']})"
    caption = "; ".join(v for k, v in CAPTIONS.items() if k in names) or None
    t = Table(title=title, caption=caption)
    for col in names:
        wide = col == "model"  # long labels wrap (at most 28 columns); numbers never do
        t.add_column(
            col,
            justify="left" if col in ("model", "q format") else "right",
            no_wrap=not wide,
            max_width=28 if wide else None,
        )
    cells = dict(COLUMNS)
    for r in report["models"]:
        t.add_row(*(cells[c](r) for c in names))
    return t


def fitting_table(report: dict[str, Any], width: int):
    """The table with as many columns (in COLUMNS' order of importance) as fit in `width` characters."""
    from rich.console import Console

    console = Console(width=100_000, file=io.StringIO())  # unclamped: the natural width
    names = [c for c, _ in COLUMNS]
    while len(names) > 2:
        t = table(report, names)
        if console.measure(t).maximum <= width:  # every column at its natural width: nothing squeezed
            return t, names
        names.pop()
    return table(report, names), names


def print_table(report: dict[str, Any], file=None) -> None:
    from rich.console import Console

    file = file or sys.stdout
    # the terminal's width; COLUMNS or 120 where stdout is a pipe or a file
    width = shutil.get_terminal_size((120, 24)).columns
    t, names = fitting_table(report, width)
    Console(file=file, width=width).print(t)
    dropped = [c for c, _ in COLUMNS if c not in names]
    if dropped:
        note = f"(narrow terminal: {', '.join(dropped)} left out; all of it is in {report['json']})"
        print(textwrap.fill(note, width=max(20, width - 1)), file=file)


def plot(report: dict[str, Any], path: Path) -> None:
    """Bytes on disk (log scale) vs val loss: per model its fp32 export (circle) and its quantized artifact
    (square), each at its own measured val loss, joined by a line; the teacher in black with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    anchors: list[tuple[float, float, str, str]] = []
    for i, r in enumerate(report["models"]):
        color = "black" if r["teacher"] else colors[i % len(colors)]
        pts = [(r["fp32_bytes"], r["val_loss"], "o"), (r["quant_bytes"], r["quant_val_loss"], "s")]
        pts = [(x, y, m) for x, y, m in pts if x and y is not None and math.isfinite(y)]
        if not pts:
            continue
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "-", color=color, alpha=0.5, lw=1)
        for x, y, m in pts:
            ax.plot(x, y, m, color=color, ms=7)
        if r["teacher"]:
            x, y, _ = pts[0]
            ax.plot(x, y, "*", color="gold", mec="black", ms=20, zorder=5, label="teacher")
        x, y, _ = pts[-1]
        anchors.append((x, y, r["label"], color))  # the teacher is the gold star (legend), not a "(teacher)"
    ax.plot([], [], "o", color="gray", label="fp32 export")
    ax.plot([], [], "s", color="gray", label="quantized artifact")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"size vs val loss: {report['data'].get('path') or report['data'].get('source')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    place_labels(fig, ax, anchors)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from microgpt.io.atomic import atomic_write

    atomic_write(path, buf.getvalue(), what="plot")


def place_labels(fig, ax, anchors: list[tuple[float, float, str, str]]) -> list:
    """Annotate each point with its name, moving a label around its point (then further out) until it
    overlaps no label placed before it. Returns the annotations."""
    renderer = fig.canvas.get_renderer()
    placed, texts = [], []
    offsets = [(6, 6), (6, -14), (-6, 6), (-6, -14), (6, 18), (6, -26), (-6, 18), (-6, -26)]
    offsets += [(dx, dy * k) for k in (2, 3, 4) for dx, dy in ((6, 14), (6, -14), (-6, 14), (-6, -14))]
    for x, y, name, color in sorted(anchors, key=lambda a: (a[1], a[0])):
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right"
            t = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color, ha=ha)
            box = t.get_window_extent(renderer).expanded(1.05, 1.15)
            if not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        else:  # crowded: the first position
            t = ax.annotate(name, (x, y), textcoords="offset points", xytext=offsets[0], fontsize=8, color=color)
            box = t.get_window_extent(renderer)
        placed.append(box)
        texts.append(t)
    return texts


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    from microgpt.cli import exit_on_error, quiet_env

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        parse(argv)  # prints the help and the keys
        return None
    quiet_env()
    report = exit_on_error(build_report)(argv)
    print_table(report)
    from microgpt.console import report_summary

    print(report_summary(report), file=sys.stderr, flush=True)  # stdout ends with one JSON line
    print(json.dumps({"json": report["json"], "png": report["png"], "models": len(report["models"])}), flush=True)
    return report


if __name__ == "__main__":
    main()
