"""Tests for the data layer: errors, tokenizers, text sources and TokenDataModule. No network."""

from __future__ import annotations

import json
import math
import re
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from microgpt.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    TokenDataModule,
    batch_seed,
    bits_per_byte,
    build_tokenizer,
    tokenizer_from_dict,
)
from microgpt.data import sources as sources_mod
from microgpt.data.tokenizers import _encode_chunks
from microgpt.errors import CheckpointError, ConfigError, DataError, MicroGPTError, TrainingError
from microgpt.registry import SOURCE, TOKENIZER, UnknownComponentError
from tests.conftest import SHAKESPEARE


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    """The repository's tiny Shakespeare excerpt (tests/fixtures/shakespeare.txt, 320,060 characters)."""
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_small(shakespeare_text) -> BPETokenizer:
    return build_tokenizer("bpe", shakespeare_text[:200_000], vocab_size=400)


def write(p: Path, data: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data, encoding="utf-8")
    return p


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def corpus(n_lines: int = 400) -> str:
    return "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(n_lines))


# ---- errors -------------------------------------------------------------------------------------------


def test_error_hierarchy_and_one_line_messages():
    for cls in (DataError, ConfigError, CheckpointError, TrainingError):
        assert issubclass(cls, MicroGPTError)
    assert not issubclass(DataError, ConfigError)
    assert str(DataError("bad thing\n  more detail\n")) == "bad thing more detail"


# ---- tokenizers ---------------------------------------------------------------------------------------


def test_char_tokenizer_on_shakespeare_matches_nanogpt(shakespeare_text):
    tok = build_tokenizer("char", shakespeare_text)
    chars = sorted(set(shakespeare_text))
    # 63 in the fixture (tests/fixtures/README.md); nanoGPT's whole-corpus meta has 65 ('$' and '3' come later)
    assert tok.vocab_size == 63 == len(chars)
    assert tok.chars == "".join(chars)
    assert tok.encode("\n ") == [0, 1]  # nanoGPT's shakespeare_char: itos[0] = '\n', itos[1] = ' '
    assert tok.encode("hii there") == [chars.index(c) for c in "hii there"]
    sample = shakespeare_text[:5000]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.decode(torch.tensor(tok.encode(sample))) == sample
    assert tok.bytes_per_token(sample) == 1.0


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(DataError) as e:
        tok.encode("abcé")
    msg = one_line(e)
    assert "'é'" in msg and "offset 3" in msg and "data.tokenizer=byte" in msg
    assert tok.decode([0, 99, -1]) == "a\ufffd\ufffd"  # padded-vocab samples do not crash decoding


def test_byte_tokenizer_roundtrip_and_replace():
    tok = build_tokenizer("byte", "ignored")
    text = "héllo wörld ✓ 🐍\n\ttabs"
    ids = tok.encode(text)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    assert tok.bytes_per_token(text) == 1.0


def test_bpe_roundtrip_vocab_and_compression(bpe_small, shakespeare_text):
    tok = bpe_small
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 400
    sample = shakespeare_text[300_000:310_000]  # text it was not trained on
    ids = tok.encode(sample)
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == sample
    assert tok.bytes_per_token(sample) > 1.5  # merges compress
    weird = "  leading spaces\r\n\ttabs\n\n\nunicode ✓ 🐍 ünïcödé   trailing  "
    assert tok.decode(tok.encode(weird)) == weird


def test_bpe_is_deterministic(shakespeare_text):
    a = build_tokenizer("bpe", shakespeare_text[:100_000], vocab_size=350)
    b = build_tokenizer("bpe", shakespeare_text[:100_000], vocab_size=350)
    assert a.to_dict() == b.to_dict()
    c = build_tokenizer("bpe", shakespeare_text[100_000:200_000], vocab_size=350)
    assert a.to_dict() != c.to_dict()


def test_bpe_chunked_encoding_equals_whole_text_encoding(bpe_small, shakespeare_text):
    # chunks are cut before newlines; the ids must be exactly those of encoding the text in one piece
    text = (shakespeare_text[:40_000] + "\n  \n\t x  \n" + "word   \n" * 3000 + " 1234\n\n") * 2
    assert len(_encode_chunks(text, size=1000)) > 10
    assert "".join(_encode_chunks(text, size=1000)) == text
    assert bpe_small.encode(text) == bpe_small.tok.encode(text, add_special_tokens=False).ids


