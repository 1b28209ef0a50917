"""The speaker-attribution task: building it from a play, and scoring models on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from microgpt.config import GPTConfig
from microgpt.data.chat_template import CHAT_TOKENS, with_chat_tokens
from microgpt.data.tokenizers import CharTokenizer
from microgpt.model import GPT
from microgpt.tasks import build_speaker_task, parse_speeches, read_task, score_model

ROOT = Path(__file__).resolve().parents[1]
PLAY = ROOT / "tests" / "fixtures" / "speakers_play.txt"  # ALICE 6 speeches, BORIS 4, CAROL 3, DAVE 1


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_parse_speeches_reads_speaker_blocks_and_skips_the_rest():
    speeches, skipped = parse_speeches(PLAY.read_text(encoding="utf-8"))
    assert skipped == 1  # the title line
    assert [w for w, _ in speeches].count("ALICE") == 6
    assert speeches[0] == ("ALICE", "The kettle sings before the dawn is up,\nand I am first to hear it.")


def test_build_holds_out_each_speakers_last_speeches(tmp_path):
    meta = build_speaker_task(str(PLAY), str(tmp_path), top_n=3, test_fraction=0.34, split="tail")
    assert meta["labels"] == ["ALICE", "BORIS", "CAROL"]  # DAVE has one speech only and is not in the top 3
    assert meta["train_counts"] == {"ALICE": 4, "BORIS": 3, "CAROL": 2}
    assert meta["test_counts"] == {"ALICE": 2, "BORIS": 1, "CAROL": 1}
    assert meta["majority_label"] == "ALICE" and meta["majority_baseline"] == 0.5
    test = _rows(tmp_path / "test.jsonl")
    assert sorted((r["response"], r["prompt"]) for r in test) == [
        ("ALICE", "Now the sun is up; the day begins."),
        ("ALICE", "Sit down, the bread is nearly warm."),
        ("BORIS", "And so the play ends where it started."),
        ("CAROL", "Say less, and eat the more, good Boris."),
    ]
    train = _rows(tmp_path / "train.jsonl")
    assert len(train) == 9 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert json.loads((tmp_path / "task.json").read_text())["labels"] == meta["labels"]


def test_random_split_is_seeded_and_disjoint(tmp_path):
    a = build_speaker_task(str(PLAY), str(tmp_path / "a"), top_n=2, split="random", seed=3)
    build_speaker_task(str(PLAY), str(tmp_path / "b"), top_n=2, split="random", seed=3)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    tr, te = _rows(tmp_path / "a" / "train.jsonl"), _rows(tmp_path / "a" / "test.jsonl")
    assert len(tr) + len(te) == 10 and a["labels"] == ["ALICE", "BORIS"]
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in te}


class Bigram(nn.Module):
    """A 'model' whose next token depends only on the current one, from a hand-written table."""

    generate_stream = GPT.generate_stream

    def __init__(self, vocab: int, block: int, table: dict[int, int]):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=1, n_embd=4)
        logits = torch.zeros(vocab, vocab)
        for a, b in table.items():
            logits[a, b] = 30.0
        self.table = nn.Parameter(logits)

    def forward(self, idx, cache=None):
        return self.table[idx]


def test_score_exact_match_and_ranking_follow_what_the_model_prefers(tmp_path):
    build_speaker_task(str(PLAY), str(tmp_path), top_n=3, test_fraction=0.34)
    meta, convs = read_task(tmp_path)
    tok = with_chat_tokens(CharTokenizer(PLAY.read_text(encoding="utf-8")))
    # always answers BORIS: <|assistant|> -> B -> O -> R -> I -> S -> <|end|>
    path = [tok.token_to_id(CHAT_TOKENS["assistant"]), *tok.encode("BORIS"), tok.token_to_id(CHAT_TOKENS["end"])]
    model = Bigram(tok.vocab_size, 64, dict(zip(path, path[1:])))
    result = score_model(model, tok, meta["labels"], convs)
    # 1 of the 4 held-out speeches is BORIS's
    assert result == {"mode": "chat", "n": 4, "exact_match": 0.25, "ll_accuracy": 0.25}
    # the same model with S -> O instead of S -> <|end|> never stops ("BORISO..."): not an exact match
    model2 = Bigram(tok.vocab_size, 64, {**dict(zip(path, path[1:])), path[-2]: tok.encode("O")[0]})
    assert score_model(model2, tok, meta["labels"], convs)["exact_match"] == 0.0


def test_base_model_without_chat_tokens_is_ranked_in_the_corpus_format(tmp_path):
    build_speaker_task(str(PLAY), str(tmp_path), top_n=3, test_fraction=0.34)
    meta, convs = read_task(tmp_path)
    tok = CharTokenizer(PLAY.read_text(encoding="utf-8") + "\n")
    # "\n" -> C -> A -> R -> O -> L -> ":": prefers "CAROL:\n..." over the other labels
    path = tok.encode("\nCAROL:")
    model = Bigram(tok.vocab_size, 64, dict(zip(path, path[1:])))
    result = score_model(model, tok, meta["labels"], convs)
    assert result == {"mode": "corpus", "n": 4, "exact_match": None, "ll_accuracy": 0.25}


def _save_random_ckpt(tok, path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": sd, "hyper_parameters": {"model": model.config.to_dict(), "tokenizer": tok.to_dict()}}, path
    )
    return path


def test_cli_build_then_score_prints_one_json_line(tmp_path):
    task = tmp_path / "task"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "microgpt.tasks",
            "build",
            f"input={PLAY}",
            f"out={task}",
            "top_n=3",
            "test_fraction=0.34",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "majority baseline 0.500 (ALICE)" in r.stderr
    ckpt = _save_random_ckpt(with_chat_tokens(CharTokenizer(PLAY.read_text(encoding="utf-8"))), tmp_path / "m.ckpt")
    r = subprocess.run(
        [sys.executable, "-m", "microgpt.tasks", "score", f"ckpt={ckpt}", f"task={task}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 4 and out["mode"] == "chat" and out["majority_baseline"] == 0.5 and out["labels"] == 3
    assert out["exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0) and out["ll_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "input=/nonexistent/play.txt", "out={out}"], "does not exist"),
        (["build", f"input={PLAY}", "out={out}", "top_n=4"], "3 speakers with 2+ speeches, fewer than top_n=4"),
        (["build", f"input={PLAY}", "out={out}", "colour=red"], "unknown option 'colour'"),
        (["build", f"input={PLAY}"], "out=PATH is required"),
        (["score", "ckpt=x.ckpt", "task={out}"], "is not a task directory"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in args]
    r = subprocess.run(
        [sys.executable, "-m", "microgpt.tasks", *args], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists()
