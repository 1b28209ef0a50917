"""Distributed strategies: Lightning's own on GPUs, small CPU variants where Lightning refuses the CPU.

`conf/strategy/*.yaml` name the factories below (`_target_: microgpt.strategies.deepspeed`, ...). Each
returns Lightning's strategy unchanged when it will run on CUDA, and otherwise the CPU variant:

- ddp       -> lightning DDPStrategy (gloo on CPU, nccl on GPU); no variant needed.
- fsdp      -> lightning ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1): FSDP2.
               The sharding itself is `shard_for_strategy`, called by LitGPT.configure_model: it runs
               `fully_shard` on each transformer block, then on the GPT. The same code path on CPU and GPU.
- deepspeed -> lightning DeepSpeedStrategy on CUDA; CPUDeepSpeedStrategy (gloo, ZeRO 1-3) on the CPU.

Each of them bounds its rendezvous (microgpt.training.rendezvous): processes that cannot meet fail in one line within
`init_timeout_s` (trainer.strategy.init_timeout_s, 60 s) instead of hanging for the job's time limit.

Weight sharing survives every strategy because the model shares *modules*, not Parameters: the tied head
reads `wte.weight` inside GPT.forward and shared layers are the same Block called again, so no strategy
ever sees two names for one tensor (the ZeRO-3 case, which gathers per module, is handled below).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from microgpt.errors import ConfigError
from microgpt.training.rendezvous import DEFAULT_INIT_TIMEOUT_S, bound_rendezvous

# DeepSpeed JIT-compiles its CPU communication helper on first use (~30 s); keep one cache for all runs
DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "microgpt" / "torch_extensions"


def _on_cpu(accelerator: str | None) -> bool:
    """Will the trainer run on the CPU? `auto` means: CPU when there is no CUDA device."""
    acc = (accelerator or "auto").lower()
    if acc == "cpu":
        return True
    if acc in ("cuda", "gpu"):
        return False
    if acc == "auto":
        return not torch.cuda.is_available()
    raise ConfigError(f"strategy: unsupported trainer.accelerator={accelerator!r}; use auto, cpu, cuda or gpu")


def _available(cpu: bool) -> int:
    if cpu:
        try:
            return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
        except AttributeError:
            return os.cpu_count() or 1
    return torch.cuda.device_count()


def _check_devices(devices: Any, num_nodes: int, accelerator: str | None) -> int:
    """Processes per node the trainer will start, after checking this node can hold them. Returns the world size.

    On GPUs one process per visible GPU; on the CPU one per core (more only oversubscribes the cores: the
    gloo collectives then spin against each other and a run crawls instead of failing).
    """
    cpu = _on_cpu(accelerator)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        n = int(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        n = devices
    elif devices == "auto":
        n = -1
    else:
        raise ConfigError(f"trainer.devices={devices!r} is not a number of devices; pass e.g. trainer.devices=2")
    have = _available(cpu)
    if not cpu and have == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer.accelerator=cpu (or auto)"
        )
    if n == -1:  # all of them
        n = 1 if cpu else have
    if n < 1:
        raise ConfigError(f"trainer.devices must be >= 1 (or -1 / auto), got {devices!r}")
    if n > have:
        what = f"{have} CPU core(s)" if cpu else f"{have} visible GPU(s)"
        raise ConfigError(
            f"trainer.devices={n} processes but this machine has {what}; use trainer.devices<={have} per node "
            "(and trainer.num_nodes for more machines)"
        )
    return n * int(num_nodes)


# ---- DDP ------------------------------------------------------------------------------------------------


def ddp(
    devices: Any = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    **kwargs: Any,
) -> DDPStrategy:
    """Lightning's DDPStrategy (gloo on CPU, nccl on CUDA), rendezvous bounded; devices are checked first."""
    _check_devices(devices, num_nodes, accelerator)
    return bound_rendezvous(DDPStrategy(**kwargs), init_timeout_s)


# ---- FSDP2 ----------------------------------------------------------------------------------------------


def fsdp(
    devices: Any = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    **kwargs: Any,
) -> ModelParallelStrategy:
    """FSDP2 through Lightning's ModelParallelStrategy: every process holds 1/world of each block.

    Lightning's FSDPStrategy (FSDP1) refuses the CPU; FSDP2 (`fully_shard`) runs on both, so one code path
    serves laptops and GPU nodes. Pure data parallelism: data_parallel_size = all processes, tensor 1.
    """
    world = _check_devices(devices, num_nodes, accelerator)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, **kwargs)
    return bound_rendezvous(strategy, init_timeout_s)


def shards_parameters(strategy: Any) -> str | None:
    """Does this strategy shard parameters across ranks? Its name if so (FSDP, DeepSpeed ZeRO stage 3), else None.

    The one answer for plugins that need whole weight matrices on every rank (`needs_full_weights`).
    `strategy` is `trainer.strategy` as configured: a name ("auto", "ddp", "fsdp", "deepspeed_stage_3"), a
    `_target_` node (conf/strategy/*.yaml) or a built Lightning strategy.
    """
    if strategy is None:
        return None
    if isinstance(strategy, ModelParallelStrategy):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        return f"{type(strategy).__name__} stage 3" if strategy.zero_stage_3 else None
    from omegaconf import OmegaConf

    if OmegaConf.is_config(strategy):
        strategy = OmegaConf.to_container(strategy, resolve=False)
    if isinstance(strategy, dict):
        name = str(strategy.get("_target_", "")).lower()
        if "fsdp" in name or "modelparallel" in name:
            return name
        if "deepspeed" in name and strategy.get("stage") == 3:
            return f"{name} stage 3"
        return None
    name = str(strategy).lower()
    if "fsdp" in name or "modelparallel" in name or ("deepspeed" in name and "stage_3" in name):
        return name
    return None