def test_bpe_vocab_size_too_small():
    with pytest.raises(ConfigError, match="data.vocab_size must be >= 256"):
        build_tokenizer("bpe", "some text", vocab_size=100)


def test_hf_tokenizer_from_dir(tmp_path, bpe_small):
    sample = "To be, or not to be: that is the question.\n"
    full = tmp_path / "full"
    full.mkdir()
    bpe_small.tok.save(str(full / "tokenizer.json"))
    a = HFTokenizer.from_dir(full)
    assert a.vocab_size == bpe_small.vocab_size and a.encode(sample) == bpe_small.encode(sample)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    bpe_small.tok.model.save(str(gpt2))  # writes vocab.json + merges.txt, GPT-2 style
    b = build_tokenizer("hf", "", path=str(gpt2))
    assert b.name == "hf" and b.encode(sample) == bpe_small.encode(sample)
    assert b.decode(b.encode(sample)) == sample


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(DataError) as e:
        HFTokenizer.from_dir(tmp_path)
    msg = one_line(e)
    assert "tokenizer.json" in msg and "vocab.json" in msg and "merges.txt" in msg
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        build_tokenizer("hf", "text")
    with pytest.raises(ConfigError, match="only applies to data.tokenizer=hf"):
        build_tokenizer("char", "text", path=str(tmp_path))


def test_tokenizer_from_dict_roundtrips_each_kind(tmp_path, bpe_small):
    sample = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    bpe_small.tok.save(str(tmp_path / "tokenizer.json"))
    toks = [
        build_tokenizer("char", sample),
        build_tokenizer("byte", sample),
        bpe_small,
        build_tokenizer("hf", sample, path=str(tmp_path)),
    ]
    assert {t.name for t in toks} == {"char", "byte", "bpe", "hf"}
    for tok in toks:
        d = json.loads(json.dumps(tok.to_dict()))  # JSON-serialisable, as stored in a checkpoint
        back = tokenizer_from_dict(d)
        assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
        assert back.to_dict() == tok.to_dict() and back == tok
        assert back.encode(sample) == tok.encode(sample)
        assert back.decode(back.encode(sample)) == sample


def test_tokenizer_from_dict_bad_records():
    with pytest.raises(CheckpointError, match="no 'name'"):
        tokenizer_from_dict({"chars": "abc"})
    with pytest.raises(CheckpointError, match="choose one of: .*char"):
        tokenizer_from_dict({"name": "nope"})
    with pytest.raises(CheckpointError, match="damaged"):
        tokenizer_from_dict({"name": "bpe", "tokenizer_json": "{not json"})
    with pytest.raises(CheckpointError, match="damaged"):
        tokenizer_from_dict({"name": "char"})


def test_unknown_tokenizer_name_lists_choices():
    with pytest.raises(UnknownComponentError) as e:
        build_tokenizer("wordpiece", "text")
    msg = one_line(e)
    assert "wordpiece" in msg and "bpe, byte, char, chat, hf" in msg
    assert {"char", "byte", "bpe", "hf"} <= set(TOKENIZER.names())


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / math.log(2) / 4.0)


# ---- sources: text ------------------------------------------------------------------------------------


def test_text_source_file_dir_and_glob(tmp_path):
    write(tmp_path / "d" / "b.txt", "bee")
    write(tmp_path / "d" / "a.md", "ay")
    write(tmp_path / "d" / "sub" / "c.py", "sea")
    write(tmp_path / "d" / ".hidden", "secret")
    write(tmp_path / "d" / ".git" / "config", "secret too")
    write(tmp_path / "d" / "empty.txt", "  \n")
    text = SOURCE.build("text", path=str(tmp_path / "d"))
    assert text == "ay\nbee\nsea"  # sorted by relative path, hidden and empty files skipped
    assert SOURCE.build("text", path=str(tmp_path / "d" / "b.txt")) == "bee"
    assert SOURCE.build("text", path=str(tmp_path / "d" / "**" / "*.txt")) == "bee"
    assert SOURCE.build("text", path=str(tmp_path / "d" / "*.md")) == "ay"


