"""`key=value` arguments, parsed one way by every command (`python -m microgpt.consolidate|report`,
`plugins/prune/cli.py`, `plugins/qat/convert.py`): `--help` prints the help and the keys, a bad argument is a
one-line error naming the known keys."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from microgpt.errors import ConfigError, MicroGPTError


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
