"""data=chat: JSONL shapes, the chat template and its special tokens, loss masking, truncation, training."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_cli

import microgpt
import microgpt.training.train as train_mod
from microgpt.config import GPTConfig
from microgpt.data.chat import ChatDataModule, collate, encode_examples, read_chat_jsonl
from microgpt.data.chat_template import CHAT_TOKENS, IGNORE_INDEX, ChatFormat, ChatTokenizer, with_chat_tokens
from microgpt.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, HFTokenizer, tokenizer_from_dict
from microgpt.errors import DataError
from microgpt.model import GPT
from microgpt.training.lit import LitGPT, cross_entropy

U, A, S, E = CHAT_TOKENS["user"], CHAT_TOKENS["assistant"], CHAT_TOKENS["system"], CHAT_TOKENS["end"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- reading --------------------------------------------------------------------------------------------


def test_the_three_shapes_read_as_conversations(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "hi", "response": "yo", "system": "be brief"},
            {"instruction": "add", "input": "1 1", "output": "2"},
            {"instruction": "greet", "output": "hello"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )
    assert read_chat_jsonl(f) == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ],
        [{"role": "user", "content": "add\n\n1 1"}, {"role": "assistant", "content": "2"}],
        [{"role": "user", "content": "greet"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', "", '{"prompt": "c", "response": "d"}'], "line 2 is empty"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], "line 2 is not valid JSON"),
        (['{"question": "a", "answer": "b"}'], "line 1 has keys (answer, question) in no known shape"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1 has no assistant message"),
        (['{"messages": [{"role": "robot", "content": "a"}]}'], "line 1: message 0 must be"),
        (['{"prompt": "a", "response": 3}'], "line 1: 'response' must be a string"),
        (["[1, 2]"], "line 1 is not a JSON object"),
    ],
)
def test_bad_lines_are_errors_naming_the_line(tmp_path, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_chat_jsonl(f)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_line_from_the_cli_is_one_error_line_and_exit_2(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', encoding="utf-8")
    r = run_cli(["train.py", "data=chat", f"data.path={f}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl line 2 is not valid JSON" in lines[0]
    assert not (tmp_path / "run").exists()


# ---- the template and its tokens ------------------------------------------------------------------------


def test_template_layout_and_labels_cover_only_the_reply_and_its_end():
    tok = with_chat_tokens(CharTokenizer("abcxyz"))
    fmt = ChatFormat(tok)
    conv = [
        {"role": "system", "content": "z"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]
    (ex,), cut = encode_examples(fmt, [conv], block_size=64, train_on="last")
    assert cut == {"prompt": 0, "response": 0}
    assert tok.decode(ex.x) == f"{S}z{E}{U}ab{E}{A}c"
    c, end = tok.encode("c")[0], tok.token_to_id(E)
    # x = ids[:-1], y = ids[1:]: y is -100 until the assistant marker's successor (the reply), then c, <|end|>
    assert ex.y.tolist() == [IGNORE_INDEX] * 7 + [c, end]


def test_train_on_all_scores_every_assistant_turn_and_last_only_the_final_one():
    tok = with_chat_tokens(CharTokenizer("abcd"))
    fmt = ChatFormat(tok)
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]

    def scored(train_on: str) -> str:
        (ex,), _ = encode_examples(fmt, [conv], 64, train_on)
        return tok.decode([t for t in ex.y.tolist() if t != IGNORE_INDEX])

    assert scored("last") == f"d{E}"
    assert scored("all") == f"b{E}d{E}"


def _hf_gpt2_style(tmp_path: Path) -> HFTokenizer:
    """A GPT-2-style tokenizer directory (vocab.json + merges.txt with <|endoftext|>), loaded as data.tokenizer=hf."""
    bpe = BPETokenizer.fit("the cat sat on the mat. " * 50 + "<|endoftext|>", vocab_size=300)
    bpe.tok.add_special_tokens(["<|endoftext|>"])
    d = tmp_path / "gpt2tok"
    d.mkdir()
    bpe.tok.save(str(d / "tokenizer.json"))
    return HFTokenizer.from_dir(d)


@pytest.mark.parametrize("name", ["char", "byte", "bpe", "hf"])
def test_every_tokenizer_gets_the_chat_tokens_as_single_ids_that_content_cannot_forge(name, tmp_path):
    text = "the cat sat on the mat. <|>end"
    base = {
        "char": lambda: CharTokenizer(text),
        "byte": ByteTokenizer,
        "bpe": lambda: BPETokenizer.fit(text * 20, vocab_size=280),
        "hf": lambda: _hf_gpt2_style(tmp_path),
    }[name]()
    tok = with_chat_tokens(base)
    assert tok.vocab_size == base.vocab_size + 4 and with_chat_tokens(tok) is tok  # added once
    assert base.vocab_size == with_chat_tokens(base).vocab_size - 4  # the base is left as it was
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))  # what a checkpoint stores
    assert again == tok
    fmt = ChatFormat(again)
    specials = {fmt.ids[k] for k in ("system", "user", "assistant", "end")}
    assert len(specials) == 4 and min(specials) >= base.vocab_size
    # a user typing the end marker gets its characters, not the token
    conv = [{"role": "user", "content": "the <|end|> cat"}, {"role": "assistant", "content": "sat"}]
    enc = fmt.encode(conv)
    assert [t for t in enc.ids if t in specials] == [
        fmt.ids["user"],
        fmt.ids["end"],
        fmt.ids["assistant"],
        fmt.ids["end"],
    ]
    assert again.decode(enc.ids) == f"{U}the <|end|> cat{E}{A}sat{E}"
    if name in ("char", "byte"):
        assert isinstance(tok, ChatTokenizer)
    else:
        assert type(tok) is type(base)  # in the HF tokenizer itself: HF exports carry them


def test_a_jinja_chat_template_on_the_tokenizer_is_used_and_masked_by_rendering():
    tok = ByteTokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    fmt = ChatFormat(with_chat_tokens(tok))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = fmt.encode(conv)
    assert tok.decode(enc.ids) == "[user]hi</s>[assistant]yo</s>"
    assert tok.decode([t for t, s in zip(enc.ids, enc.scored) if s]) == "yo</s>"
    assert tok.decode(fmt.prompt(conv[:1])) == "[user]hi</s>[assistant]"
    assert fmt.stop_ids == {ord("<")}


# ---- masking is exact -----------------------------------------------------------------------------------


def _batch(tok, fmt, convs, block=48):
    examples, _ = encode_examples(fmt, convs, block, "last")
    x, y = collate(examples, pad_id=fmt.ids["end"])
    return x, y, [len(e.x) for e in examples]


def test_masked_positions_contribute_exactly_zero_loss_and_zero_gradient():
    tok = with_chat_tokens(CharTokenizer("abcdefgh "))
    fmt = ChatFormat(tok)
    convs = [
        [{"role": "user", "content": "abc abc"}, {"role": "assistant", "content": "dd"}],
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "efg"}],
        [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "a"}],
    ]
    x, y, lengths = _batch(tok, fmt, convs)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16))

    class M(torch.nn.Module):  # what cross_entropy needs of a LitGPT: calling it gives logits
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, idx):
            return self.model(idx)

    def loss_and_grads(x, y):
        model.zero_grad()
        loss = cross_entropy(M(), (x, y))["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(x, y)
    # the loss is the mean over the reply tokens alone, computed here by hand
    with torch.no_grad():
        logp = model(x).log_softmax(-1)
    keep = y != IGNORE_INDEX
    assert keep.sum() == 3 + 4 + 2  # each reply and its <|end|>
    manual = -logp[keep].gather(-1, y[keep][:, None]).mean()
    torch.testing.assert_close(loss, manual, rtol=0, atol=1e-6)
    # whatever ids the padding holds changes nothing, bit for bit (real tokens never attend to it)
    pad = y == IGNORE_INDEX
    after = torch.arange(x.size(1))[None, :] >= torch.tensor(lengths)[:, None]
    assert after.any()
    x2 = torch.where(after, torch.randint_like(x, tok.vocab_size), x)
    assert not torch.equal(x, x2)
    loss2, grads2 = loss_and_grads(x2, y)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    # and the gradient of the loss with respect to the logits is exactly zero at every masked position
    logits = model(x).detach().requires_grad_(True)
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
    assert torch.count_nonzero(logits.grad[pad]) == 0
    assert torch.count_nonzero(logits.grad[keep]) > 0


def test_validation_counts_only_scored_tokens():
    tok = with_chat_tokens(CharTokenizer("abcdefgh "))
    fmt = ChatFormat(tok)
    convs = [
        [{"role": "user", "content": "abc abc"}, {"role": "assistant", "content": "dd"}],
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "efg"}],
    ]
    x, y, _ = _batch(tok, fmt, convs)
    lit = LitGPT(model=GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16).to_dict())
    lit.validation_step((x[:1], y[:1]), 0)
    lit.validation_step((x[1:], y[1:]), 1)
    assert int(lit.val_metrics.tokens) == 3 + 4
    with torch.no_grad():
        logp = lit.model(x).log_softmax(-1)
    keep = y != IGNORE_INDEX
    manual = -logp[keep].gather(-1, y[keep][:, None]).mean()  # token-weighted over both batches
    torch.testing.assert_close(lit.val_metrics.compute()["loss"], manual.float(), rtol=0, atol=1e-5)


# ---- truncation -----------------------------------------------------------------------------------------


def test_long_prompts_lose_their_start_and_are_counted_never_dropped(tmp_path, caplog):
    long_prompt = "abcdefgh" * 10
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": long_prompt, "response": "ok"},
            {"prompt": "ab", "response": "c" * 40},  # the reply itself does not fit
            {"prompt": "ab", "response": "ok"},
        ],
    )
    dm = ChatDataModule(path=str(f), val_path=str(f), block_size=16, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="microgpt"):
        dm.setup()
    assert len(dm.train_examples) == 3 and dm.truncated == {"prompt": 2, "response": 2}  # train + val copies
    msg = [r.getMessage() for r in caplog.records if "block_size+1=17" in r.getMessage()]
    assert (
        msg and "4 of 6 examples" in msg[0] and "2 lost the start of their prompt, 2 the end of their reply" in msg[0]
    )
    tok = dm.tokenizer
    first, second, third = dm.train_examples
    # 17 ids: the end of the prompt, then the whole reply
    assert len(first.x) == 16 and tok.decode(first.x) == f"{long_prompt[-12:]}{E}{A}ok"
    assert tok.decode([t for t in first.y.tolist() if t != IGNORE_INDEX]) == f"ok{E}"
    # the reply too long: its marker and start are kept
    assert tok.decode(second.x) == A + "c" * 15 and (second.y != IGNORE_INDEX).all()
    assert tok.decode(third.x) == f"{U}ab{E}{A}ok"


# ---- training -------------------------------------------------------------------------------------------


def _chat_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"say {w}", "response": w} for w in ("yes", "no", "maybe", "never", "always", "soon")] * 4
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_train_py_on_chat_data_with_the_defaults_writes_a_chat_model(tmp_path):
    f = _chat_file(tmp_path)
    run_dir = tmp_path / "run"
    r = run_cli(
        [
            "train.py",
            "data=chat",
            f"data.path={f}",
            "model=nano",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok = microgpt.load(run_dir)
    assert isinstance(tok, ChatTokenizer) and tok.vocab_size == model.config.vocab_size
    fmt = ChatFormat(tok)  # the chat tokens came with the checkpoint
    assert fmt.ids["end"] == tok.base.vocab_size + 3
    with open(run_dir / "metrics.csv", newline="") as fh:
        vals = [float(row["val_bpb"]) for row in csv.DictReader(fh) if row.get("val_bpb")]
    assert vals and all(math.isfinite(v) and v > 0 for v in vals)


PLAY = Path(__file__).resolve().parent / "fixtures" / "speakers_play.txt"


def test_fine_tuning_a_base_model_on_chat_data_grows_its_vocabulary_and_keeps_its_weights(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(PLAY.read_text(encoding="utf-8") * 3, encoding="utf-8")
    quiet = [
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "print_sample=false",
        "logger=none",
        "callbacks.lr_monitor=null",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "model=nano",
    ]
    base = train_mod.run(compose(["data=text", f"data.path={text}", *quiet], tmp_path / "base"))
    base_model, base_tok = microgpt.load(base["last_ckpt"])
    rows = [{"prompt": "ALICE", "response": "BORIS"}, {"prompt": "Who?", "response": "the kettle"}] * 6
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    ft = train_mod.run(
        compose(
            [
                "data=chat",
                f"data.path={f}",
                f"init_from={base['last_ckpt']}",
                "optimizer.lr=1e-12",
                "scheduler.min_lr=0",
                *quiet,
            ],
            tmp_path / "ft",
        )
    )
    model, tok = microgpt.load(ft["last_ckpt"])
    assert tok == with_chat_tokens(base_tok)
    V = base_tok.vocab_size
    assert model.config.vocab_size == V + 4
    # the base's rows are its own (lr ~0 keeps them); the new rows start at the mean embedding
    torch.testing.assert_close(model.wte.weight[:V], base_model.wte.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.wte.weight[V:], base_model.wte.weight.mean(0).expand(4, -1), rtol=0, atol=1e-6)


def test_evaluate_scores_only_labelled_positions():
    """microgpt.evaluate on chat data: prompt and padding positions (-100) add neither loss nor tokens."""
    from microgpt.evaluate import evaluate_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 11, (2, 8))
    y = torch.randint(0, 11, (2, 8))
    y[0, :5] = -100
    y[1, 6:] = -100
    logits = model(x)
    keep = y != -100
    want = F.cross_entropy(logits[keep], y[keep]).item()  # mean over the 9 scored positions only
    got = evaluate_model(model, [(x, y)], bytes_per_token=1.0)
    assert got["val_loss"] == pytest.approx(want, rel=1e-5)
    assert keep.sum() == 9
