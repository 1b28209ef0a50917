"""Multirun sweeps on a REAL SLURM cluster (hydra/launcher=slurm, submitit), and the launcher's failure modes.

The cluster is the single-node one from `make slurm-up` (scripts/local_slurm.sh; .ci/run starts it). Without
one these tests skip with the reason, except under MICROGPT_REQUIRE_SLURM=1 (CI), where they fail.

The four sweeps below are submitted together when the first test needs them, so their jobs share the node's
two CPUs instead of running one after another; each test then waits for its own sweep (with a timeout).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, PY, ROOT, SHAKESPEARE, run_cli

SLURM_DIR = Path(os.environ.get("MICROGPT_SLURM_DIR", "/tmp/microgpt-slurm"))
SWEEP_TIMEOUT = 420  # s: a hung sweep fails its test instead of hanging the suite (each takes ~10-60 s idle)
REQUEUE_STEPS = 200

# small, fast jobs: 1 CPU and 2 GB each, so two run side by side on a 2-core node
COMMON = [
    "hydra/launcher=slurm",
    "++hydra.callbacks.slurm_check._target_=microgpt.sweep.SlurmCheck",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=15",
    "model=nano",
    "debug=fast",
    "data=text",
    "print_sample=false",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


# ---- the cluster ------------------------------------------------------------------------------------------


def _cluster_env() -> tuple[dict[str, str] | None, str]:
    """(environment for SLURM clients, '') when a node answers; (None, why) otherwise. Never waits long."""
    env = dict(os.environ)
    default_conf = SLURM_DIR / "etc" / "slurm.conf"
    if "SLURM_CONF" not in env and default_conf.is_file():
        env["SLURM_CONF"] = str(default_conf)
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None, "SLURM's client tools (sinfo, sbatch) are not installed"
    conf = env.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # sinfo would retry for 60 s
        return None, f"SLURM_CONF={conf} does not exist"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None, "sinfo did not answer within 20 s"
    if p.returncode != 0:
        return None, f"sinfo failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    states = p.stdout.split()
    if not any(s.rstrip("*~#$@^-") in ("idle", "mix", "alloc", "comp") for s in states):
        return None, f"no node is up (sinfo states: {states or 'none'})"
    return env, ""


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    env, why = _cluster_env()
    if env is None:
        msg = f"no SLURM cluster: {why}; start the local one with `make slurm-up` (as root), see docs/slurm.md"
        if os.environ.get("MICROGPT_REQUIRE_SLURM") == "1":
            pytest.fail(msg + " [MICROGPT_REQUIRE_SLURM=1: CI must run these tests]")
        pytest.skip(msg)
    return env


def _sq(env: dict[str, str], *args: str, timeout: float = 20) -> str:
    """A SLURM client command's stdout ('' when it fails); bounded."""
    try:
        p = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ""
    return p.stdout if p.returncode == 0 else ""


def _wait_for(what: str, fn, timeout: float, every: float = 0.3):
    """Poll fn() until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


# ---- sweeps -----------------------------------------------------------------------------------------------


class Sweep:
    """`python train.py -m ...` in the background, its output in files, its jobs cancelled on cleanup."""

    def __init__(self, name: str, base: Path, overrides: list[str], env: dict[str, str]) -> None:
        self.name, self.env = name, env
        self.base = base / name  # the sweep dir is a timestamped folder in here: a duplicate would show
        self.base.mkdir(parents=True)
        self.out, self.err = base / f"{name}.out", base / f"{name}.err"
        args = [*COMMON, *overrides, f"hydra.sweep.dir={self.base}/" + "${now:%H-%M-%S-%f}"]
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen(
                [PY, "train.py", "-m", *args], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=o, stderr=e
            )

    @property
    def dir(self) -> Path:
        dirs = [d for d in self.base.iterdir() if d.is_dir()]
        assert len(dirs) == 1, f"expected one sweep dir, found {dirs}"
        return dirs[0]

    def job_ids(self) -> list[str]:
        """SLURM ids of this sweep's jobs (array tasks A_i, or a plain id for a one-job sweep); [] before sbatch."""
        subs = list(self.base.glob("*/.submitit"))
        if not subs:
            return []
        ids = [d.name for d in subs[0].iterdir() if d.is_dir() and any(d.glob("*_submitted.pkl"))]
        return sorted(ids, key=lambda i: [int(x) for x in i.split("_")])

    def wait(self, timeout: float = SWEEP_TIMEOUT) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"sweep {self.name} did not finish within {timeout}s; stderr: {self.err.read_text()[-2000:]}")
        return rc, self.out.read_text(), self.err.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        ids = self.job_ids()
        if ids:  # our own jobs, by id (no-op for finished ones)
            _sq(self.env, "scancel", *ids)