def test_text_source_strips_utf8_bom(tmp_path):
    f = write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert SOURCE.build("text", path=str(f)) == "hello"


@pytest.mark.parametrize(
    ("layout", "pattern"),
    [
        ("missing", r"data\.path=.*missing.* does not exist"),
        ("glob", r"data\.path=.*\*\.nothing matches no files"),
        ("empty", r"data file .*empty\.txt is empty"),
        ("blank", r"data file .*blank\.txt is empty"),
        ("emptydir", r"is a directory with no files"),
        ("allempty", r"all 2 files under data\.path=.* are empty"),
        ("binary", r"data file .*bin\.dat looks binary \(NUL byte at offset 4\)"),
        ("latin1", r"data file .*latin\.txt is not UTF-8 text \(byte 0x8f at offset 12\); .*data\.path="),
    ],
)
def test_text_source_errors(tmp_path, layout, pattern):
    target = {
        "missing": tmp_path / "missing.txt",
        "glob": tmp_path / "*.nothing",
        "empty": write(tmp_path / "empty.txt", ""),
        "blank": write(tmp_path / "blank.txt", " \n\t\n"),
        "emptydir": tmp_path / "emptydir",
        "allempty": tmp_path / "allempty",
        "binary": write(tmp_path / "bin.dat", b"abcd\x00efgh"),
        "latin1": write(tmp_path / "latin.txt", b"hello world \x8f more"),
    }[layout]
    if layout == "emptydir":
        target.mkdir()
    if layout == "allempty":
        write(target / "a.txt", "")
        write(target / "b.txt", "\n")
    with pytest.raises(DataError) as e:
        SOURCE.build("text", path=str(target))
    assert re.search(pattern, one_line(e)), str(e.value)


def test_text_source_error_in_one_file_of_a_directory_names_it(tmp_path):
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"logo\.png looks binary"):
        SOURCE.build("text", path=str(tmp_path))


def test_text_source_needs_path():
    with pytest.raises(ConfigError, match="data.path"):
        SOURCE.build("text")


# ---- sources: shakespeare -----------------------------------------------------------------------------


def test_shakespeare_source_with_local_path():
    text = SOURCE.build("shakespeare", path=str(SHAKESPEARE))
    assert text.startswith("First Citizen:") and len(text) == 320_060  # the fixture's length


def test_shakespeare_source_offline_raises_dataerror(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources_mod.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        SOURCE.build("shakespeare", cache_dir=str(tmp_path))
    msg = one_line(e)
    assert "could not download tiny Shakespeare" in msg and "name resolution" in msg
    assert "data.path=/path/to/tinyshakespeare.txt" in msg
    assert calls == [(sources_mod.SHAKESPEARE_URL, 10.0)]
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_shakespeare_source_downloads_once_into_cache(tmp_path, monkeypatch):
    calls = []

    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"First Citizen:\nSpeak, speak.\n"

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse()

    monkeypatch.setattr(sources_mod.urllib.request, "urlopen", fake_urlopen)
    assert SOURCE.build("shakespeare", cache_dir=str(tmp_path)) == "First Citizen:\nSpeak, speak.\n"
    assert SOURCE.build("shakespeare", cache_dir=str(tmp_path)).startswith("First Citizen")
    assert len(calls) == 1  # the second call read the cached copy
    assert [p.name for p in tmp_path.iterdir()] == ["tinyshakespeare.txt"]  # no temp files left


# ---- sources: hf --------------------------------------------------------------------------------------


def test_hf_source_local_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    f = write(tmp_path / "local.txt", "alpha\nbeta\ngamma\n")
    cache = tmp_path / "cache"
    text = SOURCE.build("hf", dataset="text", data_files=str(f), cache_dir=str(cache))
    assert text == "alpha\nbeta\ngamma"
    assert (cache / "hf_datasets").is_dir()  # datasets' files stay under our cache dir
    assert SOURCE.build("hf", path=str(f), max_rows=2, cache_dir=str(cache)) == "alpha\nbeta"
    with pytest.raises(DataError, match="no column 'body'; its columns are text"):
        SOURCE.build("hf", path=str(f), text_column="body", cache_dir=str(cache))
    with pytest.raises(DataError) as e:
        SOURCE.build("hf", dataset="someone/not-a-local-dataset-xyz", cache_dir=str(cache))
    assert "could not load HF dataset" in one_line(e) and "data=text data.path=" in str(e.value)


def test_hf_source_needs_a_name():
    with pytest.raises(ConfigError, match="needs data.source_options.dataset"):
        SOURCE.build("hf")


# ---- sources: stdlib ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_small() -> str:
    return SOURCE.build("stdlib", max_bytes=300_000)


def test_stdlib_source_is_real_code_without_tests(stdlib_small):
    text = stdlib_small
    files = re.findall(r"^# file: (\S+)$", text, re.M)
    assert len(files) > 5 and text.startswith("# file: ")
    assert files == sorted(files)
    assert "def " in text and "import " in text
    full = sources_mod._stdlib_files(Path(sources_mod.sysconfig.get_paths()["stdlib"]))
    rels = [p.as_posix() for p in full]
    assert len(rels) > 300
    for rel in rels:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), rel
        assert not parts[-1].startswith("test_"), rel
    assert any(r.endswith("/json/decoder.py") for r in rels)  # library packages are kept


