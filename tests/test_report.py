"""`python -m microgpt.report` against independent computations: parameter counts summed from the saved
state_dicts, file sizes of `microgpt.export` directories (os.path.getsize) and their analytic byte counts,
val losses from a plain loop over the val split written out here, and the PNG checked as a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAKESPEARE, run_cli

import microgpt
from microgpt.config import GPTConfig
from microgpt.data.tokenizers import CharTokenizer
from microgpt.errors import CheckpointError, ConfigError
from microgpt.export import export
from microgpt.model import GPT, build_model
from microgpt.report import build_report, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("report-data") / "text.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok(text) -> CharTokenizer:
    return CharTokenizer.fit(text.read_text(encoding="utf-8"))


def write_ckpt(path: Path, model: GPT, tok, plugins: dict | None = None) -> Path:
    """A checkpoint in the shape train.py writes (what microgpt.load reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hp = {"model": model.config.to_dict(), "tokenizer": tok.to_dict(), "plugins": plugins or {}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}, path)
    return path


def make(tok, seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = {"vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}
    return build_model(GPTConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report-models")
    return {
        "teacher": write_ckpt(
            d / "teacher" / "checkpoints" / "last.ckpt", make(tok, 0, n_embd=48, tie_embeddings=False), tok
        ),
        "student": write_ckpt(d / "student.ckpt", make(tok, 1, n_layer=4, n_unique_layers=2), tok),
    }


@torch.no_grad()
def plain_val_loss(model, tok, text: Path, T: int) -> tuple[float, float]:
    """(loss, bits per byte) over the last 10% of the tokens in consecutive non-overlapping blocks of T
    targets (the tail block shorter), every val token after the first a target exactly once."""
    ids = tok.encode(text.read_text(encoding="utf-8"))
    val = ids[int(len(ids) * 0.9) :]
    nll, n = 0.0, 0
    for s in range(0, len(val) - 1, T):
        chunk = torch.tensor(val[s : s + T + 1])
        x, y = chunk[None, :-1], chunk[None, 1:]
        nll += F.cross_entropy(model(x)[0], y[0], reduction="sum").item()
        n += y.numel()
    loss = nll / n
    bytes_per_token = len(tok.decode(val).encode("utf-8")) / len(val)
    return loss, loss / math.log(2) / bytes_per_token


def dir_bytes(d: Path) -> int:
    """The model's files (manifest.json is the export's record of them, not part of the model)."""
    return sum(f.stat().st_size for f in d.iterdir() if f.name != "manifest.json")


@pytest.mark.slow
def test_report_numbers_match_independent_computations(ckpts, tok, text, tmp_path, capsys):
    out = tmp_path / "rep"
    report = main(
        [
            f"teacher={ckpts['teacher'].parent.parent}",  # a run directory
            f"model={ckpts['student']}",
            "data=text",
            f"data.path={text}",
            f"out={out}",
            "gen_tokens=40",
        ]
    )
    printed = capsys.readouterr().out
    rows = {r["label"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "student"] and rows["teacher"]["teacher"] and not rows["student"]["teacher"]
    assert report["data"]["block_size"] == 32 and report["teacher"] == "teacher"

    ids = tok.encode(text.read_text(encoding="utf-8"))
    n_val = len(ids) - int(len(ids) * 0.9)
    losses = {}
    for label, path in (("teacher", ckpts["teacher"]), ("student", ckpts["student"])):
        r = rows[label]
        sd = torch.load(path, weights_only=True)["state_dict"]
        n = sum(v.numel() for v in sd.values() if v.is_floating_point())
        assert r["params"] == n, label
        # sizes: exactly the files `microgpt.export` writes, and about 4 / 2 / 1 bytes per weight
        fp32 = export(path, "safetensors", tmp_path / label / "fp32")
        bf16 = export(path, "safetensors", tmp_path / label / "bf16", dtype="bfloat16")
        int8 = export(path, "int8", tmp_path / label / "int8")
        assert r["fp32_bytes"] == dir_bytes(tmp_path / label / "fp32") == fp32["bytes"]
        assert r["bf16_bytes"] == dir_bytes(tmp_path / label / "bf16") == bf16["bytes"]
        assert r["quant_bytes"] == dir_bytes(tmp_path / label / "int8") == int8["bytes"] and r["quant_kind"] == "int8"
        assert 4 * n < r["fp32_bytes"] < 4 * n + 16_384
        assert abs((r["fp32_bytes"] - r["bf16_bytes"]) - 2 * n) < 512  # the same headers, half the bytes
        assert n < r["quant_bytes"] < 0.35 * r["fp32_bytes"]
        # val loss / bpb from the loop above, on the float model and on the int8 export as it loads back
        model, _ = microgpt.load(path)
        loss, bpb = plain_val_loss(model, tok, text, 32)
        assert r["val_loss"] == pytest.approx(loss, rel=1e-5) and r["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
        qloss, _ = plain_val_loss(microgpt.load(tmp_path / label / "int8")[0], tok, text, 32)
        # the int8 export runs int8 GEMMs with one activation scale per call (docs/deploy.md), so its loss
        # depends a little on how the text is batched: measured 7e-5 nats between the report's batches and these
        assert r["quant_val_loss"] == pytest.approx(qloss, abs=5e-4)
        assert r["val_tokens"] == n_val - 1
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        losses[label] = loss
        assert f"{n:,}" in printed
    # against the teacher: its fp32 export over each quantized artifact, losses as ratios
    t, s = rows["teacher"], rows["student"]
    assert s["quant_smaller_than_teacher"] == pytest.approx(t["fp32_bytes"] / s["quant_bytes"])
    assert s["loss_vs_teacher"] == pytest.approx(losses["student"] / losses["teacher"], rel=1e-5)
    assert t["loss_vs_teacher"] == 1.0
    assert "teacher (teacher)" not in printed and "teacher" in printed and f"{s['val_loss']:.4f}" in printed
    assert json.loads(printed.strip().splitlines()[-1]) == {
        "json": str(out / "report.json"),
        "png": str(out / "report.png"),
        "models": 2,
    }
    # the JSON holds what was returned; the PNG is a real PNG image of a plot
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    png = (out / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
    import matplotlib.image

    h, w = matplotlib.image.imread(out / "report.png").shape[:2]
    assert h >= 400 and w >= 600


@pytest.mark.slow
def test_qat_models_report_their_quantized_artifact(tok, text, tmp_path):
    from microgpt.plugins import load_plugin

    qat = load_plugin("qat")
    model = make(tok, 2, converters=[{"name": "qat", "scheme": "int8"}])
    plugins = {"qat": str(Path(qat.__file__).resolve().parent.parent)}
    ckpt = write_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", model, tok, plugins)
    artifact = tmp_path / "run" / "checkpoints" / "quantized.pt"
    qat.convert_and_save(model, artifact, tok.to_dict(), plugins)
    report = main(
        [
            f"model={ckpt}",
            f"model={artifact}",
            "data=text",
            f"data.path={text}",
            f"out={tmp_path / 'rep'}",
            "png=false",
            "gen_tokens=8",
        ]
    )
    ck, art = report["models"]
    assert (ck["label"], art["label"]) == ("run/last", "run/quantized")
    # the checkpoint's quantized column is the artifact its run wrote; the artifact's row is that model itself
    assert ck["quant_bytes"] == art["quant_bytes"] == artifact.stat().st_size
    assert ck["quant_kind"] == art["quant_kind"] == "qat int8"
    assert art["fp32_bytes"] is None and art["bf16_bytes"] is None and art["loss_vs_teacher"] is None
    qmodel, _ = qat.load_quantized(artifact)
    qloss, _ = plain_val_loss(qmodel, tok, text, 32)
    assert art["val_loss"] == pytest.approx(qloss, rel=1e-5) and ck["quant_val_loss"] == pytest.approx(qloss, rel=1e-5)
    fake, _ = microgpt.load(ckpt)
    assert ck["val_loss"] == pytest.approx(plain_val_loss(fake, tok, text, 32)[0], rel=1e-5)
    assert not (tmp_path / "rep" / "report.png").exists() and (tmp_path / "rep" / "report.json").is_file()


def test_bad_arguments_are_one_line_errors(ckpts, text, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_report([f"model={tmp_path / 'nope.ckpt'}", "data=text", f"data.path={text}"])
    with pytest.raises(CheckpointError, match="quantized model .* does not exist"):
        build_report([f"model={tmp_path / 'q.pt'}"])
    with pytest.raises(ConfigError, match="nothing to compare"):
        build_report(["data=text"])
    with pytest.raises(ConfigError, match="unknown option 'modle'"):
        build_report([f"modle={ckpts['student']}"])
    with pytest.raises(ConfigError, match="labels= names 1 models but 2"):
        build_report([f"model={ckpts['student']}", f"teacher={ckpts['teacher']}", "labels=a"])
    with pytest.raises(ConfigError, match="teacher= is given twice"):
        build_report([f"teacher={ckpts['student']}", f"teacher={ckpts['teacher']}"])


@pytest.mark.slow
def test_cli_bad_path_exits_2_with_one_line(text, tmp_path):
    missing = tmp_path / "missing.ckpt"
    res = run_cli(["-m", "microgpt.report", f"model={missing}", "data=text", f"data.path={text}"], timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
