"""Interaction logs: every reader, time order, the leave-one-out split, history cuts and the errors."""

import json

import pytest

from tansuo.data.interactions import Columns, cut_history, leave_one_out, read_interactions, read_titles
from tansuo.errors import DataError


def test_u_data_is_read_ordered_by_time_with_ties_in_file_order(tmp_path):
    path = tmp_path / "u.data"
    # user 7: items 3 (t=30), 1 (t=10), 2 (t=20), 9 (t=20, after 2 in the file); user 5: one item
    path.write_text("7\t3\t4\t30\n7\t1\t5\t10\n5\t4\t1\t99\n7\t2\t3\t20\n7\t9\t2\t20\n")
    log = read_interactions(path)
    assert log.users == ["7", "5"]
    assert log.sequences == [["1", "2", "9", "3"], ["4"]]
    assert log.items == ["3", "1", "4", "2", "9"]  # first appearance in the file
    assert log.rows == 5


def test_a_rating_threshold_keeps_only_positive_interactions(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t10\t5\t1\n1\t11\t2\t2\n1\t12\t4\t3\n")
    log = read_interactions(path, Columns(rating="rating", threshold=4))
    assert log.sequences == [["10", "12"]]


def test_csv_jsonl_and_recbole_inter_files_give_the_same_sequences(tmp_path):
    rows = [("a", "x", 3), ("b", "y", 1), ("a", "z", 2), ("b", "x", 5)]
    csv = tmp_path / "log.csv"
    csv.write_text("who,what,when\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("".join(json.dumps({"who": u, "what": i, "when": t}) + "\n" for u, i, t in rows))
    inter = tmp_path / "ml.inter"
    inter.write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    )
    named = Columns(user="who", item="what", time="when")
    want = [["z", "x"], ["y", "x"]]
    assert read_interactions(csv, named).sequences == want
    assert read_interactions(jsonl, named).sequences == want
    assert read_interactions(inter).sequences == want


def test_iso_dates_are_times_and_no_time_column_means_file_order(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("user_id\titem_id\ttimestamp\nu\tb\t2024-05-02\nu\ta\t2024-05-01T10:00\n")
    assert read_interactions(path).sequences == [["a", "b"]]
    assert read_interactions(path, Columns(time=None)).sequences == [["b", "a"]]


def test_leave_one_out_is_recbole_s_valid_and_test_split():
    split = leave_one_out([[1, 2, 3, 4, 5], [6, 7], [8], [9, 10, 11]])
    assert split.train == [[1, 2, 3], [6], [8], [9]]
    assert split.val == [4, 0, 0, 10]
    assert split.test == [5, 7, 0, 11]
    assert split.history("val", 0) == [1, 2, 3]
    assert split.history("test", 0) == [1, 2, 3, 4]
    assert split.history("test", 1) == [6]  # no validation target: the test history is training only


def test_histories_are_cut_to_their_last_items():
    assert cut_history([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert cut_history([1, 2], 3) == [1, 2]


def test_titles_from_u_item_in_latin_1_and_from_a_table(tmp_path):
    item = tmp_path / "u.item"
    item.write_bytes(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0\n2|Caf\xe9 (1994)|x||y|1\n".encode("latin-1")
    )
    assert read_titles(item) == {"1": "Toy Story (1995)", "2": "Café (1994)"}
    table = tmp_path / "titles.csv"
    table.write_text("item_id,title\n1,One\n")
    assert read_titles(table) == {"1": "One"}


@pytest.mark.parametrize(
    ("name", "text", "columns", "message"),
    [
        ("log.csv", "user,item_id,timestamp\na,b,1\n", Columns(), "log.csv:1: no column 'user_id'"),
        (
            "log.csv",
            "user_id,item_id,timestamp\na,b,1\na,c,soon\n",
            Columns(),
            "log.csv:3: column 'timestamp'",
        ),
        ("log.csv", "user_id,item_id,timestamp\na,b\n", Columns(), "log.csv:2: 2 fields, the header has 3"),
        ("log.csv", "user_id,item_id,timestamp\n,b,1\n", Columns(), "log.csv:2: column 'user_id' is empty"),
        ("u.data", "1\t2\t3\n", Columns(), "u.data:1: expected 4 tab-separated fields"),
        ("log.jsonl", '{"user_id": 1}\n', Columns(time=None), "log.jsonl:1: no key 'item_id'"),
        ("log.jsonl", "[1, 2]\n", Columns(), "log.jsonl:1: expected a JSON object"),
        ("log.txt", "x\n", Columns(), "set data.format"),
        (
            "log.csv",
            "user_id,item_id,rating\na,b,1\n",
            Columns(time=None, rating="rating", threshold=4),
            "no int",
        ),
    ],
)
def test_bad_logs_are_data_errors_naming_file_line_and_column(tmp_path, name, text, columns, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_interactions(path, columns)
    assert str(path.name) in str(info.value)


def test_a_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="interaction file not found.*u.data"):
        read_interactions(tmp_path / "nope.data")
