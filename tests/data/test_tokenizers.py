"""Character and byte-level BPE tokenizers: exact round trips, vocabulary order, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tansuo.data import (
    decode,
    encode,
    encoder_tokenizer,
    is_char_tokenizer,
    load_tokenizer,
    save_tokenizer,
    texts_digest,
    train_bpe_tokenizer,
    train_char_tokenizer,
    trained_once,
)
from tansuo.errors import DataError

TRICKY = "Hello,  world!\n\n\tTabs\tand  double  spaces \r\nünïcödé 你好 😀 e\u0301 \u00a0end \n"


def test_char_tokenizer_round_trips_whitespace_and_unicode() -> None:
    tok = train_char_tokenizer([TRICKY])
    ids = encode(tok, TRICKY)
    assert len(ids) == len(TRICKY)  # one token per code point, combining accents included
    assert decode(tok, ids) == TRICKY
    assert tok.decode(ids) == TRICKY  # the library's own decoder agrees (Fuse, no spaces inserted)
    assert tok.encode(TRICKY).ids == ids  # the fast path gives the library's ids


def test_char_tokenizer_ids_follow_sorted_characters() -> None:
    texts = ["ba\nc", "a b", "Z!"]  # chunks: the vocabulary is their union
    tok = train_char_tokenizer(iter(texts))
    chars = sorted(set("".join(texts)))
    assert tok.get_vocab_size() == len(chars) == 7
    assert tok.get_vocab() == {char: index for index, char in enumerate(chars)}
    assert encode(tok, "\n !Zabc") == list(range(7))  # already in sorted order
    assert tok.get_added_tokens_decoder() == {}  # no special tokens
    assert is_char_tokenizer(tok)


def test_char_tokenizer_unseen_character() -> None:
    tok = train_char_tokenizer(["abc "])
    with pytest.raises(DataError, match=r"'x' \(U\+0078\) at position 2"):
        encode(tok, "abx c")
    assert decode(tok, encode(tok, "abx c", strict=False)) == "ab c"  # dropped, with a warning
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        decode(tok, [0, 7])


def test_char_tokenizer_needs_text() -> None:
    with pytest.raises(DataError, match="empty text"):
        train_char_tokenizer(["", ""])


def test_bpe_round_trip_and_vocab_bound() -> None:
    corpus = ["the cat sat on the mat\n", "the dog sat on the log\n"] * 50
    tok = train_bpe_tokenizer(corpus, vocab_size=300)
    assert 256 < tok.get_vocab_size() <= 300
    assert not is_char_tokenizer(tok)
    for text in [corpus[0], TRICKY, "never seen: Ωμέγα ✓ \x00\x7f"]:
        ids = encode(tok, text)
        assert decode(tok, ids) == text
    assert len(encode(tok, "the cat sat on the mat")) < len("the cat sat on the mat")  # merges are used
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        train_bpe_tokenizer(corpus, vocab_size=100)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load(tmp_path: Path, kind: str) -> None:
    tok = train_char_tokenizer([TRICKY]) if kind == "char" else train_bpe_tokenizer([TRICKY] * 5, 270)
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    assert json.loads(path.read_text(encoding="utf-8"))["model"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind
    loaded = load_tokenizer(path)
    assert is_char_tokenizer(loaded) == (kind == "char")
    assert encode(loaded, TRICKY) == encode(tok, TRICKY)
    assert decode(loaded, encode(loaded, TRICKY)) == TRICKY


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_encoder_tokenizers_have_bert_specials_and_template(tmp_path: Path) -> None:
    from tansuo.data import encoder_tokenizer

    texts = ["a gorgeous, witty film", "a dull, clumsy plot"] * 50
    for spec in ("wordpiece", "bpe"):
        tok = encoder_tokenizer(spec, lambda: iter(texts), 300)
        assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
        enc = tok.encode("a witty film", "a dull plot")
        assert enc.ids[0] == 2 and enc.ids.count(3) == 2
        assert enc.type_ids[-1] == 1 and enc.type_ids[0] == 0
        decoded = tok.decode(tok.encode("A gorgeous, witty film").ids)
        # byte-level BPE round-trips exactly; WordPiece lower-cases and spaces punctuation
        assert decoded == ("A gorgeous, witty film" if spec == "bpe" else "a gorgeous, witty film")
        save_tokenizer(tok, tmp_path / f"{spec}.json")
        again = encoder_tokenizer(str(tmp_path / f"{spec}.json"), lambda: iter(()), 0)
        assert again.encode("a witty film").ids == tok.encode("a witty film").ids
    with pytest.raises(DataError, match="vocab_size >= 261"):
        encoder_tokenizer("bpe", lambda: iter(texts), 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.txt"):
        encoder_tokenizer(str(tmp_path / "empty"), lambda: iter(()), 0)


def test_trained_once_reuses_the_tokenizer_trained_for_the_same_key(tmp_path: Path) -> None:
    texts = ["the film was good", "the film was bad"] * 20
    calls: list[int] = []

    def train():  # noqa: ANN202
        calls.append(1)
        return encoder_tokenizer("wordpiece", lambda: iter(texts), 64)

    path = tmp_path / "tokenizer.json"
    key = ["wordpiece", 64, texts_digest(texts)]
    first = trained_once(path, key, train)
    again = trained_once(path, key, train)  # another rank, or a resumed run: read, not trained
    assert len(calls) == 1 and again.get_vocab() == first.get_vocab()
    assert json.loads((tmp_path / "tokenizer-spec.json").read_text()) == key
    trained_once(path, ["wordpiece", 64, texts_digest(texts[:-1])], train)  # other texts: trained again
    assert len(calls) == 2
