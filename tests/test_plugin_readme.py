"""plugins/README.md's example plugin, extracted verbatim and used the way a user would: from folders
outside the repository, with no change to src/."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from tests.conftest import ROOT, run_cli


def _blocks(md: str) -> dict[str, str]:
    """`path`: followed by a fenced block -> {path: code}."""
    return {m[0]: m[1] for m in re.findall(r"`([\w/.]+)`:\n\n```\w+\n(.*?)```", md, flags=re.S)}


@pytest.mark.slow
def test_readme_plugin_works_from_outside_the_repo(tmp_path, small_text):
    files = _blocks((ROOT / "plugins" / "README.md").read_text())
    assert set(files) == {"myplugins/primer/__init__.py", "myconf/plugin/primer.yaml"}
    for rel, code in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(code)
    run_dir = tmp_path / "run"
    env = {"MICROGPT_PLUGIN_PATH": str(tmp_path / "myplugins")}
    args = [
        "train.py",
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        "+plugin=primer",
        "model=nano",
        "model.mlp=geglu",
        "debug=fast",
        "trainer.max_steps=30",
        "data=text",
        f"data.path={small_text}",
        f"hydra.run.dir={run_dir}",
        "callbacks.progress_bar=null",
    ]
    p = run_cli(args, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    z = [float(r["train_z"]) for r in rows if r.get("train_z")]
    loss = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert z and all(v > 0 for v in z)  # the objective is the plugin's
    assert loss[-1] < loss[0]
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.endswith("proj.1.gamma") for k in sd)  # the converter's parameters were trained and saved
    # a fresh process rebuilds the converted model with the plugin's component, from the checkpoint alone
    probe = (
        "import json, torch, microgpt\n"
        f"m, tok = microgpt.load({str(run_dir / 'checkpoints' / 'last.ckpt')!r})\n"
        "sd = torch.load(" + repr(str(run_dir / "checkpoints" / "last.ckpt")) + ", weights_only=True)['state_dict']\n"
        "same = all(torch.equal(v, sd['model.' + k]) for k, v in m.state_dict().items())\n"
        "print(json.dumps({'mlp': type(m.blocks[0].mlp).__name__, 'scale': type(m.blocks[0].attn.proj[1]).__name__, 'same': same}))\n"
    )
    # the checkpoint names primer but never chooses its code: without the folder on the plugin path, one line
    p = run_cli(["-c", probe], env={"MICROGPT_PLUGIN_PATH": ""}, cwd=tmp_path / "run")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    assert "plugin 'primer'" in err and "MICROGPT_PLUGIN_PATH" in err, err
    # with MICROGPT_PLUGIN_PATH set (as the README exports it), load() imports primer by name
    p = run_cli(["-c", probe], env={"MICROGPT_PLUGIN_PATH": str(tmp_path / "myplugins")}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"mlp": "GeGLU", "scale": "Scale", "same": True}
