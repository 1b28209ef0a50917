"""Chat with a checkpoint in the terminal, using the chat template of `data=chat` (docs/chat.md).

    python -m microgpt.chat ckpt=PATH [temperature=0.8 top_k=50 top_p=null max_new_tokens=256 seed=1337 system="..."]

Replies stream token by token (the model's KV cache). The conversation is kept within the model's context
window: when it no longer fits, the oldest turns are dropped (and the REPL says so). Commands: /reset
forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply and keeps the REPL.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.errors import ConfigError

PROMPT, BOT = "you> ", "bot> "


def fit_context(fmt, system: str | None, turns: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
    """Prompt ids for `turns` (+ system) of at most `budget` ids, dropping the oldest turns first.

    Returns (ids, number of turns dropped). The newest message alone may still be too long: then it keeps
    its end (the start of the prompt is cut, as training data is).
    """
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = fmt.prompt(head + turns[dropped:])
        if len(ids) <= budget or dropped >= len(turns) - 1:
            return ids[-budget:], dropped
        dropped += 1
        # a conversation starts with the user: drop a user turn together with the reply that followed it
        while dropped < len(turns) - 1 and turns[dropped]["role"] != "user":
            dropped += 1


def stream_reply(
    model, tokenizer, fmt, ids: list[int], max_new_tokens: int, out: TextIO, should_stop=None, **sampling
) -> str:
    """Generate after `ids` until an end-of-turn token, max_new_tokens or `should_stop()` (checked before each
    token is shown), writing text to `out` as it comes."""
    from microgpt.inference import generate_stream  # static KV cache; int8 exports run their int8 kernels

    device = getattr(model, "device", None) or next(model.parameters()).device  # OnnxGPT: no parameters
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    shown = ""
    for tok in generate_stream(model, idx, max_new_tokens, **sampling):
        if should_stop is not None and should_stop():
            break
        t = int(tok[0, 0])
        if t in fmt.stop_ids:
            break
        new.append(t)
        # byte / BPE tokens can end mid-character: write only the settled text
        settled = tokenizer.decode(new).rstrip("\ufffd")
        if len(settled) > len(shown):
            out.write(settled[len(shown) :])
            out.flush()
            shown = settled
    return tokenizer.decode(new)


class ChatSession:
    """The conversation and the REPL loop; `run` reads lines from `inp` until /exit or EOF."""

    def __init__(self, model, tokenizer, cfg: DictConfig, out: TextIO = sys.stdout):
        from microgpt.data.chat_template import ChatFormat

        self.model, self.tokenizer, self.cfg, self.out = model, tokenizer, cfg, out
        self.fmt = ChatFormat(tokenizer)
        self.turns: list[dict[str, str]] = []
        block = model.config.block_size
        # room for the reply: a prompt never takes more than the context minus min(max_new_tokens, half of it)
        self.budget = max(1, block - min(cfg.max_new_tokens, block // 2))
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def reply(self, message: str) -> str:
        self.turns.append({"role": "user", "content": message})
        ids, dropped = fit_context(self.fmt, self.cfg.system, self.turns, self.budget)
        if dropped:
            self.turns = self.turns[dropped:]
            self.say(f"[context full: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}]\n")
        self.say(BOT)
        text = ""
        # Ctrl-C while a reply streams: a flag the loop checks before each token, so that nothing between the
        # signal and the loop (a C++ op, a library's exception handling) can swallow it
        interrupted: list[int] = []
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        try:
            text = stream_reply(
                self.model,
                self.tokenizer,
                self.fmt,
                ids,
                self.cfg.max_new_tokens,
                self.out,
                should_stop=lambda: bool(interrupted),
                temperature=self.cfg.temperature,
                top_k=self.cfg.top_k,
                top_p=self.cfg.top_p,
                generator=self.generator,
            )
            self.say(" [stopped]\n" if interrupted else "\n")
        except KeyboardInterrupt:
            self.say(" [stopped]\n")
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        # an interrupted reply stays in the conversation as far as it got (what the user saw)
        self.turns.append({"role": "assistant", "content": text})
        return text

    def run(self) -> None:
        self.say(
            f"chatting with {self.cfg.ckpt} (context {self.model.config.block_size} tokens). "
            "/reset forgets the conversation, /exit quits, Ctrl-C stops a reply.\n"
        )
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.say("\n")
                return
            except KeyboardInterrupt:
                self.say("\n")  # Ctrl-C at the prompt: a fresh line, as in a shell
                continue
            cmd = line.strip()
            if cmd == "/exit":
                return
            if cmd == "/reset":
                self.turns = []
                self.say("[conversation cleared]\n")
                continue
            if cmd.startswith("/"):
                self.say(f"[unknown command {cmd.split()[0]}; use /reset or /exit]\n")
                continue
            if cmd:
                self.reply(line)


def check_sampling(cfg: DictConfig) -> None:
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 0:
        raise ConfigError(f"top_k must be >= 0 or null, got {cfg.top_k}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg.top_p}")


def chat(cfg: DictConfig) -> None:
    from microgpt import load

    check_sampling(cfg)
    model, tokenizer = load(cfg.ckpt, map_location=cfg.device)
    session = ChatSession(model, tokenizer, cfg)  # a model without the chat tokens fails here, with how to fix it
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    session.run()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="chat")
@exit_on_error
def main(cfg: DictConfig) -> None:
    chat(cfg)


if __name__ == "__main__":
    quiet_env()
    main()
