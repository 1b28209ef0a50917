"""Multi-node training on a REAL two-node SLURM cluster, and the bounded rendezvous.

The cluster is `MICROGPT_SLURM_NODES=2 make slurm-up` (scripts/local_slurm.sh: nodes n1 and n2, one slurmd -N
each, on this machine; .ci/run starts it). Every job here asks for 2 nodes x 1 task (trainer.num_nodes=2,
trainer.devices=1), so SLURM places rank 0 on n1 and rank 1 on n2, Lightning's SLURMEnvironment sets
MASTER_ADDR=n1, and the two processes meet over TCP as they would on two machines. Without a 2-node cluster
these tests skip with the reason, except under MICROGPT_REQUIRE_SLURM=1 (CI), where they fail.

The references are independent of the code under test: a plain PyTorch loop on one process over the same
global batch (the two ranks' batches stacked, as in tests/test_strategies.py), and the uninterrupted 2-node
run for the resumed ones. All sweeps are submitted together on first use so they share the cluster.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import PY, ROOT, run_cli
from test_slurm import (  # noqa: F401  (cluster: the module's fixture, shared)
    COMMON,
    SWEEP_TIMEOUT,
    _global_step,
    _release_if_held,
    _sq,
    _summary,
    _wait_for,
    cluster,
)
from test_strategies import _plain_loop, deepspeed_ready  # noqa: F401  (deepspeed_ready: fixture)

STEPS = 150  # the 2-node DDP runs: long enough that a requeue lands while the job trains
ZERO_STEPS, ZERO_RESUMED = 20, 30  # the ZeRO-2 run, then the same job resumed with ckpt_path=last
BATCH, SEED, LOSS_ATOL = 6, 1337, 1e-5
BAD_ADDR, BAD_TIMEOUT_S = "192.0.2.1", 10  # TEST-NET-1 (RFC 5737): an address nothing answers on
TWO_NODES = [
    "trainer.num_nodes=2",
    "trainer.devices=1",
    f"data.batch_size={BATCH}",
    f"scheduler.decay_steps={STEPS}",  # one lr schedule for every run here and the reference
    "callbacks.lr_monitor=null",
]


# ---- the cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(cluster) -> list[str]:  # noqa: F811
    # a node still finishing the previous module's jobs reports "comp" (completing) for a few seconds: it is up
    deadline = time.monotonic() + 60
    while True:
        out = _sq(cluster, "sinfo", "-h", "-N", "-o", "%N %t")
        states = {"idle", "mix", "alloc", "comp"}
        up = sorted({n for n, t in (ln.split() for ln in out.splitlines()) if t.rstrip("*~#$@^-") in states})
        if len(up) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    if len(up) < 2:
        msg = (
            f"the SLURM cluster has {len(up)} node(s) up ({up}); the multi-node tests need 2: start it with "
            "`MICROGPT_SLURM_NODES=2 make slurm-up` (as root; `make slurm-down` first if one node is up), see docs/slurm.md"
        )
        if os.environ.get("MICROGPT_REQUIRE_SLURM") == "1":
            pytest.fail(msg + " [MICROGPT_REQUIRE_SLURM=1: CI must run these tests]")
        pytest.skip(msg)
    return up


class Sweep:
    """`python train.py -m ...` into a fixed sweep dir (so a second submission resumes the same job dir)."""

    def __init__(self, name: str, sweep_dir: Path, overrides: list[str], env: dict[str, str]) -> None:
        self.name, self.dir, self.env = name, sweep_dir, env
        self.out, self.err = sweep_dir.parent / f"{name}.out", sweep_dir.parent / f"{name}.err"
        args = [*COMMON, *TWO_NODES, *overrides, f"hydra.sweep.dir={sweep_dir}"]
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen(
                [PY, "train.py", "-m", *args], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=o, stderr=e
            )

    def job_id(self) -> str | None:
        """The SLURM id of this submission's job (the newest submitit folder); None before sbatch."""
        subs = [d for d in (self.dir / ".submitit").glob("*") if d.is_dir() and any(d.glob("*_submitted.pkl"))]
        return max(subs, key=lambda d: int(d.name.split("_")[0])).name if subs else None

    def wait(self, timeout: float = SWEEP_TIMEOUT) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"sweep {self.name} did not finish within {timeout}s; stderr: {self.err.read_text()[-2000:]}")
        return rc, self.err.read_text()

    def stop(self) -> None:
        """Stop a sweep that is still waiting for its job, and cancel that job (ours, by id)."""
        if self.proc.poll() is not None:
            return  # finished: its job has written its result
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        jid = self.job_id()
        if jid:
            _sq(self.env, "scancel", jid)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-multinode")


