"""`python -m microgpt.sweep DIR`: job discovery, status, best job, exit codes; the sweeper objectives; and an
Optuna sweep (experiment=optuna_lr) that really minimises the validation loss.

The summary tests build sweep directories by hand, laid out the way Hydra and submitit write them (job dirs
with .hydra/, .submitit/<slurm id>/ with result pickles and logs), so every status is exercised without a
cluster; tests/test_slurm.py checks the same summary on real SLURM sweeps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_cli
from omegaconf import OmegaConf

from microgpt.errors import ConfigError
from microgpt.sweep import _array_nums, find_jobs, main, mark_best, objective, read_metrics, varying_keys

FIELDS = ["epoch", "lr-AdamW", "step", "train_loss", "val_bpb", "val_loss", "val_ppl"]


def write_metrics(path: Path, vals: dict[int, float], last_step: int) -> None:
    """A metrics.csv like Lightning's CSVLogger writes: train rows every 2 steps, val rows at `vals`."""
    rows = [{"step": s, "train_loss": 4.0 - s / 100, "epoch": 0} for s in range(1, last_step + 1, 2)]
    rows += [{"step": s, "val_loss": v, "val_ppl": 2.718**v, "epoch": 0} for s, v in vals.items()]
    rows.sort(key=lambda r: r["step"])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def make_job_dir(sweep: Path, num: int, overrides: list[str], job_id: str, vals=None, last_step=0, max_steps=20):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save({"hydra": {"job": {"num": num, "id": job_id, "name": "train"}}}, d / ".hydra" / "hydra.yaml")
    OmegaConf.save({"trainer": {"max_steps": max_steps}}, d / ".hydra" / "config.yaml")
    if vals is not None:
        write_metrics(d / "metrics.csv", vals, last_step)
    return d


def make_submitit(sweep: Path, job_id: str, result=None, err: str = "", num: int | None = None) -> None:
    """submitit's folder for a SLURM job; `result` is the JSON result file the job itself writes
    (microgpt.job_results: <sweep>/.results/<num>.json)."""
    f = sweep / ".submitit" / job_id
    f.mkdir(parents=True)
    (f / f"{job_id}_submitted.pkl").write_bytes(b"")
    (f / f"{job_id}_0_log.err").write_text(err)
    if result is not None:
        write_result(sweep, num, {**result, "slurm_job_id": job_id})


def write_result(sweep: Path, num: int, doc: dict) -> None:
    d = sweep / ".results"
    d.mkdir(exist_ok=True)
    (d / f"{num}.json").write_text(json.dumps({"num": num, **doc}))


def test_read_metrics_takes_the_last_and_the_lowest_val_loss(tmp_path):
    p = tmp_path / "metrics.csv"
    write_metrics(p, {9: 3.0, 19: 2.5, 29: 2.7}, last_step=29)
    assert read_metrics(p) == {"val_loss": 2.7, "best_val_loss": 2.5, "steps": 30}
    assert read_metrics(tmp_path / "missing.csv") == {}


def test_array_ids_map_to_hydra_job_numbers():
    # Hydra launches batches in order; each batch is one array (a one-job batch a plain job)
    assert _array_nums(["16_1", "12_0", "15", "12_1", "16_0"]) == {"12_0": 0, "12_1": 1, "15": 2, "16_0": 3, "16_1": 4}