def test_stdlib_source_is_deterministic_and_capped(stdlib_small):
    assert SOURCE.build("stdlib", max_bytes=300_000) == stdlib_small
    assert 299_000 <= len(stdlib_small.encode("utf-8")) <= 300_000
    tiny = SOURCE.build("stdlib", max_bytes=1000)
    assert len(tiny.encode("utf-8")) <= 1000 and stdlib_small.startswith(tiny)
    with pytest.raises(ConfigError, match="max_bytes must be > 0"):
        SOURCE.build("stdlib", max_bytes=0)


def test_stdlib_default_cap_is_4mb():
    text = SOURCE.build("stdlib")
    assert 3_900_000 < len(text.encode("utf-8")) <= 4_000_000


# ---- datamodule ---------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def small_file(tmp_path) -> Path:
    return write(tmp_path / "corpus.txt", corpus())


def dm_for(path: Path, cache: Path, **kw) -> TokenDataModule:
    kw = {"source": "text", "path": str(path), "block_size": 16, "batch_size": 4, "cache_dir": str(cache)} | kw
    return TokenDataModule(**kw)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"batch_size": 0}, "data.batch_size must be > 0, got 0"),
        ({"block_size": -3}, "data.block_size must be > 0, got -3"),
        ({"eval_batches": 0}, "data.eval_batches must be > 0, got 0"),
        ({"eval_batch_size": -1}, "data.eval_batch_size must be > 0, got -1"),
        ({"val_fraction": 0.0}, "data.val_fraction must be between 0 and 1"),
        ({"val_fraction": 1.0}, "data.val_fraction must be between 0 and 1"),
        ({"vocab_size": 0}, "data.vocab_size must be > 0"),
    ],
)
def test_datamodule_validates_args(kw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        TokenDataModule(**kw)


def test_datamodule_unknown_source():
    with pytest.raises(UnknownComponentError, match="choose one of: hf, shakespeare, stdlib, text"):
        TokenDataModule(source="s3")


def test_datamodule_source_option_errors(cache, small_file):
    dm = TokenDataModule(source="stdlib", path=str(small_file), cache_dir=str(cache))
    with pytest.raises(ConfigError, match="takes no data.path"):
        dm.setup()
    dm = TokenDataModule(source="stdlib", source_options={"max_byte": 10}, cache_dir=str(cache))
    with pytest.raises(ConfigError, match="no option 'max_byte'; its options are: max_bytes"):
        dm.setup()


def test_datamodule_on_shakespeare_char(cache):
    dm = TokenDataModule(source="shakespeare", path=str(SHAKESPEARE), tokenizer="char", cache_dir=str(cache))
    dm.setup()
    dm.setup("fit")  # idempotent
    assert dm.vocab_size == 63 == dm.tokenizer.vocab_size  # the fixture's distinct characters (its README)
    n = 320_060  # one token per character: the fixture's length
    assert len(dm.train_tokens) == int(n * 0.9) and len(dm.train_tokens) + len(dm.val_tokens) == n
    assert isinstance(dm.train_tokens, np.memmap) and dm.train_tokens.dtype == np.uint16
    assert dm.tokenizer.decode(dm.train_tokens[:14]) == "First Citizen:"
    assert dm.bytes_per_token == 1.0
    assert dm.cache_hit is False


def test_datamodule_bytes_per_token(cache, tmp_path):
    text = "héllo wörld ✓\n" * 200  # multi-byte characters: bytes per char token > 1
    f = write(tmp_path / "u.txt", text)
    dm = dm_for(f, cache, tokenizer="char")
    dm.setup()
    val_text = dm.tokenizer.decode(dm.val_tokens)
    assert dm.bytes_per_token == pytest.approx(len(val_text.encode("utf-8")) / len(dm.val_tokens))
    assert dm.bytes_per_token > 1.05
    dm_b = dm_for(f, cache, tokenizer="byte")
    dm_b.setup()
    assert dm_b.bytes_per_token == 1.0 and dm_b.train_tokens.dtype == np.uint16


def test_datamodule_bpe_uses_vocab_size(cache, small_file, monkeypatch):
    dm = dm_for(small_file, cache, tokenizer="bpe", vocab_size=300)
    dm.setup()
    assert 256 < dm.vocab_size <= 300 and dm.bytes_per_token > 1.5
    assert int(np.max(dm.train_tokens)) < dm.vocab_size
    with monkeypatch.context() as m:  # the fitted tokenizer is cached too: no second training
        m.setattr(BPETokenizer, "fit", classmethod(lambda cls, *a, **k: pytest.fail("bpe trained twice")))
        dm2 = dm_for(small_file, cache, tokenizer="bpe", vocab_size=300)
        dm2.setup()
    assert dm2.cache_hit and dm2.tokenizer == dm.tokenizer
    dm3 = dm_for(small_file, cache, tokenizer="bpe", vocab_size=280)
    dm3.setup()
    assert dm3.vocab_size <= 280 and dm3.cache_key != dm.cache_key


def test_datamodule_hf_tokenizer_from_dir(cache, small_file, tmp_path, bpe_small):
    bpe_small.tok.save(str(tmp_path / "tokenizer.json"))
    dm = dm_for(small_file, cache, tokenizer="hf", tokenizer_path=str(tmp_path))
    dm.setup()
    assert dm.tokenizer.name == "hf" and dm.vocab_size == bpe_small.vocab_size
    train_text = dm.tokenizer.decode(dm.train_tokens)
    assert len(train_text) > 1000 and corpus().startswith(train_text)


def test_datamodule_cache_hit_does_not_retokenize(cache, small_file, monkeypatch):
    dm = dm_for(small_file, cache)
    dm.setup()
    assert dm.cache_hit is False
    bins = sorted(cache.glob("*.bin"))
    assert len(bins) == 1 and bins[0].name == f"{dm.cache_key}.bin"
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))
    mtime = bins[0].stat().st_mtime_ns

    def boom(self, text):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(CharTokenizer, "encode_array", boom)
    dm2 = dm_for(small_file, cache)
    dm2.setup()
    assert dm2.cache_hit is True and dm2.cache_key == dm.cache_key
    assert bins[0].stat().st_mtime_ns == mtime
    assert np.array_equal(dm2.train_tokens, dm.train_tokens) and np.array_equal(dm2.val_tokens, dm.val_tokens)
    # the key depends on the content: changed text is tokenized again (and fails here, proving it tried)
    write(small_file, corpus() + "one more line\n")
    with pytest.raises(AssertionError, match="re-tokenized"):
        dm_for(small_file, cache).setup()


