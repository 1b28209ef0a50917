"""io/checkpoint.py: one table of format probes, one safe torch.load."""

from __future__ import annotations

import pytest
import torch

from microgpt.errors import CheckpointError
from microgpt.io.checkpoint import FORMATS, read_checkpoint, safe_load

RAN = []


class Payload:
    def __reduce__(self):  # unpickling would call RAN.append: a file that runs code
        return (RAN.append, ("ran",))


def test_safe_load_never_runs_code_and_names_the_damage(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    RAN.clear()
    with pytest.raises(CheckpointError, match=r"checkpoint .*evil.ckpt cannot be loaded safely \(\w+\)"):
        read_checkpoint(evil)
    assert RAN == []
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"broken.ckpt is corrupt or not a microgpt checkpoint \(.+\); retrain"):
        read_checkpoint(broken)
    assert torch.equal(safe_load(good, corrupt="{path} bad")["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"^.*broken.ckpt bad: \w+$"):
        safe_load(broken, corrupt="{path} bad: {error}")


def test_format_probes_are_one_table_in_order(tmp_path):
    assert [name for name, _, _ in FORMATS] == ["onnx", "export", "hf", "gguf", "ckpt"]
    onnx, export, hf, gguf, ckpt = (probe for _, probe, _ in FORMATS)
    (tmp_path / "microgpt.json").write_text("{}")
    assert export(tmp_path) and not ckpt(tmp_path) and not onnx(tmp_path)
    f = tmp_path / "x.ckpt"
    f.write_bytes(b"")
    assert ckpt(f) and not export(f) and not hf(f) and not gguf(f)
    with pytest.raises(CheckpointError, match="microgpt.json is damaged"):
        read_checkpoint(tmp_path)  # the export reader answered, not the .ckpt one