@pytest.fixture
def slurm_sweep(tmp_path) -> Path:
    """Six jobs of `-m seed=1,2,3,4,5,6 model=nano` on SLURM (array 5), one of each kind of outcome."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(
        {
            "hydra": {
                "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                "overrides": {"task": ["seed=1,2,3,4,5,6", "model=nano"]},
            }
        },
        sweep / "multirun.yaml",
    )
    ov = [[f"seed={n + 1}", "model=nano"] for n in range(6)]
    make_job_dir(sweep, 0, ov[0], "5_0", {9: 2.4, 19: 2.0}, 19)
    make_submitit(sweep, "5_0", {"status": "ok", "value": 2.0}, num=0)
    d1 = make_job_dir(sweep, 1, ov[1], "5_1", {19: 1.5}, 19)
    write_metrics(d1 / "metrics.before-last-123.csv", {9: 1.4}, 9)  # kept by train.py when it resumed
    make_submitit(sweep, "5_1", {"status": "ok", "value": 1.5}, num=1)
    # lower val loss than any ok job, but it crashed: never the best
    make_job_dir(sweep, 2, ov[2], "5_2", {9: 1.0}, 11)
    make_submitit(sweep, "5_2", {"status": "failed", "error": "ValueError: boom"}, num=2)
    make_job_dir(sweep, 3, ov[3], "5_3", {9: 3.0}, 9)
    make_submitit(sweep, "5_3", {"status": "failed", "error": "RuntimeError: loss is nan"}, num=3)
    # no job dir (train.py removed it after bad input), no result: the log tells
    make_submitit(sweep, "5_4", None, err="INFO: x\nerror: data.path=/x does not exist; pass ...\nsrun: error: task 0")
    # submitted, nothing written yet
    make_submitit(sweep, "5_5", None, err="")
    return sweep


def test_summary_reads_every_outcome_and_marks_the_best_ok_job(slurm_sweep):
    jobs = find_jobs(slurm_sweep, query_slurm=False)
    best = mark_best(jobs)
    assert [(j.num, j.job_id, j.status) for j in jobs] == [
        (0, "5_0", "ok"),
        (1, "5_1", "ok"),
        (2, "5_2", "failed"),
        (3, "5_3", "failed"),
        (4, "5_4", "failed"),
        (5, "5_5", "running"),
    ]
    assert best is jobs[1] and [j.best for j in jobs] == [False, True, False, False, False, False]
    assert [j.val_loss for j in jobs[:4]] == [2.0, 1.5, 1.0, 3.0]
    assert [j.best_val_loss for j in jobs[:4]] == [2.0, 1.4, 1.0, 3.0]  # job 1: its lowest was before a resume
    assert jobs[2].note == "ValueError: boom"
    assert jobs[3].note == "RuntimeError: loss is nan"
    assert jobs[4].note.startswith("error: data.path=/x does not exist")
    assert jobs[4].overrides == ["seed=5", "model=nano"]  # recomputed with Hydra's basic sweeper
    assert jobs[5].overrides == ["seed=6", "model=nano"]
    assert varying_keys(jobs) == (["seed"], ["model=nano"])


def test_cli_json_table_and_exit_status(slurm_sweep, capsys):
    assert main([str(slurm_sweep), "--json", "--no-slurm"]) == 0  # some job is ok
    doc = json.loads(capsys.readouterr().out)
    assert doc["best"] == 1
    assert doc["counts"] == {"ok": 2, "failed": 3, "running": 1, "pending": 0}
    assert [j["status"] for j in doc["jobs"]] == ["ok", "ok", "failed", "failed", "failed", "running"]

    assert main([str(slurm_sweep), "--no-slurm"]) == 0
    text = capsys.readouterr().out
    assert "★" in text and "2 ok, 3 failed, 1 running; best: #1 val_loss=1.5000" in text
    assert "#2 failed: ValueError: boom" in text and "5_4_0_log.err" in text

    # no job succeeded -> 1
    for n in ("0", "1"):
        (slurm_sweep / ".results" / f"{n}.json").unlink()
        (slurm_sweep / ".submitit" / f"5_{n}" / f"5_{n}_0_log.err").write_text("Traceback\nKeyError: 'x'\n")
    assert main([str(slurm_sweep), "--json", "--no-slurm"]) == 1
    assert json.loads(capsys.readouterr().out)["best"] is None


def test_cli_bad_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: sweep dir")
    assert main([str(tmp_path)]) == 2
    assert "no sweep jobs" in capsys.readouterr().err


def test_jobs_of_the_basic_launcher_are_judged_by_max_steps(tmp_path):
    sweep = tmp_path / "sweep"
    make_job_dir(sweep, 0, ["seed=1"], "0", {9: 2.0, 19: 1.8}, 19, max_steps=20)  # reached max_steps
    make_job_dir(sweep, 1, ["seed=2"], "1", {9: 2.1}, 11, max_steps=20)  # stopped (or still running)
    jobs = find_jobs(sweep, query_slurm=True)  # "0"/"1" are Hydra job ids, not SLURM ones: nothing is asked
    assert [(j.status, j.job_id, j.steps) for j in jobs] == [("ok", None, 20), ("running", None, 12)]
    assert mark_best(jobs) is jobs[0]


# ---- objectives ---------------------------------------------------------------------------------------------


def _model(**kw):
    from microgpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=32, **kw))


def test_objective_is_val_loss_by_default_and_can_add_model_bytes():
    model = _model()
    result = {"val_loss": 1.25, "best_val_loss": 1.0, "module": SimpleNamespace(model=model)}
    assert objective(OmegaConf.create({}), result) == 1.25
    assert objective(OmegaConf.create({"objectives": ["best_val_loss"]}), result) == 1.0

    loss, nbytes = objective(OmegaConf.create({"objectives": ["val_loss", "model_bytes"]}), result)
    assert loss == 1.25
    raw = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # the weights themselves
    assert raw <= nbytes <= raw + 64 * 1024  # plus torch.save's container overhead
    # cross-layer sharing (one block for four layers) is smaller on disk, and the objective sees it
    shared = {"val_loss": 1.25, "module": SimpleNamespace(model=_model(n_unique_layers=1))}
    _, shared_bytes = objective(OmegaConf.create({"objectives": ["val_loss", "model_bytes"]}), shared)
    assert shared_bytes < nbytes
    with pytest.raises(ConfigError, match="unknown 'params'"):
        objective(OmegaConf.create({"objectives": ["params"]}), result)


# ---- a real Optuna sweep ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_optuna_sweep_minimises_val_loss(tmp_path, small_text):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper: pip install -e '.[optuna]'")
    sweep = tmp_path / "optuna"
    p = run_cli(
        [
            "train.py",
            "-m",
            "experiment=optuna_lr",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1",
            "model=nano",
            "debug=fast",
            "data=text",
            f"data.path={small_text}",
            "print_sample=false",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    trials = {}
    for d in sorted(sweep.glob("[0-9]*")):
        ov = dict(o.split("=", 1) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml"))
        lr = float(ov["optimizer.lr"])
        assert 1e-4 <= lr <= 1e-2  # the search space of conf/experiment/optuna_lr.yaml
        trials[d.name] = (read_metrics(d / "metrics.csv")["val_loss"], lr)
    assert len(trials) == 2
    best_num = min(trials, key=lambda k: trials[k][0])
    # Optuna got train.py's return value: its best trial is the job with the lowest final val loss on disk
    assert result.best_value == pytest.approx(trials[best_num][0], rel=1e-6)
    assert result.best_params["optimizer.lr"] == pytest.approx(trials[best_num][1])

    s = run_cli(["-m", "microgpt.sweep", str(sweep), "--json"], timeout=120, cwd=ROOT)
    assert s.returncode == 0
    doc = json.loads(s.stdout)
    assert doc["counts"]["ok"] == 2 and doc["best"] == int(best_num)
