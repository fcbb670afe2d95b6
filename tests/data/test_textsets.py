"""Labelled-text readers and the WordPiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tansuo.data import load_wordpiece_vocab, read_labelled_text, train_wordpiece_tokenizer
from tansuo.errors import DataError


def test_reads_csv_tsv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('sentence,label\n"good, really",1\n,0\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"sentence": "good", "label": 1}\n\n{"sentence": "", "label": 0}\n')
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood\t1\n\t0\n", encoding="utf-8")
    want = [("good", None, "1"), ("", None, "0")]
    assert read_labelled_text(tmp_path / "a.csv") == [("good, really", None, "1"), ("", None, "0")]
    assert read_labelled_text(tmp_path / "a.jsonl") == want
    assert read_labelled_text(tmp_path / "a.tsv") == want


def test_tsv_keeps_unbalanced_quotes(tmp_path: Path) -> None:
    path = tmp_path / "sst.tsv"
    path.write_text("sentence\tlabel\nit 's a \" quoted mess\t1\nfine\t0\n", encoding="utf-8")
    assert read_labelled_text(path) == [("it 's a \" quoted mess", None, "1"), ("fine", None, "0")]


def test_pairs_and_format_override(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("q,a,y\nwho,me,yes\n", encoding="utf-8")
    rows = read_labelled_text(path, text_column="q", text_pair_column="a", label_column="y", format="csv")
    assert rows == [("who", "me", "yes")]


def test_missing_column_names_file_and_lists_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("text\ttarget\nhi\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.tsv:1: .*'sentence'.*\['text', 'target'\]"):
        read_labelled_text(path)


def test_malformed_rows_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed row"):
        read_labelled_text(path)
    tsv = tmp_path / "x.tsv"
    tsv.write_text("sentence\tlabel\na\t1\nb\t0\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.tsv:3: malformed row: 3 fields"):
        read_labelled_text(tsv)


def test_empty_file_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_labelled_text(tmp_path / "e.csv")
    (tmp_path / "e.xls").write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="format"):
        read_labelled_text(tmp_path / "e.xls")


def test_wordpiece_special_tokens_and_template(tmp_path: Path) -> None:
    tok = train_wordpiece_tokenizer(["Good movie, great acting!", "bad plot"] * 10, vocab_size=120)
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    single = tok.encode("GOOD movie")
    assert single.tokens == ["[CLS]", "good", "movie", "[SEP]"]
    pair = tok.encode("good", "bad plot")
    assert pair.tokens == ["[CLS]", "good", "[SEP]", "bad", "plot", "[SEP]"]
    assert pair.type_ids == [0, 0, 0, 1, 1, 1]
    assert tok.decode(single.ids) == "good movie"
    assert tok.encode("zzz").tokens[1] == "[UNK]"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n", encoding="utf-8")
    again = load_wordpiece_vocab(vocab)
    assert again.encode("good", "bad plot").ids == pair.ids
    with pytest.raises(DataError, match="not found"):
        load_wordpiece_vocab(tmp_path / "nope.txt")
