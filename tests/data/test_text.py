"""Streaming text, token files with sidecars, train/val split and language-model batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tansuo.data import (
    encode,
    encode_to_token_file,
    iter_text_chunks,
    lm_batch,
    open_token_file,
    read_token_file_info,
    split_tokens,
    token_dtype,
    token_file_is_current,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from tansuo.errors import DataError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "ROMEO:", "naïve", "café", "😀", "  ", "\t", "it's"]
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\n".join(lines) + "\n\n  end").encode("utf-8"))
    return path


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
def test_iter_text_chunks_reassembles_file(corpus: Path, chunk_chars: int) -> None:
    chunks = list(iter_text_chunks(corpus, chunk_chars))
    assert all(chunks)
    assert "".join(chunks) == corpus.read_bytes().decode("utf-8")
    assert max(map(len, chunks)) <= chunk_chars


def test_iter_text_chunks_keeps_crlf(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"a\r\nb\r\n")
    assert "".join(iter_text_chunks(path, 2)) == "a\r\nb\r\n"


def test_iter_text_chunks_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file not found: .*missing.txt; pass --data PATH.*Get it here"):
        iter_text_chunks(tmp_path / "missing.txt", hint="Get it here.")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("héllo".encode() + b" caf\xe9 ok")  # \xe9 at byte offset 10
    for chunk_chars in (1, 4, 100):
        with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8.*byte offset 10"):
            list(iter_text_chunks(bad, chunk_chars))
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(b"ok \xe2\x82")  # a 3-byte character cut short at the end
    with pytest.raises(DataError, match="byte offset 3"):
        list(iter_text_chunks(truncated, 4))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_file_equals_direct_encoding(corpus: Path, tmp_path: Path, kind: str) -> None:
    text = corpus.read_text(encoding="utf-8")
    tok = (
        train_char_tokenizer([text]) if kind == "char" else train_bpe_tokenizer([text], 320, min_frequency=2)
    )
    expected = encode(tok, text)
    assert expected == tok.encode(text).ids
    for chunk_chars in (7, 13, 100, 1 << 20):
        out = tmp_path / f"{kind}_{chunk_chars}.bin"
        assert encode_to_token_file(corpus, tok, out, chunk_chars=chunk_chars) == len(expected)
        tokens = open_token_file(out)
        assert tokens.dtype == np.uint16
        np.testing.assert_array_equal(tokens, expected)


def test_token_file_reports_unseen_character(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc cab\nbca abd", encoding="utf-8")
    tok = train_char_tokenizer(["abc \n"])
    with pytest.raises(DataError, match=r"corpus.txt: character 'd' \(U\+0064\) at position 14"):
        encode_to_token_file(corpus, tok, tmp_path / "out.bin", chunk_chars=5)
    assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"]  # the temporary file is removed
    with pytest.raises(DataError, match="data file not found"):
        encode_to_token_file(tmp_path / "nope.txt", tok, tmp_path / "out.bin")


def test_token_dtype() -> None:
    assert token_dtype(65) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100_000) == np.uint32


def test_sidecar_and_currency(corpus: Path, tmp_path: Path) -> None:
    tok = train_char_tokenizer(iter_text_chunks(corpus))
    out = tmp_path / "tokens" / "train.bin"  # the folder is created
    num_tokens = encode_to_token_file(corpus, tok, out)
    info = read_token_file_info(out)
    assert info is not None
    assert info["dtype"] == "uint16" and info["num_tokens"] == num_tokens
    assert info["vocab_size"] == tok.get_vocab_size() and info["source"] == str(corpus)
    assert info["source_size"] == corpus.stat().st_size
    vocab_size = tok.get_vocab_size()
    assert token_file_is_current(corpus, out, vocab_size, tokenizer=tok)
    assert not token_file_is_current(corpus, out, vocab_size + 1)
    chars = sorted(set(corpus.read_text(encoding="utf-8")))
    other = train_char_tokenizer(["".join(chars[1:]) + "\u2603"])  # same size, other characters
    assert other.get_vocab_size() == vocab_size
    assert not token_file_is_current(corpus, out, vocab_size, tokenizer=other)
    # Changing the source (here: same size, new time stamp) makes the token file stale.
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not token_file_is_current(corpus, out, vocab_size)
    encode_to_token_file(corpus, tok, out)
    assert token_file_is_current(corpus, out, vocab_size)
    with corpus.open("a", encoding="utf-8") as file:
        file.write("to be")
    assert not token_file_is_current(corpus, out, vocab_size)
    assert not token_file_is_current(corpus, tmp_path / "absent.bin", vocab_size)


def test_open_token_file_is_read_only_and_checked(corpus: Path, tmp_path: Path) -> None:
    tok = train_char_tokenizer(iter_text_chunks(corpus))
    out = tmp_path / "t.bin"
    encode_to_token_file(corpus, tok, out)
    tokens = open_token_file(out)
    assert isinstance(tokens, np.memmap)
    with pytest.raises(ValueError):
        tokens[0] = 1
    with out.open("ab") as file:  # a truncated / grown file no longer matches its sidecar
        file.write(b"\x00\x00")
    with pytest.raises(DataError, match="sidecar says"):
        open_token_file(out)
    with pytest.raises(DataError, match="token file not found"):
        open_token_file(tmp_path / "missing.bin")
    (tmp_path / "t.bin.json").unlink()
    with pytest.raises(DataError, match="no readable sidecar"):
        open_token_file(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert encode_to_token_file(empty, tok, tmp_path / "e.bin") == 0
    with pytest.raises(DataError, match="holds no tokens"):
        open_token_file(tmp_path / "e.bin")


def test_split_tokens() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.9)
    assert len(train) == 90 and len(val) == 10
    assert train[-1] == 89 and val[0] == 90
    assert np.shares_memory(train, tokens)  # views, no copy
    with pytest.raises(ValueError):
        split_tokens(tokens, 0.0)


def test_lm_batch() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = lm_batch(tokens, batch_size=4, block_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    torch.testing.assert_close(y, x + 1)  # tokens are consecutive numbers here
    expected = torch.randint(1000 - 8, (4,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[:, 0], expected)  # the documented offsets
    x2, y2 = lm_batch(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = lm_batch(tokens, 4, 8, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_lm_batch_smallest_and_too_short() -> None:
    tokens = np.arange(9, dtype=np.uint16)
    x, y = lm_batch(tokens, 2, 8, torch.Generator().manual_seed(0))  # exactly block_size + 1 tokens
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))
    with pytest.raises(DataError, match="needs at least 9"):
        lm_batch(tokens[:8], 2, 8, torch.Generator())


def _rss_file_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_lm_batch_on_a_token_file_does_not_keep_its_pages_mapped(tmp_path: Path) -> None:
    """Random windows of a memory-mapped token file: the same windows as from memory, and the pages read
    are unmapped again, so the resident set does not grow with the file (bench/corpus_scale.py)."""
    out = tmp_path / "big.bin"
    tokens = (np.arange(8 * 2**20, dtype=np.int64) % 5000).astype(np.uint16)  # 16 MB
    tokens.tofile(out)
    (tmp_path / "big.bin.json").write_text(f'{{"dtype": "uint16", "num_tokens": {len(tokens)}}}')
    mapped = open_token_file(out)
    train, _ = split_tokens(mapped, 0.9)  # a slice of the map, as the tasks use
    before = _rss_file_kb()
    for n in range(40):
        x, y = lm_batch(train, 32, 64, torch.Generator().manual_seed(n))
        x_mem, y_mem = lm_batch(tokens[: len(train)], 32, 64, torch.Generator().manual_seed(n))
        assert torch.equal(x, x_mem) and torch.equal(y, y_mem)
    after = _rss_file_kb()
    if before is not None and after is not None:  # Linux: 1,280 windows would map far more than 4 MB
        assert after - before < 4096, (before, after)


def test_lm_batch_releases_a_token_file_pages_every_few_windows(tmp_path: Path, monkeypatch) -> None:
    """An evaluation's hundreds of windows do not all map their pages at once: the peak stays small."""
    from tansuo.data import text

    out = tmp_path / "t.bin"
    (np.arange(4096, dtype=np.int64) % 50).astype(np.uint16).tofile(out)
    (tmp_path / "t.bin.json").write_text('{"dtype": "uint16", "num_tokens": 4096}')
    calls = []
    monkeypatch.setattr(text, "release_pages", lambda tokens: calls.append(len(tokens)))
    x, _ = lm_batch(open_token_file(out), 20, 16, torch.Generator().manual_seed(0))
    assert x.shape == (20, 16) and len(calls) == -(-20 // text.WINDOWS_PER_RELEASE)
    calls.clear()
    lm_batch(np.zeros(4096, dtype=np.uint16), 20, 16, torch.Generator().manual_seed(0))
    assert len(calls) == 1  # an array in memory: one (no-op) call
