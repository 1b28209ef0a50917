"""`trainer.precision=auto`: the fastest precision this machine runs safely, said in one log line.

bf16-mixed (bf16 matmuls, fp32 weights, optimizer state and loss) where the hardware has bf16 arithmetic:
  - a CUDA GPU that supports bf16 (Ampere and newer);
  - a CPU with AVX-512 bf16 or AMX (Intel Sapphire Rapids and newer, AMD Zen 4 and newer), single process:
    the baby GPT's step is ~1.5x faster there (bench/README.md), val loss unchanged (bench/results/).
Everything else gets 32-true: without bf16 instructions bf16-mixed is ~14x *slower* on a CPU (emulated), and
the CPU variants of DeepSpeed/FSDP/DDP are kept on the precision they are tested with. An explicit
trainer.precision (32-true, bf16-mixed, ...) is never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger("microgpt")

AUTO = "auto"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags (/proc/cpuinfo); torch's own probes where that file is missing (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = set()
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    return flags


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    target = getattr(strategy, "get", lambda *_: None)("_target_") if strategy is not None else None
    return str(target or type(strategy).__name__)


def choose_precision(
    accelerator: str | None = "auto",
    strategy: Any = "auto",
    devices: Any = 1,
    num_nodes: int = 1,
    *,
    cuda: bool | None = None,
    cuda_bf16: bool | None = None,
    flags: Iterable[str] | None = None,
) -> tuple[str, str]:
    """(precision, why) for `auto`. cuda / cuda_bf16 / flags default to this machine's (tests pass their own)."""
    acc = (accelerator or "auto").lower()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    on_gpu = acc in ("cuda", "gpu") or (acc == "auto" and cuda)
    if on_gpu:
        if cuda_bf16 is None:
            cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return "bf16-mixed", "a CUDA GPU with bf16"
        return "32-true", "a CUDA GPU without bf16"
    if acc not in ("cpu", "auto"):
        return "32-true", f"accelerator {accelerator}"
    have = set(cpu_flags() if flags is None else flags) & set(CPU_BF16_FLAGS)
    if not have:
        return "32-true", "a CPU without AVX-512 bf16 or AMX (bf16 would be emulated: slower)"
    name = _strategy_name(strategy).lower()
    single = name in ("auto", "singledevicestrategy") and str(devices) in ("1", "auto") and int(num_nodes) == 1
    if not single:
        return "32-true", f"a CPU with {'/'.join(sorted(have))}, but a multi-process run ({name})"
    return "bf16-mixed", f"a CPU with {'/'.join(sorted(have))}"


def resolve_precision(trainer_cfg: Any, **probe: Any) -> Any:
    """trainer_cfg.precision == auto -> the choice, logged once; any other value is returned unchanged."""
    value = trainer_cfg.get("precision", "32-true")
    if str(value).lower() != AUTO:
        return value
    precision, why = choose_precision(
        trainer_cfg.get("accelerator", "auto"),
        trainer_cfg.get("strategy", "auto"),
        trainer_cfg.get("devices", 1),
        trainer_cfg.get("num_nodes", 1),
        **probe,
    )
    log.info("trainer.precision=auto -> %s (%s); set trainer.precision=32-true to override", precision, why)
    return precision