def shard_for_strategy(module) -> None:
    """Apply per-strategy model sharding in LitGPT.configure_model (no-op for single process/DDP/DeepSpeed).

    Under ModelParallelStrategy: `fully_shard` each block of `module.model.blocks`, then `module.model`
    (the root unit holds wte, pos and norm_f, so the tied head all-gathers wte with the root), then any
    other trainable child of the LightningModule (a plugin's projection) so its gradients are reduced too.
    """
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if isinstance(strategy, ModelParallelStrategy):
        _fully_shard(module, strategy)
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        _register_zero3_external_params(module)


def _fully_shard(module, strategy: ModelParallelStrategy) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    gpt = module.model
    if isinstance(gpt, FSDPModule):
        return  # configure_model runs again for validate/test after fit: already sharded
    mesh = strategy.device_mesh["data_parallel"]
    for block in gpt.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(gpt, mesh=mesh)
    for child in module.children():
        if child is gpt or isinstance(child, FSDPModule):
            continue
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)


def _register_zero3_external_params(module) -> None:
    """ZeRO-3 gathers a module's parameters around *that module's* forward. The tied head reads wte.weight
    in GPT.forward, outside the embedding's forward: register it as an external parameter of the GPT so
    ZeRO-3 gathers it there too (DeepSpeed's documented way to tie weights)."""
    import deepspeed

    gpt = module.model
    if getattr(gpt, "lm_head", None) is None:
        deepspeed.zero.register_external_parameter(gpt, gpt.wte.weight)


# ---- DeepSpeed ------------------------------------------------------------------------------------------


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on CPU processes (gloo, ZeRO 1-3), for laptops and CI.

    Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs on its CPU accelerator. Three changes:
    (1) set up the environment like DDPStrategy instead of the CUDA guard, (2) skip the CUDA device-index
    check in `setup_distributed`, (3) give `deepspeed.initialize` the local rank as `device_rank` (a CPU
    device has no index).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:  # (1)
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # (2)
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _ds_args(self) -> argparse.Namespace:  # (3)
        return argparse.Namespace(device_rank=self.local_rank)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._ds_args(),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=self._ds_args(),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )

    def teardown(self) -> None:
        super().teardown()
        # DeepSpeed's shared-memory allreduce leaves ~66 MB per rank in /dev/shm; every rank removes its own
        # (named after uid, MASTER_ADDR, MASTER_PORT and rank: other runs' buffers are never touched)
        f = _shm_buffer(self.global_rank)
        if f is not None:
            f.unlink(missing_ok=True)


def _shm_buffer(rank: int) -> Path | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not hasattr(os, "getuid"):
        return None
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def deepspeed(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    devices: Any = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    **kwargs: Any,
) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO `stage` (1-3): Lightning's DeepSpeedStrategy on CUDA, CPUDeepSpeedStrategy on the CPU.

    With offload_optimizer, optimizer states and the step live in CPU memory (ZeRO-Offload); the model's
    torch AdamW is allowed there (DeepSpeedCPUAdam is faster on GPU nodes but costs a JIT build).
    """
    if stage not in (1, 2, 3):
        raise ConfigError(f"strategy: DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage!r}")
    if offload_parameters and stage != 3:
        raise ConfigError("strategy: offload_parameters needs ZeRO stage 3; set stage=3 or offload_optimizer only")
    _check_devices(devices, num_nodes, accelerator)
    # DeepSpeed wants the per-device micro batch; Lightning reads it off a batch sampler our loaders lack
    if kwargs.get("logging_batch_size_per_gpu", "auto") == "auto":
        kwargs["logging_batch_size_per_gpu"] = 1
    cls = CPUDeepSpeedStrategy if _on_cpu(accelerator) else DeepSpeedStrategy
    strategy = cls(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs)
    if offload_optimizer and isinstance(strategy.config, dict):
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return bound_rendezvous(strategy, init_timeout_s)


# ---- resuming -------------------------------------------------------------------------------------------


def check_resume(ckpt_path: str | os.PathLike | None, strategy: Any) -> None:
    """Fail before training when a checkpoint cannot be resumed under this strategy, saying what to do.

    Sharded checkpoints resume only under the strategy that wrote them (DeepSpeed directory -> deepspeed*,
    distcp directory -> fsdp); a single file resumes anywhere except DeepSpeed, which reads only its own
    directories. `python -m microgpt.consolidate` turns a sharded checkpoint into a single file.
    """
    if ckpt_path is None:
        return
    from microgpt.errors import CheckpointError
    from microgpt.io.consolidate import is_deepspeed_checkpoint, is_distcp_checkpoint

    p = Path(ckpt_path)
    name = type(strategy).__name__
    if is_deepspeed_checkpoint(p) and not isinstance(strategy, DeepSpeedStrategy):
        raise CheckpointError(
            f"{p} is a DeepSpeed checkpoint; resume it with strategy=deepspeed* (this run uses {name}), or "
            f"consolidate it first: python -m microgpt.consolidate ckpt={p} out=model.ckpt"
        )
    if is_distcp_checkpoint(p) and not isinstance(strategy, ModelParallelStrategy):
        raise CheckpointError(
            f"{p} is a sharded FSDP checkpoint; resume it with strategy=fsdp (this run uses {name}), or "
            f"consolidate it first: python -m microgpt.consolidate ckpt={p} out=model.ckpt"
        )
    if p.is_file() and isinstance(strategy, DeepSpeedStrategy):
        raise CheckpointError(
            f"DeepSpeed resumes only from its own checkpoint directories, not the single file {p}; resume this "
            "file with strategy=ddp, strategy=fsdp or one process (strategy=auto)"
        )
