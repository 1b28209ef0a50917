"""A bounded rendezvous: processes that cannot meet fail in one line within `init_timeout_s`, never hang.

Every distributed strategy (`strategy=ddp|fsdp|deepspeed*`) starts by having all processes meet at
MASTER_ADDR:MASTER_PORT (under SLURM, Lightning's SLURMEnvironment derives them: the first node of
SLURM_NODELIST and 15000 + the job id's last 4 digits). Lightning gives that meeting the collective timeout
(30 min), so a node name that does not resolve or a port nobody can reach used to hang a job for its whole
time limit. `bound_rendezvous` (applied to every strategy by microgpt.training.strategies) changes only that step,
and only where the processes are started from outside (SLURM's srun, torchrun, by hand on each node: every
multi-node run); processes that Lightning starts itself on one machine keep Lightning's timeout:

- MASTER_ADDR is resolved first: a name this node cannot resolve fails at once (no waiting);
- process-group init runs with `init_timeout_s` (trainer.strategy.init_timeout_s, 60 s by default);
  torch's own timeout error becomes one `error:` line naming rank, node, address and the fix;
- once every process has joined, the collective timeout goes back to the strategy's own (Lightning's
  30 min default), so slow steps, checkpoint writes or evaluation on one rank are not cut short.
"""

from __future__ import annotations

import os
import socket
import time
import types
from datetime import timedelta
from typing import Any

from microgpt.errors import ConfigError, MicroGPTError

DEFAULT_INIT_TIMEOUT_S = 60.0
DOCS = "docs/slurm.md"


class RendezvousError(MicroGPTError):
    """The processes of a distributed run could not all meet (process-group initialisation failed)."""


def check_init_timeout(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not t > 0:
        raise ConfigError(f"trainer.strategy.init_timeout_s must be a number of seconds > 0, got {value!r}")
    return t


def _where(rank: int, world: int) -> str:
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return f"rank {rank} of {world} (node {node})"


def _fix(timeout_s: float) -> str:
    return (
        "make every node resolve and reach MASTER_ADDR:MASTER_PORT (DNS or /etc/hosts, firewall, "
        "NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), or raise trainer.strategy.init_timeout_s "
        f"(now {timeout_s:g}) when processes start far apart; see {DOCS}"
    )


def resolve_master(addr: str, timeout_s: float, where: str) -> None:
    """Fail at once when MASTER_ADDR is a name this node cannot resolve; retry a temporary DNS failure until
    timeout_s. (torch would retry a failed lookup until its timeout with a warning per try.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(addr, None)
            return
        except socket.gaierror as e:
            if e.errno != socket.EAI_AGAIN or time.monotonic() >= deadline:
                raise RendezvousError(
                    f"{where} cannot resolve MASTER_ADDR={addr} ({e.strerror}), so it cannot join the process "
                    f"group; add {addr} to DNS or /etc/hosts on every node, or set MASTER_ADDR to an address "
                    f"every node reaches; see {DOCS}"
                ) from None
            time.sleep(1.0)


def explain(err: BaseException, addr: str, port: str, timeout_s: float, where: str, rank: int | None = None) -> str:
    """One line for torch's rendezvous failure `err`."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    if "waiting for clients" in first:  # rank 0: the TCP store's server, the others never (all) connected
        cause = f"the other processes did not all connect ({first.rstrip('.')})"
    elif "timed out" in first.lower() and rank == 0:  # rank 0 serves the rendezvous on MASTER_PORT itself
        cause = f"nothing accepted the connection, so {addr} is not an address of this node that it can reach"
    elif "timed out" in first.lower():
        cause = "nothing accepted the connection (is rank 0 running, and is that address reachable from here?)"
    else:
        cause = first.rstrip(".")
    return (
        f"{where} could not join the process group at {addr}:{port} within {timeout_s:g} s: {cause}; {_fix(timeout_s)}"
    )


def bound_rendezvous(strategy: Any, init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> Any:
    """Give a Lightning strategy (anything with `_timeout` and `setup_distributed`: DDP, ModelParallel,
    DeepSpeed) a bounded rendezvous. The strategy keeps its class: only this instance's setup_distributed
    is wrapped. Returns the strategy."""
    strategy.init_timeout_s = check_init_timeout(init_timeout_s)
    strategy.setup_distributed = types.MethodType(_bounded_setup_distributed, strategy)
    return strategy


def _bounded_setup_distributed(self: Any) -> None:
    import torch.distributed as dist

    env = self.cluster_environment
    if env is None or not env.creates_processes_externally:
        # Lightning starts the other processes itself, on this machine: they meet on loopback, and the wait
        # is their start-up time (imports), which a loaded machine can stretch past a short bound
        type(self).setup_distributed(self)
        return
    rank, world = env.global_rank(), env.world_size()
    where = _where(rank, world)
    resolve_master(env.main_address, self.init_timeout_s, where)
    collective = self._timeout
    self._timeout = timedelta(seconds=self.init_timeout_s)
    try:
        type(self).setup_distributed(self)
    except dist.DistError as e:
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        raise RendezvousError(explain(e, addr, port, self.init_timeout_s, where, rank)) from None
    finally:
        self._timeout = collective
    restore_collective_timeout(collective)


def restore_collective_timeout(timeout: timedelta | None) -> None:
    """Give the initialised default process group (and its store) the strategy's collective timeout back."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if timeout is None or not dist.is_initialized():
        return
    c10d._set_pg_timeout(timeout)
    store = c10d._get_default_store()
    if store is not None:
        store.set_timeout(timeout)
