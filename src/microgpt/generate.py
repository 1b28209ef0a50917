"""Sample text from a checkpoint, streaming tokens to stdout as they are generated.

python -m microgpt.generate ckpt=PATH prompt="ROMEO:" max_new_tokens=200 temperature=0.8 top_k=50 [compile=true]

PATH may be any `microgpt.load` path; an int8 export runs quantized (docs/deploy.md). compile=true compiles the
one-token decode step (a one-off cost of tens of seconds; worth it for long generations).
"""

from __future__ import annotations

import sys
import time

import hydra
import torch
from omegaconf import DictConfig

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.inference import generate_stream
from microgpt.stopping import Stopper, end_of_text_id, stop_strings


def stream_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    out=None,
    stopper: Stopper | None = None,
    compile: bool = False,
    **sampling,
) -> str:
    """Generate after `prompt`, writing text to `out` as it comes; returns the generated text.
    Stops early at the tokenizer's end-of-text token or a stop string (`stopper`; default: end-of-text).
    Decodes through microgpt.inference's static KV cache (compiled with `compile`); an int8 export runs
    its int8 kernels."""
    out = out if out is not None else sys.stdout  # looked up per call: a default bound at import goes stale
    stopper = stopper or Stopper(end_of_text_id(tokenizer))
    device = getattr(model, "device", None) or next(model.parameters()).device  # OnnxGPT: no parameters
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts from token 0 (a newline for char models trained on text)
        ids = [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    shown = ""
    for tok in generate_stream(model, idx, max_new_tokens, mode="compile" if compile else "trace", **sampling):
        if stopper.is_eos(int(tok[0, 0])):
            break
        new.append(int(tok[0, 0]))
        # decode the whole tail each time: byte/BPE tokens can end mid-character, so print only what is settled
        text, stopped = stopper.cut(tokenizer.decode(new))
        if stopped:
            break
        settled = stopper.printable(text.rstrip("\ufffd"))
        if len(settled) > len(shown):
            out.write(settled[len(shown) :])
            out.flush()
            shown = settled
    text, _ = stopper.cut(tokenizer.decode(new))
    stream_text.tokens = len(new)  # what the last call generated (verbose=true reports tokens/s)
    if len(text) > len(shown):
        out.write(text[len(shown) :])
    out.write("\n")
    out.flush()
    return text


def generate(cfg: DictConfig) -> list[str]:
    from microgpt import load
    from microgpt.sampling_args import check_sampling, read_prompt

    check_sampling(cfg)  # types and ranges, ckpt given, the device exists: one error line before loading
    prompt = read_prompt(cfg)  # prompt=..., prompt=- (stdin) or prompt_file=PATH
    model, tokenizer = load(cfg.ckpt, map_location=cfg.device)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    stops = stop_strings(cfg.get("stop"))
    texts = []
    for _ in range(cfg.num_samples):
        sys.stdout.write(prompt)
        stopper = Stopper(end_of_text_id(tokenizer), stops)
        t0 = time.perf_counter()
        texts.append(
            stream_text(
                model,
                tokenizer,
                prompt,
                cfg.max_new_tokens,
                stopper=stopper,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=gen,
                compile=bool(cfg.get("compile", False)),
            )
        )
        if cfg.get("verbose"):
            dt, n = time.perf_counter() - t0, stream_text.tokens
            print(f"[{n} tokens in {dt:.2f}s, {n / dt if dt > 0 else 0:.1f} tokens/s; stopped at {stopper.reason}]",
                  file=sys.stderr, flush=True)  # fmt: skip
    return texts


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    quiet_env()
    main()
