"""An lm-evaluation-harness model backend for microgpt: `--model microgpt --model_args ckpt=PATH`.

Importing this module registers the `LM` subclass `MicroGPTLM` under the name `microgpt`. lm-eval 0.4.x
discovers only its own built-in backends, so the `lm_eval` command needs this module imported first:

    python -m microgpt.lm_eval_adapter --model microgpt --model_args ckpt=PATH --tasks TASK [lm_eval options]

runs lm-eval's own command line with the backend registered; from Python:

    import microgpt.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="microgpt", model_args="ckpt=PATH", tasks=[...])

PATH is anything `microgpt.load` accepts (.ckpt, run dir, exported dir, HF GPT-2 dir). Scoring follows
lm-eval's HF backend: a continuation is scored on the last `block_size` tokens of context+continuation,
rolling log-likelihoods use disjoint windows of `block_size` tokens, and generation is greedy unless
the task asks for sampling.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's built-in backends first: see below)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from microgpt.errors import ConfigError

EOT = "<|endoftext|>"


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


# lm-eval fills its registry with its built-in backends only when the registry is empty; importing
# lm_eval.models above does it now, so registering `microgpt` does not hide `hf`, `vllm`, ...
@register_model("microgpt")
class MicroGPTLM(TemplateLM):
    """lm-eval backend for a microgpt model.

    model_args: ckpt=PATH (required), device=cpu|cuda (default: cuda if available), batch_size=N, dtype=float32|bfloat16,
    max_gen_toks=256. The end-of-text token (scoring prefix for empty contexts and rolling windows) is
    `<|endoftext|>` when the vocabulary has it, else the token of "\\n" (char/byte models).
    """

    def __init__(
        self,
        ckpt: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        **kwargs: Any,
    ):
        super().__init__()
        from microgpt import load

        if not ckpt:
            raise ConfigError("lm-eval model microgpt needs --model_args ckpt=PATH (a .ckpt, run dir or model dir)")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("max_batch_size",))
        if unknown:
            raise ConfigError(
                f"unknown microgpt model_args {unknown}; valid: ckpt, device, batch_size, dtype, max_gen_toks"
            )
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={dtype!r}: choose float32, bfloat16 or float16")
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        self._device = torch.device(device)
        model, tok = load(ckpt, map_location=self._device)
        self.model = model.to(getattr(torch, dtype)).eval()
        self.mg_tokenizer = tok
        self.block_size = model.config.block_size
        bs = str(batch_size or 1)
        self._batch_size = 1 if bs.startswith("auto") else int(bs)
        self._max_gen_toks = int(max_gen_toks)
        self._eot = self._find_eot()

    def _find_eot(self) -> int:
        backend = getattr(self.mg_tokenizer, "tok", None)
        if backend is not None and backend.token_to_id(EOT) is not None:
            return int(backend.token_to_id(EOT))
        try:
            ids = self.mg_tokenizer.encode("\n")
        except Exception:  # a char vocabulary without a newline
            ids = []
        return int(ids[0]) if ids else 0

    # ---- the properties lm-eval reads ----

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"microgpt-{self.mg_tokenizer.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.mg_tokenizer.encode(string))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.mg_tokenizer.decode(tokens)

    # ---- scoring ----

    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Right-padded batch forward; row i's log-softmax over its own length, (len_i, V) float32."""
        T = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), T, dtype=torch.long)
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        logits = self.model(batch.to(self._device)).float()  # causal: right padding changes no real position
        return [F.log_softmax(logits[i, : len(x)], dim=-1).cpu() for i, x in enumerate(inputs)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (sum log p(continuation), greedy?)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="microgpt loglikelihood")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ConfigError("lm-eval sent an empty continuation to score; check the task's doc_to_target")
                whole = (list(ctx) + list(cont))[-(self.block_size + 1) :]
                inputs.append(whole[:-1])
                conts.append(list(cont))
            for i, lp, cont in zip(idx, self._logprobs(inputs), conts):
                n = len(cont)
                rows = lp[-n:]  # the positions that predict the continuation
                target = torch.tensor(cont)
                ll = rows.gather(1, target[:, None]).sum().item()
                greedy = bool((rows.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
                pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="microgpt rolling loglikelihood"):
            (string,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(ll for ll, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ---- generation ----

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="microgpt generate"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot_text = self.tok_decode([self.eot_token_id])
            if eot_text and eot_text not in until:
                until.append(eot_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = _bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            top_k = kw.pop("top_k", None)
            top_p = kw.pop("top_p", None)
            ids = self.tok_encode(context)[-max(1, self.block_size - max_new) :] or [self.eot_token_id]
            idx = torch.tensor([ids], dtype=torch.long, device=self._device)
            new: list[int] = []
            text = ""
            for t in self.model.generate_stream(idx, max_new, temperature=temperature, top_k=top_k, top_p=top_p):
                tid = int(t[0, 0])
                if tid == self.eot_token_id and eot_text == EOT:
                    break
                new.append(tid)
                text = self.tok_decode(new)
                if any(s and s in text for s in until):
                    break
            for s in until:
                if s:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the `microgpt` backend registered."""
    from lm_eval.__main__ import cli_evaluate

    from microgpt.cli import exit_on_error, quiet_env

    quiet_env()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    exit_on_error(cli_evaluate)()


if __name__ == "__main__":
    main()