@pytest.fixture(scope="module")
def sweeps(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm-sweeps")
    text = base / "small.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    missing = base / "missing.txt"
    env = {**cluster, "MICROGPT_CACHE": str(base / "cache")}
    started = {
        # the longest (two requeues; its test comes first and acts on the jobs while they run); job 0 resumes with ckpt_path=last, job 1 through
        # Lightning's own SLURM requeue checkpoint (hpc_ckpt_N.ckpt) with ckpt_path left at null
        "requeue": Sweep(
            "requeue",
            base,
            [
                f"data.path={text}",
                "ckpt_path=last,null",
                f"trainer.max_steps={REQUEUE_STEPS}",
                "trainer.val_check_interval=10",
                "trainer.log_every_n_steps=2",
            ],
            env,
        ),
        "two": Sweep("two", base, [f"data.path={text}", "seed=1,2"], env),
        # the bad job first: the multirun reports it (and exits) while the good one still runs
        "fail": Sweep("fail", base, [f"data.path={missing},{text}"], env),
        # DDP inside a SLURM multirun: 2 tasks (ranks) of one job, one output dir
        "ddp": Sweep("ddp", base, [f"data.path={text}", "strategy=ddp", "data.batch_size=6"], env),
    }
    yield started
    for s in started.values():
        s.stop()


def _metrics(job_dir: Path) -> list[dict[str, str]]:
    with (job_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _val_losses(job_dir: Path) -> list[float]:
    return [float(r["val_loss"]) for r in _metrics(job_dir) if r.get("val_loss")]


def _steps(job_dir: Path) -> list[int]:
    return [int(r["step"]) for r in _metrics(job_dir) if r.get("step")]


def _global_step(ckpt: Path) -> int | None:
    """global_step of a checkpoint; None while it is missing or still being written."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    except Exception:
        return None


def _summary(sweep_dir: Path, env: dict[str, str]) -> tuple[int, dict]:
    p = run_cli(["-m", "microgpt.sweep", str(sweep_dir), "--json"], timeout=120, env=env)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


# ---- tests ------------------------------------------------------------------------------------------------


def _release_if_held(env: dict[str, str], job: str) -> str:
    """A requeued job waits ~2 min (BeginTime) before it may start again; let it start now. Returns its state."""
    st = _sq(env, "squeue", "-h", "-j", job, "-o", "%T %r").strip()
    if st.startswith("PENDING") and "BeginTime" in st:
        _sq(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
    return st


@pytest.mark.slow
@pytest.mark.slurm
def test_requeued_jobs_resume_from_their_checkpoint(sweeps, cluster):
    s = sweeps["requeue"]
    ids = _wait_for("the requeue sweep's jobs", lambda: len(s.job_ids()) == 2 and s.job_ids(), 120)
    d = s.dir
    last0, last1 = d / "0" / "checkpoints" / "last.ckpt", d / "1" / "checkpoints" / "last.ckpt"

    # job 0 (ckpt_path=last): requeued from outside, the way an admin or a preemption does it
    step0 = _wait_for("job 0's first checkpoint", lambda: _global_step(last0), SWEEP_TIMEOUT)
    assert subprocess.run(["scontrol", "requeue", ids[0]], env=cluster, timeout=30).returncode == 0
    # job 1 (ckpt_path=null): the time-limit signal; Lightning saves hpc_ckpt_1.ckpt and requeues itself
    _wait_for("job 1's first checkpoint", lambda: _global_step(last1), SWEEP_TIMEOUT)
    assert subprocess.run(["scancel", "--signal=USR1", ids[1]], env=cluster, timeout=30).returncode == 0
    hpc = d / "1" / "hpc_ckpt_1.ckpt"
    step1 = _wait_for("Lightning's requeue checkpoint", lambda: _global_step(hpc), 120)

    def done() -> bool:
        for job in ids:
            _release_if_held(cluster, job)
        return s.proc.poll() is not None

    _wait_for("the requeued jobs to finish", done, SWEEP_TIMEOUT, every=1.0)
    rc, out, err = s.wait(timeout=10)
    assert rc == 0, err[-3000:]

    for job, restored, step in ((ids[0], last0, step0), (ids[1], hpc, step1)):
        jd = restored.parent.parent if restored.parent.name == "checkpoints" else restored.parent

        # SLURM ran it twice: a REQUEUED record, then the run that finished
        def history(job=job) -> list[str]:  # slurmdbd records the end a moment after the job ends
            h = _sq(cluster, "sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job).split()
            return h if h and h[-1] not in ("RUNNING", "COMPLETING", "PENDING") else []

        states = _wait_for(f"sacct to record the end of job {job}", history, 60)
        assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (job, states)
        # the rerun restored the checkpoint instead of starting over ...
        log = (jd / "train.log").read_text()
        assert f"Restored all states from the checkpoint at {restored}" in log
        # ... so no step before it was trained again: the rerun's metrics.csv starts after it
        assert step >= 10
        assert min(_steps(jd)) >= step - 1, (job, step, sorted(_steps(jd))[:5])
        assert f"`Trainer.fit` stopped: `max_steps={REQUEUE_STEPS}` reached." in log
        # the USR1 checkpoint is written inside a step (from the signal handler): Lightning counts that
        # interrupted step as started, so a run resumed from it ends one optimizer step short
        final = _global_step(jd / "checkpoints" / "last.ckpt")
        assert final == REQUEUE_STEPS if restored.name == "last.ckpt" else REQUEUE_STEPS - 1 <= final <= REQUEUE_STEPS
    assert not (d / "0" / "hpc_ckpt_1.ckpt").exists()  # an outside requeue sends no USR1


@pytest.mark.slow
@pytest.mark.slurm
def test_two_job_sweep_completes_with_checkpoints_and_metrics(sweeps, cluster):
    s = sweeps["two"]
    rc, out, err = s.wait()
    assert rc == 0, err[-3000:]
    d = s.dir
    # one job dir per combination, nothing else beside the submitit folder, the jobs' result files and Hydra's record
    assert sorted(p.name for p in d.iterdir()) == [".results", ".submitit", "0", "1", "multirun.yaml"]
    ids = s.job_ids()
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]  # one job array, two tasks
    expected = sorted(f"{i}|COMPLETED" for i in ids)

    def recorded() -> list[str]:  # slurmdbd records the end a moment after the job ends
        states = sorted(_sq(cluster, "sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)).split())
        return states if states == expected else []

    _wait_for("sacct to record both jobs as COMPLETED", recorded, 60)
    # the jobs ran the project's interpreter (submitit uses sys.executable)
    script = next((d / ".submitit").glob("*/*_submission.sh")).read_text()
    assert f"{PY} -u -m submitit.core._submit" in script
    assert "--signal=USR1@120" in script and "--cpus-per-task=1" in script and "--mem=2GB" in script
    seeds = {}
    for job in ("0", "1"):
        jd = d / job
        assert _global_step(jd / "checkpoints" / "last.ckpt") == 20
        assert (jd / "checkpoints" / "best.ckpt").is_file()
        assert len(_val_losses(jd)) == 2  # debug=fast validates at steps 10 and 20
        seeds[job] = next(o for o in (jd / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("seed="))
    assert seeds == {"0": "seed=1", "1": "seed=2"}

    # the summary: both ok, each with its own final val loss, the lower one marked best
    code, summary = _summary(d, cluster)
    assert code == 0
    final = {job: _val_losses(d / job)[-1] for job in ("0", "1")}
    assert [(j["num"], j["status"]) for j in summary["jobs"]] == [(0, "ok"), (1, "ok")]
    assert {str(j["num"]): j["val_loss"] for j in summary["jobs"]} == pytest.approx(final)
    assert summary["best"] == int(min(final, key=final.get))
    assert {j["job_id"] for j in summary["jobs"]} == set(ids)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_failing_job_does_not_lose_the_others(sweeps, cluster):
    s = sweeps["fail"]  # job 0 has a data.path that does not exist, job 1 is fine
    rc, out, err = s.wait()
    assert rc != 0  # the multirun reports the failure ...
    assert "missing.txt does not exist" in err  # ... with the job's own one-line error
    d = s.dir
    ids = s.job_ids()
    # ... while the other job goes on to the end on the cluster
    result = d / ".submitit" / ids[1] / f"{ids[1]}_0_result.pkl"
    _wait_for("the other job to finish", result.exists, SWEEP_TIMEOUT)
    ok_job = d / "1"
    assert _global_step(ok_job / "checkpoints" / "last.ckpt") == 20
    assert len(_val_losses(ok_job)) == 2

    code, summary = _summary(d, cluster)
    assert code == 0  # at least one job succeeded
    jobs = {j["num"]: j for j in summary["jobs"]}
    assert jobs[1]["status"] == "ok" and jobs[1]["val_loss"] == pytest.approx(_val_losses(ok_job)[-1])
    assert jobs[0]["status"] == "failed"
    assert "missing.txt does not exist" in jobs[0]["note"]
    assert any(o.endswith("missing.txt") for o in jobs[0]["overrides"])  # its dir is gone; overrides recomputed
    assert summary["best"] == 1

    table = run_cli(["-m", "microgpt.sweep", str(d)], timeout=120, env={**cluster, "COLUMNS": "200"})
    assert table.returncode == 0
    assert "failed" in table.stdout and "★" in table.stdout and "1 ok, 1 failed" in table.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_ddp_inside_a_slurm_multirun_uses_one_output_dir(sweeps, cluster):
    s = sweeps["ddp"]
    rc, out, err = s.wait()
    assert rc == 0, err[-3000:]
    assert len([p for p in s.base.iterdir() if p.is_dir()]) == 1  # rank 1 started no sweep of its own
    d = s.dir
    assert sorted(p.name for p in d.iterdir()) == [".results", ".submitit", "0", "multirun.yaml"]
    (job,) = s.job_ids()
    logs = sorted((d / ".submitit" / job).glob("*_log.err"))
    assert len(logs) == 2  # srun started one task per device (tasks_per_node = trainer.devices = 2)
    # Lightning logs through Hydra's console handler (stdout) in each task: read both streams of both tasks
    text = "\n".join(p.read_text() for p in (*logs, *(d / ".submitit" / job).glob("*_log.out")))
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert _global_step(d / "0" / "checkpoints" / "last.ckpt") == 20
    assert len(_val_losses(d / "0")) == 2


# ---- no cluster: one clear line, fast ----------------------------------------------------------------------


def _dead_cluster_conf(tmp_path: Path) -> Path:
    """A slurm.conf whose controller port has nothing listening (a cluster that is down)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\n"
        f"SlurmctldPort={port}\nAuthType=auth/munge\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
        "PartitionName=debug Nodes=ALL Default=YES State=UP\n"
    )
    return conf


@pytest.mark.slow
def test_launcher_without_a_reachable_cluster_fails_fast_with_one_line(tmp_path, small_text):
    sweep_dir = tmp_path / "sweep"
    t0 = time.monotonic()
    p = run_cli(
        ["train.py", "-m", *COMMON, f"data.path={small_text}", f"hydra.sweep.dir={sweep_dir}"],
        timeout=120,
        env={"SLURM_CONF": str(_dead_cluster_conf(tmp_path))},
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "SLURM" in lines[-1], p.stderr
    assert "Traceback" not in p.stderr
    assert not sweep_dir.exists()  # nothing was submitted
    assert elapsed < 90  # python start-up; sbatch alone would retry for up to a minute


def test_check_slurm_names_what_is_missing(tmp_path, monkeypatch):
    from microgpt.sweep import SlurmUnavailableError, check_slurm

    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no scontrol
    with pytest.raises(SlurmUnavailableError, match="needs SLURM's sbatch and scontrol on PATH"):
        check_slurm()
    monkeypatch.setenv("PATH", path)
    if shutil.which("sbatch") and shutil.which("scontrol"):
        monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nope.conf"))
        t0 = time.monotonic()
        with pytest.raises(SlurmUnavailableError, match="nope.conf does not exist"):
            check_slurm()
        assert time.monotonic() - t0 < 5  # scontrol itself would retry a missing config for 60 s
        monkeypatch.setenv("SLURM_CONF", str(_dead_cluster_conf(tmp_path)))
        with pytest.raises(SlurmUnavailableError, match="cannot reach the SLURM controller"):
            check_slurm(timeout_s=30)


def test_slurm_check_ignores_other_launchers(monkeypatch, tmp_path, capsys):
    from omegaconf import OmegaConf

    from microgpt.sweep import SlurmCheck

    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM at all
    basic = OmegaConf.create(
        {"hydra": {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}}
    )
    SlurmCheck().on_multirun_start(config=basic)  # not a SLURM launcher: nothing to check
    slurm = OmegaConf.create({"hydra": {"launcher": {"_target_": "hydra_plugins.x.submitit_launcher.SlurmLauncher"}}})
    with pytest.raises(SystemExit) as e:  # SystemExit: Hydra turns a callback's exceptions into warnings
        SlurmCheck().on_multirun_start(config=slurm)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: hydra/launcher=slurm needs SLURM's sbatch")


def test_launcher_config_maps_the_trainer():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", ["hydra/launcher=slurm", "strategy=ddp", "trainer.num_nodes=3"], return_hydra_config=True
        )
    cfg.hydra.sweep.dir, cfg.hydra.job.name = "/tmp/x", "train"
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # resolved the way Hydra builds the launcher (instantiate), with a plain dict in its place
    launcher = instantiate(cfg.hydra.launcher, _target_="builtins.dict", _convert_="all")
    assert launcher["tasks_per_node"] == 2 and launcher["nodes"] == 3  # = trainer.devices, trainer.num_nodes
    assert launcher["additional_parameters"]["signal"] == f"USR1@{launcher['signal_delay_s']}"
    assert launcher["submitit_folder"] == "/tmp/x/.submitit/%j"
    assert any("OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in line for line in launcher["setup"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