def test_datamodule_cache_dir_from_env(tmp_path, small_file, monkeypatch):
    monkeypatch.setenv("MICROGPT_CACHE", str(tmp_path / "envcache"))
    dm = TokenDataModule(source="text", path=str(small_file), block_size=8, batch_size=2)
    dm.setup()
    assert dm.cache_dir == tmp_path / "envcache" / "tokens"
    assert (tmp_path / "envcache" / "tokens" / f"{dm.cache_key}.bin").is_file()


def test_datamodule_corpus_too_short(cache, tmp_path):
    f = write(tmp_path / "short.txt", "abcdefghij" * 10)  # 100 tokens: val split gets 10
    dm = dm_for(f, cache, block_size=32)
    with pytest.raises(DataError) as e:
        dm.setup()
    assert one_line(e) == (
        "corpus too short: the val split has 10 tokens but one block needs block_size+1=33; "
        "use more text or a smaller model.block_size"
    )


def test_datamodule_tokenizer_obj_vocab_mismatch(cache, small_file):
    model_tok = CharTokenizer(set(corpus()) - {"."})  # a model that never saw a '.'
    dm = dm_for(small_file, cache, tokenizer_obj=model_tok)
    with pytest.raises(DataError) as e:
        dm.setup()
    msg = one_line(e)
    assert f"char vocabulary of {model_tok.vocab_size}" in msg and "1 character(s) outside" in msg
    assert "'.'" in msg
    ok = CharTokenizer.fit(corpus() + "XYZ")  # a bigger vocabulary that covers the data is fine
    dm = dm_for(small_file, cache, tokenizer_obj=ok)
    dm.setup()
    assert dm.tokenizer is ok and dm.vocab_size == ok.vocab_size