def _small_text(path: Path) -> Path:
    """~60 KB of the embedded corpus (this Python's standard library source): no download, no ../shared."""
    from microgpt.data.sources import stdlib_source

    path.write_text(stdlib_source(max_bytes=60_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text(base) -> Path:
    return _small_text(base / "small.txt")


@pytest.fixture(scope="module")
def env(cluster, base, deepspeed_ready) -> dict[str, str]:  # noqa: F811
    # the jobs inherit the submitter's environment (sbatch --export=ALL): the token cache and DeepSpeed's
    # JIT-built helper (built once by deepspeed_ready) on the file system both nodes share
    return {
        **cluster,
        "MICROGPT_CACHE": str(base / "cache"),
        "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
    }


@pytest.fixture(scope="module")
def sweeps(nodes, env, base, text):
    data = [f"data.path={text}"]
    started = {
        # the uninterrupted 2-node DDP run: compared with one process, and the reference for the requeued copy
        "ddp": Sweep("ddp", base / "ddp", [*data, "strategy=ddp", f"trainer.max_steps={STEPS}"], env),
        # the same job, requeued from outside while it trains; ckpt_path=last makes the rerun resume
        "requeue": Sweep(
            "requeue", base / "requeue", [*data, "strategy=ddp", f"trainer.max_steps={STEPS}", "ckpt_path=last"], env
        ),
        # ZeRO-2 over 2 nodes (its second half, resumed with ckpt_path=last, is submitted by its test)
        "zero2": Sweep("zero2", base / "zero2", [*data, "strategy=deepspeed", f"trainer.max_steps={ZERO_STEPS}"], env),
        # ranks told to meet where nothing answers: both must fail in one line within init_timeout_s
        "unreachable": Sweep(
            "unreachable",
            base / "unreachable",
            [*data, "strategy=ddp", "trainer.max_steps=20", f"trainer.strategy.init_timeout_s={BAD_TIMEOUT_S}"],
            {**env, "MASTER_ADDR": BAD_ADDR},
        ),
    }
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def reference(sweeps, text) -> dict:
    """Rank 0's loss per step of a plain PyTorch loop on ONE process over the 2-node runs' global batch
    (rank 0's and rank 1's batch k stacked), STEPS steps of the same lr schedule; the model as the ddp run
    built it (its hparams.yaml); `alone`: rank 0 training on its half only (20 steps)."""
    import yaml

    from microgpt.data import TokenDataModule

    rc, err = sweeps["ddp"].wait()
    assert rc == 0, err[-3000:]
    hp = yaml.safe_load((sweeps["ddp"].dir / "0" / "hparams.yaml").read_text())["model"]
    dm = TokenDataModule(source="text", path=str(text), block_size=32, batch_size=BATCH, seed=SEED)
    dm.setup()
    batches = [[dm.train_dataset(rank=r).batch(k) for r in (0, 1)] for k in range(STEPS)]
    return {
        "loss": [losses[0] for losses in _plain_loop(hp, batches, STEPS)],
        "alone": [losses[0] for losses in _plain_loop(hp, [b[:1] for b in batches[:20]], 20)],
    }


# ---- reading a job ----------------------------------------------------------------------------------------


def _train_losses(path: Path) -> dict[int, float]:
    with path.open(newline="") as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")}


def _task_logs(sweep_dir: Path, job: str) -> dict[int, str]:
    """task (= global rank here) -> its stdout + stderr, as submitit wrote them."""
    folder = sweep_dir / ".submitit" / job
    return {
        t: "".join(p.read_text() for p in (folder / f"{job}_{t}_log.out", folder / f"{job}_{t}_log.err") if p.exists())
        for t in (0, 1)
    }


def _placement(env: dict[str, str], job: str) -> str:
    """`NNodes NodeList` of a job, from SLURM's accounting."""
    return _sq(env, "sacct", "-n", "-X", "-P", "-o", "NNodes,NodeList", "-j", job).strip().replace("|", " ")


def _check_two_nodes(sweep: Sweep, job: str, env: dict[str, str]) -> None:
    """The job ran on 2 SLURM nodes, one rank on each: rank 0 on the first node, rank 1 on the second."""
    assert _placement(env, job) == "2 n[1-2]"
    logs = _task_logs(sweep.dir, job)
    for rank in (0, 1):
        assert f"node={rank}(2), global_rank={rank}(2)" in logs[rank]  # submitit's JobEnvironment per task
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs[rank]


def _steps_match(logged: dict[int, float], ref: list[float], steps: range) -> None:
    assert sorted(logged) == list(steps)
    worst = max(abs(logged[k] - ref[k]) for k in steps)
    assert worst <= LOSS_ATOL, f"max |loss - reference| = {worst:.2e} over steps {steps}"


# ---- tests ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.slurm
def test_requeued_two_node_job_resumes_from_its_checkpoint_on_both_nodes(sweeps, env):
    s, ref_run = sweeps["requeue"], sweeps["ddp"]
    job = _wait_for("the requeue job to be submitted", s.job_id, 120)
    last = s.dir / "0" / "checkpoints" / "last.ckpt"
    step = _wait_for("its first checkpoint", lambda: _global_step(last), SWEEP_TIMEOUT)
    # requeued from outside while it trains (an admin, a preemption): SLURM kills both tasks, runs the job again
    assert subprocess.run(["scontrol", "requeue", job], env=env, timeout=30).returncode == 0

    def done() -> bool:
        _release_if_held(env, job)
        return s.proc.poll() is not None

    _wait_for("the requeued job to finish", done, SWEEP_TIMEOUT, every=1.0)
    rc, err = s.wait(timeout=10)
    assert rc == 0, err[-3000:]

    def history() -> list[str]:  # slurmdbd records the end a moment after the job ends
        h = _sq(env, "sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job).split()
        return h if h and h[-1] not in ("RUNNING", "COMPLETING", "PENDING") else []

    states = _wait_for(f"sacct to record the end of job {job}", history, 60)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    _check_two_nodes(s, job, env)
    jd = s.dir / "0"
    log = (jd / "train.log").read_text()
    assert f"Restored all states from the checkpoint at {last}" in log
    # both ranks started twice (the first run and the rerun) and met again
    assert log.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2 and log.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 2
    rc_, _ = ref_run.wait()
    assert rc_ == 0
    # the rerun started at the checkpoint (no step trained twice) and trained exactly as the uninterrupted
    # run did from there: weights, Adam state and data position restored on BOTH ranks (a rank that started
    # over would diverge from the reference at once)
    rerun = _train_losses(jd / "metrics.csv")
    assert step >= 10 and min(rerun) >= step - 1, (step, sorted(rerun)[:3])
    _steps_match(
        rerun, [_train_losses(ref_run.dir / "0" / "metrics.csv")[k] for k in range(STEPS)], range(min(rerun), STEPS)
    )
    assert _global_step(last) == STEPS


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_ddp_and_zero2_match_one_process_at_the_same_global_batch(sweeps, env, reference):
    for name, steps in (("ddp", STEPS), ("zero2", ZERO_STEPS)):
        s = sweeps[name]
        rc, err = s.wait()
        assert rc == 0, f"{name}: {err[-3000:]}"
        _check_two_nodes(s, s.job_id(), env)
        _steps_match(_train_losses(s.dir / "0" / "metrics.csv"), reference["loss"], range(steps))
    assert _global_step(sweeps["ddp"].dir / "0" / "checkpoints" / "last.ckpt") == STEPS
    # the reference can tell: rank 0 training alone on its half of the batch drifts away from it
    assert max(abs(a - b) for a, b in zip(reference["alone"], reference["loss"])) > 100 * LOSS_ATOL


@pytest.mark.slow
@pytest.mark.slurm
def test_ckpt_path_last_resumes_a_two_node_zero2_job(sweeps, env, reference):
    first = sweeps["zero2"]
    rc, err = first.wait()
    assert rc == 0, err[-3000:]
    first_job = first.job_id()
    # the same sweep again, longer, with ckpt_path=last: the job dir's DeepSpeed checkpoint (one shard per rank)
    again = Sweep(
        "zero2-resumed",
        first.dir,
        [
            f"data.path={first.dir.parent / 'small.txt'}",
            "strategy=deepspeed",
            f"trainer.max_steps={ZERO_RESUMED}",
            "ckpt_path=last",
        ],
        env,
    )
    try:
        rc, err = again.wait()
    finally:
        again.stop()
    assert rc == 0, err[-3000:]
    job = again.job_id()
    assert job != first_job
    _check_two_nodes(again, job, env)
    jd = first.dir / "0"
    log = (jd / "train.log").read_text()
    assert f"Restored all states from the checkpoint at {jd / 'checkpoints' / 'last.ckpt'}" in log
    assert f"`Trainer.fit` stopped: `max_steps={ZERO_RESUMED}` reached." in log
    # steps 20..29 continue the single-process reference: both ranks' optimizer shards were restored
    _steps_match(_train_losses(jd / "metrics.csv"), reference["loss"], range(ZERO_STEPS, ZERO_RESUMED))


def _log_time(line: str) -> float:
    """Epoch seconds of a `[2026-01-01 12:00:00,123][...]` log line (local time, as the job wrote it)."""
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
    assert stamp, line
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
@pytest.mark.slurm
def test_unreachable_rendezvous_fails_both_nodes_in_one_line_within_the_timeout(sweeps, env):
    s = sweeps["unreachable"]
    rc, err = s.wait()
    assert rc != 0
    job = s.job_id()
    folder = s.dir / ".submitit" / job
    for rank in (0, 1):
        errf = folder / f"{job}_{rank}_log.err"
        # the task's own lines (srun adds its "task N: Exited with exit code 2" to task 0's stderr)
        lines = [ln for ln in errf.read_text().splitlines() if ln.strip() and not ln.startswith("srun: ")]
        assert lines[-1].startswith(
            f"error: rank {rank} of 2 (node n{rank + 1}) could not join the process group at {BAD_ADDR}:"
        )
        assert f"within {BAD_TIMEOUT_S} s" in lines[-1] and "trainer.strategy.init_timeout_s" in lines[-1]
        assert "Traceback" not in errf.read_text()
        # from Lightning's "Initializing distributed" to the last write to stderr (for task 0 that is srun's
        # line after both tasks ended): the timeout plus torch's retry and a loaded machine, not Lightning's 30 min
        text = errf.read_text() + (folder / f"{job}_{rank}_log.out").read_text()
        start = next(ln for ln in text.splitlines() if f"GLOBAL_RANK: {rank}, MEMBER" in ln)
        waited = errf.stat().st_mtime - _log_time(start)
        assert BAD_TIMEOUT_S - 1 <= waited <= BAD_TIMEOUT_S + 60, waited
    assert f"could not join the process group at {BAD_ADDR}:" in err  # the multirun reports the job's line


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_jobs_are_summarised_by_microgpt_sweep(sweeps, env):
    for name in ("ddp", "unreachable"):
        sweeps[name].wait()
    ok_sweep = sweeps["ddp"]
    code, summary = _summary(ok_sweep.dir, env)
    assert code == 0
    (j,) = summary["jobs"]
    with (ok_sweep.dir / "0" / "metrics.csv").open(newline="") as f:
        vals = [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert (j["status"], j["job_id"], j["steps"]) == ("ok", ok_sweep.job_id(), STEPS)
    assert j["val_loss"] == pytest.approx(vals[-1]) and summary["best"] == 0
    code, summary = _summary(sweeps["unreachable"].dir, env)
    assert code == 1  # no job succeeded
    (j,) = summary["jobs"]
    assert j["status"] == "failed" and f"could not join the process group at {BAD_ADDR}:" in j["note"]


# ---- the bounded rendezvous without a cluster ---------------------------------------------------------------


def test_an_unresolvable_master_addr_fails_at_once_naming_it():
    from microgpt.training.rendezvous import RendezvousError, resolve_master

    t0 = time.monotonic()
    with pytest.raises(RendezvousError) as e:
        resolve_master("n9.invalid", 60, "rank 1 of 2 (node n2)")
    assert time.monotonic() - t0 < 30  # a name that does not exist is not retried for the whole timeout
    msg = str(e.value)
    assert msg.startswith("rank 1 of 2 (node n2) cannot resolve MASTER_ADDR=n9.invalid")
    assert "/etc/hosts" in msg and "\n" not in msg
    resolve_master("127.0.0.1", 1, "rank 0")  # an address resolves: no error


def test_init_runs_with_the_init_timeout_then_collectives_get_theirs_back(monkeypatch):
    """A real (1-process, gloo) process group through the ddp factory: init sees init_timeout_s, the group
    afterwards has Lightning's collective timeout (30 min) so slow steps are not cut short. Processes that
    Lightning starts itself (not srun/torchrun) keep Lightning's timeout for init too."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator
    from torch.distributed import distributed_c10d as c10d

    from microgpt.training import strategies

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("LOCAL_RANK", "0")  # started from outside (as by srun or torchrun): the bound applies
    seen = {}
    real_init = dist.init_process_group

    def init(*args, **kwargs):
        seen["timeout"] = kwargs.get("timeout")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init)
    s = strategies.ddp(devices=1, accelerator="cpu", init_timeout_s=7)
    s.accelerator, s.parallel_devices, s.cluster_environment = (
        CPUAccelerator(),
        [torch.device("cpu")],
        LightningEnvironment(),
    )
    try:
        s.setup_distributed()
        assert seen["timeout"] == timedelta(seconds=7)
        gloo = c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert gloo.options._timeout == timedelta(minutes=30) == s._timeout
        assert c10d._get_default_store().timeout == timedelta(minutes=30)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # processes that Lightning starts itself on this machine meet on loopback: Lightning's timeout stays
    monkeypatch.delenv("LOCAL_RANK")
    s = strategies.ddp(devices=1, accelerator="cpu", init_timeout_s=7)
    s.accelerator, s.parallel_devices = CPUAccelerator(), [torch.device("cpu")]
    s.cluster_environment = LightningEnvironment()
    try:
        s.setup_distributed()
        assert seen["timeout"] == timedelta(minutes=30)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_init_timeout_must_be_positive():
    from microgpt.errors import ConfigError
    from microgpt.training import strategies

    for bad in (0, -5, "soon", None):
        with pytest.raises(ConfigError, match="trainer.strategy.init_timeout_s must be a number of seconds > 0"):
            strategies.ddp(devices=1, accelerator="cpu", init_timeout_s=bad)


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_fails_in_one_line_within_the_timeout(tmp_path):
    """`train.py` as rank 1 of 2 (node rank 1, as on a second machine) whose rank 0 never starts: the shipped
    ddp config with only the timeout shortened; one error line after ~init_timeout_s, not a hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "1", "LOCAL_RANK": "0"}
    small = _small_text(tmp_path / "small.txt")
    args = ["train.py", "model=nano", "data=text", f"data.path={small}", "strategy=ddp", "trainer.devices=1"]
    args += ["trainer.num_nodes=2", "trainer.strategy.init_timeout_s=5", f"hydra.run.dir={tmp_path / 'run'}"]
    p = run_cli(args, timeout=240, env=env)
    end = time.time()
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: rank 1 of 2 (node {socket.gethostname()}) could not join the process group ")
    assert f"at 127.0.0.1:{port} within 5 s" in lines[-1] and "Traceback" not in p.stderr
    start = next(ln for ln in p.stdout.splitlines() if "GLOBAL_RANK: 1, MEMBER: 2/2" in ln)
    assert 4 <= end - _log_time(start) <= 5 + 30
