"""Loading a file never runs its code, and never allocates what its weights do not hold (docs/reliability.md).

Payloads here are pickles whose __reduce__ calls `open(MARKER, "w")`: loading them with full pickle creates
MARKER, so "the marker does not exist afterwards" proves the payload did not run. They sit in real checkpoint
directories written by short DeepSpeed and FSDP (distcp) runs, in recorded plugin folders, and in forged
configs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, SHAKESPEARE, run_cli

import microgpt
from microgpt.checkpoint import model_from_checkpoint, read_checkpoint
from microgpt.config import GPTConfig
from microgpt.data.tokenizers import CharTokenizer
from microgpt.errors import CheckpointError
from microgpt.model import GPT


class Payload:
    """Unpickled with full pickle, this creates the marker file (the stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


TOK = CharTokenizer.fit("abcdefghij ")


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=4, mlp_hidden=4)
    return GPT(GPTConfig(**{**cfg, **kw}))


def save(model: GPT, path: Path, plugins: dict | None = None, config: dict | None = None) -> Path:
    """A checkpoint in train.py's layout (weights under `model.`, config and tokenizer in hyper_parameters)."""
    hp = {"model": config or model.config.to_dict(), "tokenizer": TOK.to_dict(), "plugins": plugins or {}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}, path)
    return path


# ---- item 5: a config that does not fit its weights is refused before anything is allocated --------------


