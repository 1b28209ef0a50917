"""User-facing errors. The CLI prints `error: <msg>` for any MicroGPTError and exits with status 2.

Every message is one line that names the problem and the fix, e.g.
``data file /x/y.txt is not UTF-8 text (byte 0x8f at offset 12); pass a UTF-8 text file with data.path=...``.
"""

from __future__ import annotations


class MicroGPTError(Exception):
    """Base class for errors caused by bad input (config, data, checkpoints), not by bugs."""

    def __str__(self) -> str:
        # a wrapped third-party message may span lines; the CLI contract is one line
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class DataError(MicroGPTError):
    """The training text or tokenizer input cannot be used."""


class ConfigError(MicroGPTError):
    """A setting is out of range or names something that does not exist."""


class CheckpointError(MicroGPTError):
    """A checkpoint is missing, damaged, or does not match what it is loaded into."""


class TrainingError(MicroGPTError):
    """Training cannot go on (e.g. the loss became NaN)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): what a
    one-line `error: ...` quotes of a library's error."""
    s = str(error).strip()
    return s.splitlines()[0] if s else type(error).__name__