def random_window_check(dm: TokenDataModule, k: int, rank: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """x, y are the windows at the starts nanoGPT's get_batch draws for batch k."""
    g = torch.Generator().manual_seed(batch_seed(dm.seed, k, rank))
    ix = torch.randint(len(dm.train_tokens) - dm.block_size, (dm.batch_size,), generator=g)
    for b, i in enumerate(ix.tolist()):
        assert x[b].tolist() == dm.train_tokens[i : i + dm.block_size].tolist()
        assert y[b].tolist() == dm.train_tokens[i + 1 : i + 1 + dm.block_size].tolist()


def test_train_batches_are_reproducible_contiguous_windows(cache, small_file):
    a, b = dm_for(small_file, cache), dm_for(small_file, cache)
    a.setup()
    b.setup()
    it = iter(a.train_dataloader())
    batches = [next(it) for _ in range(4)]
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        random_window_check(a, k, 0, x, y)
        bx, by = b.train_dataset().batch(k)
        assert torch.equal(x, bx) and torch.equal(y, by)  # batch k depends only on (seed, k)
    assert not torch.equal(batches[0][0], batches[1][0])
    r1 = a.train_dataset(rank=1).batch(0)
    assert not torch.equal(r1[0], batches[0][0])  # each rank draws its own batches
    random_window_check(a, 0, 1, *r1)
    other_seed = dm_for(small_file, cache, seed=7)
    other_seed.setup()
    assert not torch.equal(other_seed.train_dataset().batch(0)[0], batches[0][0])


def test_train_dataloader_resumes_from_trainer_step(cache, small_file):
    dm = dm_for(small_file, cache)
    dm.setup()
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, global_rank=1)
    x, y = next(iter(dm.train_dataloader()))
    want = dm.train_dataset(start=0, rank=1).batch(10)  # 5 steps x 2 micro-batches already seen
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])
    dm.trainer = None
    x0, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x0, dm.train_dataset().batch(0)[0])


def test_val_batches_fixed_and_from_val_split(cache, small_file):
    dm = dm_for(small_file, cache, eval_batches=5)
    dm.setup()
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == len(dm.val_dataloader()) == 5
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 16) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(first[0][0], first[1][0])
    val = dm.val_tokens.tolist()
    for row in first[0][0].tolist():  # every window lies inside the val split
        assert any(val[i : i + 16] == row for i in range(len(val) - 16))


