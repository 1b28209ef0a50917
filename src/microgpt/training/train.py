"""Training entry point: `run(cfg)` turns a composed Hydra config into a Lightning run.

The root `train.py` is a thin @hydra.main shim around `run`; tests call `run(cfg)` directly. `_run` reads as
the sequence of steps: load and check the plugins (config time), resolve where the run starts (resume /
fine-tune), build the data, the model config, the module and the trainer, let plugins prepare, fit, report.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from microgpt import console
from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError, MicroGPTError, first_line
from microgpt.io.checkpoint import read_checkpoint
from microgpt.lean_imports import resume_gc, skip_dynamo_exit_report
from microgpt.plugin_hints import model_plugins
from microgpt.plugins import Preparer, check_plugins, load_plugins, plugin_origin

log = logging.getLogger("microgpt")


def build_from_config(node: Any, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate with a one-line error naming the config group to fix (commands and plugins
    build data modules, trainers, ... with it)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, MicroGPTError):
            raise cause from None
        msg = first_line(cause)
        raise ConfigError(f"cannot build {what}: {msg}; check the `{what}` settings") from None
    except MicroGPTError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {what}: {first_line(e)}; check the `{what}` settings") from None


_instantiate = build_from_config  # the old private name (tests, evaluate, report)


def converter_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """`model.converters` {key: {name?, order?, **options}} -> the ordered list GPTConfig records.
    Plugins add entries; composition order is kept unless an entry sets `order`."""
    raw = OmegaConf.to_container(cfg.model, resolve=True).get("converters") or {}
    if isinstance(raw, list):
        return raw
    items = [{"name": k, **(v or {})} for k, v in raw.items() if v not in (False, None)]
    specs = sorted(items, key=lambda s: s.get("order", 0))
    for s in specs:
        s.pop("order", None)
    return specs


def model_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """cfg.model (a Hydra node) -> a validated GPTConfig; converters go from {name: opts} to a list."""
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    raw.pop("converters", None)
    converters = converter_specs(cfg)
    if raw.get("vocab_size") is None:
        raw["vocab_size"] = vocab_size
    elif raw["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size={raw['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens; "
            "remove model.vocab_size or raise it"
        )
    schema = OmegaConf.structured(GPTConfig)
    try:
        typed = OmegaConf.merge(schema, {**raw, "converters": []})
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad model setting: {first_line(e)} (full key: model.{e.key})") from None
    d = OmegaConf.to_container(typed)
    d["converters"] = converters
    return GPTConfig.from_dict(d)


def _check_run_settings(cfg: DictConfig) -> None:
    def positive(key: str, value: Any) -> None:
        if value is None or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")

    positive("optimizer.lr", cfg.optimizer.get("lr"))
    positive("trainer.max_steps", cfg.trainer.get("max_steps"))
    positive("data.batch_size", cfg.data.get("batch_size"))
    if cfg.scheduler.warmup_steps < 0:
        raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {cfg.scheduler.warmup_steps}")
    shape = cfg.scheduler.get("shape", "cosine")
    if shape not in ("cosine", "linear", "wsd"):
        raise ConfigError(f"unknown scheduler.shape '{shape}'; choose one of: cosine, linear, wsd")
    if not 0 < cfg.scheduler.get("cooldown_fraction", 0.2) <= 1:
        raise ConfigError(
            f"scheduler.cooldown_fraction must be in (0, 1], got {cfg.scheduler.get('cooldown_fraction')}"
        )
    if cfg.scheduler.min_lr < 0 or cfg.scheduler.min_lr > cfg.optimizer.lr:
        raise ConfigError(
            f"scheduler.min_lr must be in [0, optimizer.lr={cfg.optimizer.lr}], got {cfg.scheduler.min_lr}"
        )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    p = cfg.get("ckpt_path")
    if p is None:
        return None
    if p == "last":
        # the newest checkpoint that loads: last.ckpt (a directory under fsdp/deepspeed), SLURM's
        # hpc_ckpt_N.ckpt, best.ckpt, ...; a truncated newest one is skipped, naming which was used
        from microgpt.training.safety import newest_valid_checkpoint

        found = newest_valid_checkpoint(Path(cfg.paths.output_dir))
        if found is not None:
            return str(found)
        log.info("ckpt_path=last: no checkpoint in %s yet, starting from scratch", cfg.paths.output_dir)
        return None
    from microgpt.io.consolidate import is_sharded_checkpoint

    if not (Path(p).is_file() or is_sharded_checkpoint(p)):
        raise CheckpointError(
            f"ckpt_path {p} does not exist; pass a .ckpt file, a sharded checkpoint directory or ckpt_path=last"
        )
    return str(p)


def _check_same_model(ckpt: dict[str, Any], cfg: GPTConfig, path: str) -> None:
    saved = GPTConfig.from_dict(dict(ckpt["hyper_parameters"]["model"])).to_dict()
    now = cfg.to_dict()
    diff = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"cannot resume {path}: the model differs from the checkpoint ({'; '.join(diff)}); "
            "use the checkpoint's model settings or start a new run"
        )


def freeze_layers(model, n: int) -> None:
    """Freeze the embeddings and the first n blocks (fine-tuning); 0 trains everything."""
    if not n:
        return
    if not 0 < n <= len(model.blocks):
        raise ConfigError(f"freeze_layers must be in 0..{len(model.blocks)}, got {n}")
    frozen = [model.wte, model.pos, *model.blocks[:n]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)


def build_callbacks(cfg: DictConfig) -> list:
    return [build_from_config(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c]


def build_loggers(cfg: DictConfig) -> list:
    return [build_from_config(c, f"logger.{k}") for k, c in (cfg.get("logger") or {}).items() if c]


def _route_lightning_logs() -> None:
    """Lightning's loggers through Hydra's handlers only: once on the console, and into the run's train.log.

    Lightning gives its loggers their own console handlers when it is imported before logging is configured;
    under Hydra every message then printed twice. Only when the root logger has handlers (a Hydra run), so
    in-process callers without logging set up keep Lightning's own output.
    """
    if not logging.getLogger().handlers:
        return
    import lightning  # noqa: F401  (its first import adds the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    console.route_console()  # third-party chatter to train.log only; log lines never glued to the progress bar


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train. Returns {'val_loss', 'best_val_loss', 'best_ckpt', 'last_ckpt', 'output_dir', 'trainer', 'module'}."""
    from microgpt.training.safety import check_settings, claim_run_dir

    _route_lightning_logs()
    out_dir = Path(cfg.paths.output_dir)
    existed = out_dir.is_dir() and any(p.name not in (".hydra", "train.log") for p in out_dir.iterdir())
    state = {"fitting": False}
    release = lambda: None  # noqa: E731
    try:
        check_settings(cfg)
        release = claim_run_dir(cfg, out_dir)  # one run per dir; a non-empty dir needs ckpt_path or overwrite
        return _run(cfg, out_dir, state)
    except MicroGPTError:
        # bad input found before training started: leave no half-made run directory behind
        if not existed and not state["fitting"]:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        release()


