"""What every command shares: where the configs live, `key=value` arguments with `--help`, and bad input
as one error line (`error: <problem>; <fix>`, exit status 2)."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microgpt.errors import ConfigError, MicroGPTError, first_line  # noqa: F401  (first_line: re-exported)

# configs live at the repository root (`conf/`), next to `src/`; MICROGPT_CONF overrides
CONF_DIR = Path(os.environ.get("MICROGPT_CONF", Path(__file__).resolve().parents[2] / "conf"))


def quiet_env() -> None:
    # torchao probes for CUDA kernels it can't use on CPU and says so at import; nothing is wrong
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    # Lightning warns on every run of a machine where SLURM is installed but this is not a SLURM job
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # the CSV logger writes metrics.csv into the Hydra run dir, which already holds .hydra/ and train.log by design
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


def exit_on_error(fn: Callable) -> Callable:
    """Run fn; a MicroGPTError becomes `error: <one line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MicroGPTError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def typed_value(s: str) -> Any:
    """A command-line value: int, float, null/none, true/false, else the string itself."""
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"null": None, "none": None, "true": True, "false": False}.get(s.lower(), s)


@dataclass
class Args:
    options: dict[str, Any]  # every key of the command with its value (the default when not given)
    repeated: list[tuple[str, str]] = field(default_factory=list)  # repeatable keys in the order given
    overrides: list[str] = field(default_factory=list)  # data.*, paths.*, seed=... passed on to Hydra


@dataclass
class KeyValueCommand:
    """A `python -m microgpt.X key=value ...` command's arguments, parsed one way everywhere.

    `--help` (or -h) prints `help` and the keys, and exits 0. A bad argument is a one-line `error` (ConfigError
    unless given) naming the known keys. `repeatable` keys (report's model=) may be given several times and are
    returned in order; arguments whose key starts with one of `overrides` (data, paths, seed) are returned as
    Hydra overrides.
    """

    prog: str
    help: str
    options: dict[str, Any]
    required: Sequence[str] = ()
    repeatable: Sequence[str] = ()
    overrides: Sequence[str] = ()
    typed: bool = True  # convert values with typed_value (else keep the strings)
    error: type[MicroGPTError] = ConfigError

    def keys(self) -> list[str]:
        return [*self.repeatable, *self.options] + [f"{p}.*" for p in self.overrides if p == "data"]

    def print_help(self, file=None) -> None:
        print(self.help.rstrip() + f"\n\nkeys: {', '.join(self.keys())}", file=file or sys.stdout, flush=True)

    def parse(self, argv: Sequence[str]) -> Args:
        if any(a in ("-h", "--help") for a in argv):
            self.print_help()
            sys.exit(0)
        args = Args(dict(self.options))
        for a in argv:
            key, eq, val = a.partition("=")
            if not eq:
                raise self.error(f"arguments are key=value, got {a!r}; see `{self.prog} --help`")
            if key in self.repeatable:
                args.repeated.append((key, val))
            elif key in self.options:
                args.options[key] = typed_value(val) if self.typed else val
            elif key.lstrip("+~").split(".")[0] in self.overrides:
                args.overrides.append(a)
            else:
                raise self.error(
                    f"unknown option {key!r}; options: {', '.join(self.keys())} (see `{self.prog} --help`)"
                )
        for key in self.required:
            if args.options.get(key) in (None, ""):
                raise self.error(f"{key}=PATH is required; see `{self.prog} --help`")
        return args