def test_eval_batch_size_keeps_a_smaller_batch_runs_evaluation(cache, small_file):
    """data.eval_batch_size: training on batches of 8 can be evaluated on exactly the val windows a batch-4 run
    of the same seed sees; without it the val batches follow batch_size."""
    base = dm_for(small_file, cache, batch_size=4, eval_batches=3)
    wide = dm_for(small_file, cache, batch_size=8, eval_batches=3, eval_batch_size=4)
    plain = dm_for(small_file, cache, batch_size=8, eval_batches=3)
    for dm in (base, wide, plain):
        dm.setup()
    for (xb, yb), (xw, yw) in zip(base.val_dataloader(), wide.val_dataloader()):
        assert xw.shape == (4, 16) and torch.equal(xb, xw) and torch.equal(yb, yw)
    assert next(iter(plain.val_dataloader()))[0].shape == (8, 16)
    assert next(iter(wide.train_dataloader()))[0].shape == (8, 16)  # training keeps its own batch size


def test_full_val_batches_cover_the_val_split_once(cache, small_file):
    dm = dm_for(small_file, cache)
    dm.setup()
    batches = list(dm.full_val_batches(batch_size=3))
    assert all(x.dtype == torch.int64 and x.shape == y.shape for x, y in batches)
    assert all(x.shape[0] <= 3 and x.shape[1] <= 16 for x, _ in batches)
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    val = torch.from_numpy(np.asarray(dm.val_tokens, dtype=np.int64))
    assert torch.equal(ys, val[1:]) and torch.equal(xs, val[:-1])


def test_state_dict_records_tokenizer_and_restores_it(cache, small_file, tmp_path):
    dm = dm_for(small_file, cache)
    dm.setup()
    sd = dm.state_dict()
    assert sd["cache_key"] == dm.cache_key and sd["tokenizer"] == dm.tokenizer.to_dict()
    json.dumps(sd)
    # before setup: the checkpoint's tokenizer is used, even on text with fewer characters
    other = write(tmp_path / "other.txt", "the lazy dog\n" * 100)
    dm2 = dm_for(other, cache)
    dm2.load_state_dict(sd)
    dm2.setup()
    assert dm2.tokenizer.to_dict() == sd["tokenizer"] and dm2.vocab_size == dm.vocab_size
    # after setup (Lightning's order on resume): a different tokenizer is refused
    dm3 = dm_for(other, cache)
    dm3.setup()
    with pytest.raises(DataError, match=rf"vocab {dm.vocab_size}.*vocab {dm3.vocab_size}"):
        dm3.load_state_dict(sd)
    dm4 = dm_for(small_file, cache)
    dm4.setup()
    dm4.load_state_dict(sd)  # same data: accepted


def test_exact_resume_inside_lightning(cache, small_file, tmp_path):
    import lightning as L
    from torch import nn

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 4)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(x.clone())
            return self.emb(x).float().pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass  # validation is disabled below (limit_val_batches=0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def trainer(steps: int) -> L.Trainer:
        return L.Trainer(
            max_steps=steps,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            accelerator="cpu",
        )

    full = Recorder()
    trainer(4).fit(full, datamodule=dm_for(small_file, cache))
    assert len(full.seen) == 8  # 4 optimizer steps x 2 micro-batches
    first = Recorder()
    t = trainer(2)
    t.fit(first, datamodule=dm_for(small_file, cache))
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)
    assert "TokenDataModule" in torch.load(ckpt, weights_only=False)
    resumed = Recorder()
    trainer(4).fit(resumed, datamodule=dm_for(small_file, cache), ckpt_path=ckpt)
    got = first.seen + resumed.seen
    assert len(got) == 8 and all(torch.equal(a, b) for a, b in zip(got, full.seen))


def test_datamodule_pickles_without_token_arrays(cache, small_file):
    import pickle

    dm = dm_for(small_file, cache, tokenizer="bpe", vocab_size=300)
    dm.setup()
    blob = pickle.dumps(dm)
    assert len(blob) < 64_000  # settings and tokenizer only; the tokens stay in the cache
    dm2 = pickle.loads(blob)
    assert dm2.train_tokens is None
    dm2.setup()
    assert dm2.cache_hit and np.array_equal(dm2.train_tokens, dm.train_tokens)
    assert torch.equal(dm2.train_dataset().batch(3)[0], dm.train_dataset().batch(3)[0])