def run_measured(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str, int]:
    """`python ARGS` with stdout/stderr to files; returns (exit status, stdout, stderr, peak RSS in KB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(cwd / "out.txt", "w+") as fo, open(cwd / "err.txt", "w+") as fe:
        p = subprocess.Popen([PY, *args], cwd=cwd, env=env, stdout=fo, stderr=fe, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (p.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return p.returncode, fo.read(), fe.read(), usage.ru_maxrss


def test_forged_2kb_checkpoint_claiming_200_layers_of_1024_is_refused_without_allocating(tmp_path):
    small = save(tiny_model(), tmp_path / "small.ckpt")
    cfg = {**tiny_model().config.to_dict(), "n_layer": 200, "n_embd": 1024, "n_head": 16, "mlp_hidden": None}
    cfg.pop("head_dim")
    forged = save(tiny_model(), tmp_path / "forged.ckpt", config=cfg)
    assert forged.stat().st_size < 8192  # a few KB, as the 2 KB one (here ~250 weights in 13 tensors)

    # in process: one line naming the mismatch, before any module is built for real
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(read_checkpoint(forged))
    assert "n_embd=1024" in str(e.value) and "\n" not in str(e.value)

    # the CLI a user runs: exit 2, one line, and no more memory than generating from the real small model
    gen = ["-m", "microgpt.generate", "max_new_tokens=5", "prompt=abc", "device=cpu"]
    rc, out, err, base_kb = run_measured([*gen, f"ckpt={small}"], tmp_path)
    assert rc == 0, err[-2000:]
    rc, out, err, forged_kb = run_measured([*gen, f"ckpt={forged}"], tmp_path)
    assert rc == 2, err[-2000:]
    line = one_error_line(err)
    assert "does not match" in line and "forged" in line
    # building that config would take 200 x 12.6M float32 weights (~10 GB); refusing it costs nothing
    assert forged_kb < base_kb + 64 * 1024, (forged_kb, base_kb)


def test_a_block_whose_shapes_do_not_fit_the_config_is_refused_before_building_it(tmp_path):
    # same embedding and block count, but the config's MLP is a million wide: found on the meta model
    cfg = {**tiny_model().config.to_dict(), "mlp_hidden": 1_000_000}
    forged = save(tiny_model(), tmp_path / "wide.ckpt", config=cfg)
    with pytest.raises(CheckpointError, match=r"shapes \(file vs config\).*mlp\.fc\.weight \(4, 4\) vs \(1000000, 4\)"):
        microgpt.load(forged)
    # and a block count the weights do not hold
    deep = save(tiny_model(), tmp_path / "deep.ckpt", config={**tiny_model().config.to_dict(), "n_layer": 100_000})
    with pytest.raises(CheckpointError, match="claims 100000 transformer blocks but its weights hold 1"):
        microgpt.load(deep)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_real_checkpoint_loads_into_the_files_own_tensors_with_identical_outputs(tmp_path, position):
    src = tiny_model(position=position, n_layer=2, n_head=2, n_embd=8, mlp_hidden=None).eval()
    ckpt = read_checkpoint(save(src, tmp_path / "m.ckpt"))
    model = model_from_checkpoint(ckpt).eval()
    # materialised from the file: the parameters *are* the loaded tensors (one copy, no random init first)
    assert model.wte.weight.data_ptr() == ckpt["state_dict"]["model.wte.weight"].data_ptr()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(p.requires_grad for p in model.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), src.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    if position == "rope":  # derived from the config, not stored: computed for real
        torch.testing.assert_close(model.pos.inv_freq, src.pos.inv_freq, rtol=0, atol=0)
    x = torch.randint(0, TOK.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


# ---- item 3: a checkpoint names plugins, it never chooses their code ------------------------------------


PAYLOAD_PLUGIN = """
from pathlib import Path
Path({marker!r}).write_text("payload ran")
"""


def _payload_plugin(folder: Path, name: str, marker: Path) -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(PAYLOAD_PLUGIN.format(marker=str(marker)))
    return folder


def _export_dir(model: GPT, out: Path, plugins: dict) -> Path:
    from microgpt.export import write_safetensors

    out.mkdir()
    write_safetensors(model, TOK, out, plugins)
    return out


def test_a_recorded_plugin_folder_is_never_imported(tmp_path):
    marker = tmp_path / "marker"
    evil = _payload_plugin(tmp_path / "evil", "evilplug", marker)
    ckpt = save(tiny_model(), tmp_path / "m.ckpt", plugins={"evilplug": str(evil)})
    export = _export_dir(tiny_model(), tmp_path / "exported", {"evilplug": str(evil)})
    assert json.loads((export / "microgpt.json").read_text())["plugins"] == {"evilplug": str(evil)}
    work = tmp_path / "cwd"  # no ./plugins here; no MICROGPT_PLUGIN_PATH
    work.mkdir()
    for target in (ckpt, export):
        p = run_cli(
            ["-m", "microgpt.generate", f"ckpt={target}", "max_new_tokens=3"],
            300,
            work,
            env={"MICROGPT_PLUGIN_PATH": ""},
        )
        assert p.returncode == 2, p.stderr[-2000:]
        line = one_error_line(p.stderr)
        assert "plugin 'evilplug'" in line and str(evil) in line and "MICROGPT_PLUGIN_PATH" in line, line
        assert not marker.exists(), f"{target}: the recorded plugin's code ran"

    # the user's own plugin path decides: with the folder on it, the plugin is imported by name
    p = run_cli(
        ["-c", f"import microgpt; microgpt.load({str(ckpt)!r})"], 300, work, env={"MICROGPT_PLUGIN_PATH": str(evil)}
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert marker.read_text() == "payload ran"


def test_a_recorded_folder_does_not_shadow_a_shipped_plugin(tmp_path):
    # the checkpoint says its `prune` lived in a folder holding a payload named prune: the shipped one loads
    marker = tmp_path / "marker"
    evil = _payload_plugin(tmp_path / "evil", "prune", marker)
    ckpt = save(tiny_model(), tmp_path / "m.ckpt", plugins={"prune": str(evil)})
    code = "import sys, microgpt; microgpt.load(sys.argv[1]); print(sys.modules['microgpt_plugins.prune'].__file__)"
    p = run_cli(["-c", code, str(ckpt)], 300, tmp_path, env={"MICROGPT_PLUGIN_PATH": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip()) == ROOT / "plugins" / "prune" / "__init__.py"
    assert not marker.exists()


def test_a_recorded_plugin_name_that_is_not_a_name_is_refused(tmp_path):
    ckpt = save(tiny_model(), tmp_path / "m.ckpt", plugins={"../../evil": str(tmp_path)})
    with pytest.raises(CheckpointError, match="invalid plugin name '../../evil'"):
        microgpt.load(ckpt)


# ---- items 1-2: sharded checkpoint directories are checked before DeepSpeed / distcp read them -----------


def _payload_torch_file(path: Path, marker: Path) -> None:
    torch.save({"optimizer_state_dict": Payload(marker), "weights": torch.zeros(3)}, path)


STEPS = 2


def _train(run_dir: Path, text: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "train.py",
        "model=nano",
        "data=text",
        f"data.path={text}",
        "data.eval_batches=1",
        f"strategy={strategy}",
        "trainer.devices=1",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "print_sample=false",  # not what these tests are about
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return run_cli(args, 600)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """strategy -> the checkpoint directory (last.ckpt) of a 2-step one-process run (made once, on first use)."""
    work = tmp_path_factory.mktemp("sharded")
    text = work / "small.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    made: dict[str, Path] = {}

    def get(strategy: str) -> tuple[Path, Path]:
        if strategy not in made:
            if strategy == "deepspeed":
                ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache/microgpt/torch_extensions")
                os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)  # DeepSpeed's JIT-built helper, shared with make
            p = _train(work / strategy, text, strategy)
            assert p.returncode == 0, p.stderr[-3000:]
            made[strategy] = work / strategy / "checkpoints" / "last.ckpt"
            assert made[strategy].is_dir()
        return made[strategy], text

    return get


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _deepspeed_files(d: Path) -> list[Path]:
    tag = (d / "latest").read_text().strip()
    return sorted((d / tag).glob("*.pt"))


@pytest.mark.slow
def test_deepspeed_directory_with_a_payload_is_refused_and_a_clean_one_resumes(tmp_path, sharded):
    clean, text = sharded("deepspeed")
    files = _deepspeed_files(clean)
    assert {f.name for f in files} == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}

    # a payload in each file DeepSpeed unpickles: the check names it, nothing runs (in process, no DeepSpeed)
    from microgpt.safety import check_sharded_checkpoint

    for i, f in enumerate(files):
        bad = _copy(clean, tmp_path / f"bad{i}")
        marker = tmp_path / f"marker{i}"
        _payload_torch_file(bad / f.parent.name / f.name, marker)
        with pytest.raises(CheckpointError) as e:
            check_sharded_checkpoint(bad)
        msg = str(e.value)
        assert f.name in msg and "io.open" in msg and "trust_checkpoint=true" in msg and "\n" not in msg
        assert not marker.exists()

    # the commands a user runs: resume and consolidate refuse in one line, exit 2, the payload never runs
    bad, marker = tmp_path / "bad1", tmp_path / "marker1"  # the optimizer states, which DeepSpeed unpickles
    p = _train(tmp_path / "resumed-bad", text, "deepspeed", f"ckpt_path={bad}", f"trainer.max_steps={STEPS + 2}")
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_error_line(p.stderr)
    assert "cannot be loaded safely" in line and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in line, line
    assert not marker.exists(), "resuming ran the payload"
    p = run_cli(["-m", "microgpt.consolidate", f"ckpt={bad}", f"out={tmp_path / 'c.ckpt'}"], 300)
    assert p.returncode == 2 and "trust=true" in one_error_line(p.stderr), p.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "c.ckpt").exists()
    # opting in is explicit and does what it says: full pickle (the payload's code runs)
    p = run_cli(["-m", "microgpt.consolidate", f"ckpt={bad}", f"out={tmp_path / 'c.ckpt'}", "trust=true"], 300)
    assert marker.exists()

    # the clean directory resumes under DeepSpeed and continues from its step
    run = tmp_path / "resumed"
    p = _train(run, text, "deepspeed", f"ckpt_path={clean}", f"trainer.max_steps={STEPS + 2}")
    assert p.returncode == 0, p.stderr[-3000:]
    meta = torch.load(_deepspeed_files(run / "checkpoints" / "last.ckpt")[0], map_location="cpu", weights_only=True)
    assert meta["global_step"] == STEPS + 2


def _dcp_metadata_with_payload_item(clean: Path, bad: Path, marker: Path) -> str:
    """Rewrite a distcp copy so one non-tensor item (which DCP reads with weights_only=False) is a payload:
    the payload's bytes are appended to the data file and the item's byte range in .metadata points there."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = pickle.loads((clean / ".metadata").read_bytes())  # our own clean file
    fqn = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in md.storage_data if i.fqn == fqn)
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    data = bad / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    return fqn