def _run(cfg: DictConfig, out_dir: Path, state: dict[str, bool]) -> dict[str, Any]:
    import lightning as L

    try:
        mods = load_plugins(list((cfg.get("plugins") or {}).keys()))
    except (ImportError, SyntaxError) as e:  # a broken plugin: one line, and no half-made run dir (see run())
        where = f" ({e.filename}:{e.lineno})" if isinstance(e, SyntaxError) else ""
        raise ConfigError(
            f"a plugin failed to import: {type(e).__name__}: {e}{where}; fix it or drop it from +plugin="
        ) from None
    check_plugins(cfg, mods)  # every refusable setting and combination, before anything is built
    _check_run_settings(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = resolve_start(cfg)
    dm = build_from_config(cfg.data, "data", tokenizer_obj=start.tokenizer)
    dm.setup("fit")
    mcfg = build_model_config(cfg, start, dm)
    module = build_module(cfg, mcfg, dm, mods, start)
    from microgpt.training.safety import SafetyCallback, prepare_trainer

    # signals -> resumable checkpoint; a validation at the end; the sample on every rank (sharded models)
    safety = SafetyCallback(out_dir, cfg.sample if cfg.get("print_sample") else None, dm.tokenizer)
    trainer = build_trainer(cfg, start.ckpt_path, extra_callbacks=[safety])
    prepare_trainer(trainer, out_dir)  # atomic checkpoint writes, stale temp files removed
    if trainer.is_global_zero:
        announce(cfg, module, dm, out_dir)
    prepare_plugins(trainer, module, dm)
    start.ckpt = None  # the trainer reads it again itself; don't hold two copies
    state["fitting"] = True
    t_fit = time.perf_counter()
    try:
        fit(trainer, module, dm, start.ckpt_path, out_dir)
    except SystemExit:
        if safety.stopped is not None:  # SIGTERM/SIGINT: a checkpoint was saved; the CLI says how to resume
            raise safety.stopped from None
        raise
    wall_s = time.perf_counter() - t_fit
    skip_dynamo_exit_report()  # no compile-time table formatted at exit for a logger that drops it
    result = summarize(trainer, module, out_dir)
    # the sample was printed at the end of training, by SafetyCallback (every rank generates, rank 0 prints)
    if trainer.is_global_zero:
        console.print_summary(console.train_summary(result, wall_s, trainer, dm, dm.bytes_per_token))
    return result


@dataclass
class Start:
    """Where a run starts from: a checkpoint to resume (ckpt_path), a model to fine-tune (init_model), or nothing."""

    ckpt_path: str | None = None
    ckpt: dict[str, Any] | None = None  # the resumed checkpoint's record (config, tokenizer)
    tokenizer: Any = None  # the resumed checkpoint's or the fine-tuned model's tokenizer
    init_model: Any = None  # init_from's model, until its weights are in the module


def resolve_start(cfg: DictConfig) -> Start:
    """ckpt_path (resume) and init_from (fine-tune) -> what the run starts from."""
    start = Start(ckpt_path=resolve_ckpt_path(cfg))
    if start.ckpt_path is not None:  # DeepSpeed / distcp directories: every pickled part checked before they load it
        from microgpt.safety import check_sharded_checkpoint

        check_sharded_checkpoint(start.ckpt_path, trust=bool(cfg.get("trust_checkpoint", False)))
    if start.ckpt_path is not None:
        from microgpt.io.consolidate import is_sharded_checkpoint, read_meta

        # a sharded checkpoint's config and tokenizer, without gathering its weights
        p = start.ckpt_path
        start.ckpt = read_meta(p) if is_sharded_checkpoint(p) else read_checkpoint(p)
        from microgpt.data.tokenizers import tokenizer_from_dict

        start.tokenizer = tokenizer_from_dict(start.ckpt["hyper_parameters"]["tokenizer"])
    if cfg.get("init_from") and start.ckpt is None:  # with a checkpoint to resume, that checkpoint wins
        from microgpt import load

        start.init_model, init_tok = load(cfg.init_from)
        start.tokenizer = start.tokenizer or init_tok
    if cfg.get("init_from"):
        base = start.init_model.config.block_size if start.init_model is not None else None
        if base is None and start.ckpt is not None:  # resuming a fine-tune: the checkpoint holds the base's shape
            base = start.ckpt["hyper_parameters"]["model"].get("block_size")
        _fit_data_to_base(cfg, base)
    return start


def _fit_data_to_base(cfg: DictConfig, base_block_size: int | None) -> None:
    """A fine-tune keeps its base's architecture, so a data.block_size that only follows the preset's
    model.block_size (the default `${model.block_size}`) follows the base's instead; one set explicitly is kept
    (and checked against the base in build_model_config)."""
    data = cfg.get("data")
    if base_block_size is None or data is None or "block_size" not in data:
        return
    if not OmegaConf.is_interpolation(data, "block_size") or data.block_size <= base_block_size:
        return
    from omegaconf import open_dict

    wanted = data.block_size
    with open_dict(cfg):
        cfg.data.block_size = base_block_size
    log.warning(
        "init_from: the base model's context is %d tokens, less than model.block_size=%d; training on windows of %d "
        "(set model.block_size=%d to silence this)",
        base_block_size,
        wanted,
        base_block_size,
        base_block_size,
    )


def build_model_config(cfg: DictConfig, start: Start, dm) -> GPTConfig:
    """The architecture to train: the resumed checkpoint's, the fine-tuned base's (+ this run's converters),
    or cfg.model's."""
    ckpt, init_model = start.ckpt, start.init_model
    if ckpt is not None and cfg.get("init_from"):
        # resuming a fine-tune: the architecture is the checkpoint's (it may be a pruned base)
        mcfg = GPTConfig.from_dict(dict(ckpt["hyper_parameters"]["model"]))
    elif init_model is not None:
        if dm.vocab_size > init_model.config.vocab_size:  # data=chat added its special tokens to the tokenizer
            from microgpt.data.chat_template import grow_vocab

            grow_vocab(init_model, dm.vocab_size)
        # fine-tuning keeps the base architecture (and its converters); this run may add converters
        base = init_model.config.to_dict()
        converters = base["converters"] + [c for c in converter_specs(cfg) if c not in base["converters"]]
        mcfg = GPTConfig.from_dict({**base, "dropout": cfg.model.dropout, "converters": converters})
    else:
        mcfg = model_config(cfg, dm.vocab_size)
    if mcfg.block_size < dm.block_size:
        raise ConfigError(
            f"data.block_size={dm.block_size} exceeds model.block_size={mcfg.block_size}; make them equal"
        )
    if ckpt is not None:
        _check_same_model(ckpt, mcfg, start.ckpt_path)
    return mcfg


def build_module(cfg: DictConfig, mcfg: GPTConfig, dm, mods: dict, start: Start):
    """The LightningModule, with init_from's weights in it and freeze_layers applied."""
    from microgpt.training.lit import LitGPT

    module = LitGPT(
        model=mcfg.to_dict(),
        optimizer=build_from_config(cfg.optimizer, "optimizer"),
        warmup_steps=console.warmup_steps(cfg.scheduler.warmup_steps, cfg.trainer.max_steps),
        decay_steps=cfg.scheduler.decay_steps,
        min_lr=cfg.scheduler.min_lr,
        lr_shape=cfg.scheduler.get("shape", "cosine"),
        cooldown_fraction=cfg.scheduler.get("cooldown_fraction", 0.2),
        tokenizer=dm.tokenizer.to_dict(),
        bytes_per_token=dm.bytes_per_token,
        compile=cfg.compile,
        plugins=plugin_origin(model_plugins(mods, mcfg)),  # only what rebuilding the model needs
        decay_embeddings=cfg.decay_embeddings,
    )
    init_model = start.init_model
    if init_model is not None:
        # converters this run adds (masks, ...) may own new state the base weights don't have
        missing, unexpected = module.model.load_state_dict(init_model.state_dict(), strict=False)
        if unexpected or (missing and mcfg.converters == init_model.config.converters):
            raise CheckpointError(
                f"init_from={cfg.init_from} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        start.init_model = None
    freeze_layers(module.model, cfg.get("freeze_layers", 0))
    return module


def build_trainer(cfg: DictConfig, ckpt_path: str | None, extra_callbacks: list | tuple = ()):
    """The Lightning Trainer with the configured callbacks and loggers; refuses a checkpoint this strategy
    cannot resume."""
    import lightning as L

    from microgpt.training.precision import resolve_precision
    from microgpt.training.strategies import check_resume

    loggers = build_loggers(cfg)
    callbacks = [*build_callbacks(cfg), *extra_callbacks]
    if not loggers:  # Lightning refuses an LR monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    precision = resolve_precision(cfg.trainer)  # `auto`: bf16-mixed where the hardware has bf16 arithmetic
    trainer = build_from_config(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, precision=precision
    )
    check_resume(ckpt_path, trainer.strategy)
    return trainer


def announce(cfg: DictConfig, module, dm, out_dir: Path) -> None:
    """The model's size on the console, and the composed config into the run directory (rank 0)."""
    print(console.model_line(module.model, module.model.config.vocab_size, dm.tokenizer.name), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))


def prepare_plugins(trainer, module, dm) -> None:
    """Plugin callbacks' `prepare` (the contract's Preparer), in callback order: load teachers, add converters,
    trainable parts and loss terms, check shapes."""
    for cb in trainer.callbacks:
        if isinstance(cb, Preparer):
            cb.prepare(module, dm)


def fit(trainer, module, dm, ckpt_path: str | None, out_dir: Path) -> None:
    old_metrics = out_dir / "metrics.csv"
    if ckpt_path and old_metrics.is_file() and trainer.is_global_zero:
        # CSVLogger starts metrics.csv afresh: keep the log of the steps before this resume
        old_metrics.rename(out_dir / f"metrics.before-{Path(ckpt_path).stem}-{os.getpid()}.csv")
    resume_gc()  # train.py limited the cyclic GC to young objects for its start-up
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)


def summarize(trainer, module, out_dir: Path) -> dict[str, Any]:
    ck = trainer.checkpoint_callback
    val = trainer.callback_metrics.get("val_loss")
    return {
        "val_loss": float(val) if val is not None else math.nan,
        "best_val_loss": float(ck.best_model_score) if ck is not None and ck.best_model_score is not None else math.nan,
        "best_ckpt": ck.best_model_path if ck is not None else "",
        "last_ckpt": ck.last_model_path if ck is not None else "",
        "output_dir": str(out_dir),
        "trainer": trainer,
        "module": module,
    }


def print_sample(model, tokenizer, s: DictConfig, show: bool = True) -> None:
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(s.prompt) if s.prompt else [0]
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, generator=gen)
    text = tokenizer.decode(out[0, len(ids) if s.prompt else 1 :].tolist())
    if show:
        print("\n--- sample ---\n" + s.prompt + text + "\n--------------", flush=True)
