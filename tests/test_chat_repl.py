"""`python -m microgpt.chat` used as a person would: through a pseudo-terminal, typing, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from microgpt.chat import fit_context
from microgpt.config import GPTConfig
from microgpt.data.chat_template import ChatFormat, with_chat_tokens
from microgpt.data.tokenizers import CharTokenizer
from microgpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abc"


def babbler(path: Path, block_size: int = 64) -> Path:
    """A checkpoint whose model says only a, b or c, at random, and never ends its turn by itself."""
    tok = with_chat_tokens(CharTokenizer("abcdefghijklmnopqrstuvwxyz ?!.\n"))
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        block_size=block_size,
        n_layer=1,
        n_head=2,
        n_embd=16,
        bias=True,
        tie_embeddings=False,
    )
    model = GPT(cfg)
    with torch.no_grad():
        model.norm_f.weight.zero_()  # the final hidden state is the norm's bias, whatever the input
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = -30.0
        for ch in LETTERS:
            model.lm_head.weight[tok.encode(ch)[0], 0] = 5.0
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"model": cfg.to_dict(), "tokenizer": tok.to_dict()}}, path)
    return path


class Terminal:
    """A child process on a pseudo-terminal: what a person types goes in, what they would see comes out."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C there is SIGINT
            os.execvpe(sys.executable, [sys.executable, "-m", "microgpt.chat", *args], env)
        self.seen = ""
        self.pos = 0  # where the next expect starts looking

    def read(self, timeout: float = 0.5) -> str:
        """Whatever arrives within `timeout` seconds."""
        got = ""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                break
            try:
                chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            got += chunk
        self.seen += got
        return got

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read until `pattern` (a regex) appears after the previous match; returns the text up to its end."""
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen[self.pos :])):
            if time.monotonic() > end:
                raise AssertionError(f"never saw {pattern!r}; the terminal shows:\n{self.seen[-2000:]}")
            self.read(0.2)
        out = self.seen[self.pos : self.pos + m.end()]
        self.pos += m.end()
        return out

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the chat did not exit; it shows:\n{self.seen[-2000:]}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def start(*args: str) -> Terminal:
        t = Terminal(list(args))
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def test_stream_ctrl_c_reset_and_exit_through_a_terminal(terminal, tmp_path):
    ckpt = babbler(tmp_path / "babbler.ckpt")
    term = terminal(f"ckpt={ckpt}", "max_new_tokens=1000000", "top_k=null")
    term.expect(r"/exit quits")
    term.expect(r"you> ")
    term.type("hello there\r")
    term.expect(r"bot> ")
    # the reply arrives while it is being generated: letters now, more letters later, and no prompt yet
    first = term.expect(r"[abc]{3}")
    later = term.read(1.0)
    assert re.fullmatch(r"[abc]+", later), later  # only the babbler's letters, still streaming
    assert "you> " not in first + later
    term.pos = len(term.seen)
    term.type("\x03")  # Ctrl-C: stops this reply, not the REPL
    term.expect(r"\[stopped\]")
    term.expect(r"you> ")
    term.type("/reset\r")
    term.expect(r"\[conversation cleared\]")
    term.expect(r"you> ")
    term.type("/exit\r")
    assert term.wait() == 0


def test_conversation_keeps_to_the_context_window_and_ctrl_d_exits(terminal, tmp_path):
    ckpt = babbler(tmp_path / "babbler.ckpt", block_size=64)
    term = terminal(f"ckpt={ckpt}", "max_new_tokens=6", "seed=3")
    term.expect(r"you> ")
    # each exchange takes 1 + 20 + 1 + 1 + 6 + 1 = 30 tokens; the prompt may take 64 - 6 = 58
    term.type("abcdefghijklmnopqrst\r")
    reply = term.expect(r"bot> [abc]{6}\r?\n")
    term.expect(r"you> ")
    assert "dropped" not in reply
    term.type("abcdefghijklmnopqrst\r")
    term.expect(r"bot> [abc]{6}\r?\n")
    term.expect(r"you> ")
    term.type("abcdefghijklmnopqrst\r")
    out = term.expect(r"bot> [abc]{6}\r?\n")
    assert "[context full: dropped the 2 oldest turns]" in out
    term.expect(r"you> ")
    term.type("\x04")  # Ctrl-D (end of input) on an empty line
    assert term.wait() == 0


def test_a_model_without_chat_tokens_is_one_error_line(terminal, tmp_path):
    tok = CharTokenizer("abc")
    model = GPT(GPTConfig(vocab_size=3, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path = tmp_path / "plain.ckpt"
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": sd, "hyper_parameters": {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}}, path
    )
    term = terminal(f"ckpt={path}")
    assert term.wait(120) == 2
    lines = [ln for ln in term.seen.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lacks the chat tokens" in lines[0], term.seen


def test_fit_context_drops_whole_oldest_exchanges_and_keeps_the_system_message():
    tok = with_chat_tokens(CharTokenizer("abcdefghij"))
    fmt = ChatFormat(tok)
    turns = [
        {"role": "user", "content": "aaaa"},
        {"role": "assistant", "content": "bbbb"},
        {"role": "user", "content": "cccc"},
        {"role": "assistant", "content": "dddd"},
        {"role": "user", "content": "eeee"},
    ]
    full, dropped = fit_context(fmt, "j", turns, 1000)
    assert dropped == 0 and tok.decode(full).startswith("<|system|>j<|end|><|user|>aaaa")
    # system (3) + one exchange (12) + the newest message (6) + the assistant marker (1) = 22
    ids, dropped = fit_context(fmt, "j", turns, 22)
    assert dropped == 2
    assert (
        tok.decode(ids)
        == "<|system|>j<|end|><|user|>cccc<|end|><|assistant|>dddd<|end|><|user|>eeee<|end|><|assistant|>"
    )
    # too small for even the newest message: its end is kept
    ids, dropped = fit_context(fmt, None, turns, 4)
    assert dropped == 4 and tok.decode(ids) == "ee<|end|><|assistant|>"


def test_chat_rejects_bad_sampling_settings():
    from microgpt.chat import check_sampling
    from microgpt.errors import ConfigError

    base = {"max_new_tokens": 10, "temperature": 0.8, "top_k": 50, "top_p": None}
    check_sampling(OmegaConf.create(base))
    for bad in ({"top_p": 1.5}, {"temperature": -1}, {"max_new_tokens": 0}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            check_sampling(OmegaConf.create({**base, **bad}))