@pytest.mark.slow
def test_distcp_directory_with_a_payload_is_refused_and_a_clean_one_resumes(tmp_path, sharded):
    clean, text = sharded("fsdp")
    assert (clean / ".metadata").is_file() and list(clean.glob("*.distcp"))
    from microgpt.consolidate import consolidate
    from microgpt.safety import check_sharded_checkpoint

    # .metadata itself replaced by a payload pickle
    meta_bad, meta_marker = _copy(clean, tmp_path / "meta-bad"), tmp_path / "meta-marker"
    (meta_bad / ".metadata").write_bytes(pickle.dumps(Payload(meta_marker)))
    # a non-tensor item inside the shard file
    item_bad, item_marker = _copy(clean, tmp_path / "item-bad"), tmp_path / "item-marker"
    fqn = _dcp_metadata_with_payload_item(clean, item_bad, item_marker)
    for bad, marker, where in ((meta_bad, meta_marker, ".metadata"), (item_bad, item_marker, fqn)):
        with pytest.raises(CheckpointError) as e:
            check_sharded_checkpoint(bad)
        assert where in str(e.value) and "io.open" in str(e.value) and "trust_checkpoint=true" in str(e.value)
        with pytest.raises(CheckpointError, match="trust=true"):
            consolidate(bad)
        assert not marker.exists()
    # the payload item really is what DCP would unpickle: trusting the copy runs it
    consolidate(item_bad, trust=True)
    assert item_marker.exists()

    # the commands a user runs
    p = _train(tmp_path / "resumed-bad", text, "fsdp", f"ckpt_path={meta_bad}", f"trainer.max_steps={STEPS + 2}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert ".metadata cannot be loaded safely" in one_error_line(p.stderr)
    assert not meta_marker.exists(), "resuming ran the payload"
    p = run_cli(["-m", "microgpt.consolidate", f"ckpt={meta_bad}", f"out={tmp_path / 'c.ckpt'}"], 300)
    assert p.returncode == 2 and "trust=true" in one_error_line(p.stderr)
    assert not meta_marker.exists() and not (tmp_path / "c.ckpt").exists()

    # the clean directory resumes under FSDP and consolidates
    run = tmp_path / "resumed"
    p = _train(run, text, "fsdp", f"ckpt_path={clean}", f"trainer.max_steps={STEPS + 2}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert consolidate(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS + 2
