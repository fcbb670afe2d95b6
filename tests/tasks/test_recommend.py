"""The recommend task: ranking metrics, leave-one-out windows, seen items, masks, learning, predict."""

import math

import pytest
import torch

from tansuo.errors import DataError
from tansuo.models import create_model
from tansuo.tasks.metrics import ranking_metrics, target_ranks
from tests.helpers import make_trainer, recommend_recipe, task_from, write_interactions

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ metrics


def test_ranking_metrics_equal_hand_computations():
    scores = torch.tensor(
        [
            [0.0, 0.9, 0.8, 0.1, 0.5],  # target 2: behind item 1 -> rank 2
            [0.0, 0.9, 0.8, 0.1, 0.5],  # target 3, items 1 and 2 seen (excluded): behind 4 -> rank 2
            [0.0, 0.5, 0.5, 0.5, 0.1],  # target 3, tied with 1 and 2 (lower columns first) -> rank 3
        ]
    )
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[1, [1, 2]] = True
    ranks = target_ranks(scores, torch.tensor([2, 3, 3]), exclude)
    assert ranks.tolist() == [2, 2, 3]
    got = ranking_metrics(ranks, ks=(1, 2, 3))
    assert got["hr@1"] == 0.0
    assert got["hr@2"] == pytest.approx(2 / 3)
    assert got["ndcg@2"] == pytest.approx((1 / math.log2(3) * 2) / 3)
    assert got["ndcg@3"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert got["mrr@3"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert got["mrr@2"] == pytest.approx(1 / 3)
    assert set(ranking_metrics(ranks, prefix="sampled_")) >= {
        "sampled_hr@10",
        "sampled_ndcg@10",
        "sampled_mrr@20",
    }


# ------------------------------------------------------------------------------------------------ data


def _hand_log(tmp_path, max_len=2):
    log = tmp_path / "log.tsv"
    # user a: i1..i6 by time (rows out of order); user b: j1, j2 (test only); user c: one item (train only)
    rows = [("a", f"i{k}", 10 * k) for k in (3, 1, 6, 2, 5, 4)] + [
        ("b", "j2", 2),
        ("b", "j1", 1),
        ("c", "i1", 5),
    ]
    log.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    raw = recommend_recipe(log, tmp_path / "run")
    raw["data"]["max_len"] = max_len
    return task_from(raw)


def test_leave_one_out_windows_and_history_cut_on_a_hand_made_log(tmp_path):
    task = _hand_log(tmp_path, max_len=2)
    name = {i + 1: raw for i, raw in enumerate(task.items)}
    split = task.split()
    assert [[name[i] for i in seq] for seq in split.train] == [["i1", "i2", "i3", "i4"], ["j1"], ["i1"]]
    assert [name.get(i) for i in split.val] == ["i5", None, None]
    assert [name.get(i) for i in split.test] == ["i6", "j2", None]
    # windows of max_len + 1 items cut back from the end: every training target in exactly one
    windows = [[name[i] for i in split.train[u][s:e]] for u, s, e in task.rows()]
    assert windows == [["i2", "i3", "i4"], ["i1", "i2"]]
    val = task._eval_split("val")
    test = task._eval_split("test")
    assert [[name[i] for i in h] for h in val.histories] == [["i3", "i4"]]  # cut to the last 2
    assert [[name[i] for i in h] for h in test.histories] == [["i4", "i5"], ["j1"]]
    assert [[name[i] for i in h] for h in test.seen] == [["i1", "i2", "i3", "i4", "i5"], ["j1"]]


def test_sampled_negatives_are_items_the_user_never_touched_and_fixed(tmp_path):
    task = task_from(recommend_recipe(write_interactions(tmp_path / "log.tsv"), tmp_path / "run"))
    split, part = task.split(), task._eval_split("test")
    users = [u for u, t in enumerate(split.test) if t]
    for row, u in enumerate(users):
        touched = {*split.train[u], split.val[u], split.test[u]}
        assert not touched & set(part.negatives[row].tolist())
    again = task_from(recommend_recipe(tmp_path / "log.tsv", tmp_path / "run2"))._eval_split("test")
    assert torch.equal(part.negatives, again.negatives)


def test_no_seen_item_is_ranked(tmp_path):
    task = _hand_log(tmp_path)
    index = {raw: i + 1 for i, raw in enumerate(task.items)}  # i3 i1 i6 i2 i5 i4 j2 j1 (file order)
    model = create_model("pop", **task.model_overrides())
    with torch.no_grad():  # what users have seen scores highest, then the test targets
        for raw in ("i1", "i2", "i3", "i4", "i5", "j1"):
            model.item_bias[index[raw]] = 10.0
        for raw in ("i6", "j2"):
            model.item_bias[index[raw]] = 5.0
    got = task.evaluate(model, "test", 16, CPU)
    # a: its seen i1..i5 are out, j1 (seen by b only) is ahead of i6; b: j1 is out, i1..i5 and i6 (a tie,
    # lower index) are ahead of j2
    assert got["mrr@20"] == pytest.approx((1 / 2 + 1 / 7) / 2)
    assert got["hr@5"] == 0.5
    task.data = task.data.model_copy(update={"exclude_seen": False})
    assert task.evaluate(model, "test", 16, CPU)["mrr@20"] == pytest.approx((1 / 7 + 1 / 8) / 2)
    row = task.predict(model, ["i1,i2,i3"], CPU, k=8)[0]
    assert [item["item"] for item in row["items"]] == ["i5", "i4", "j1", "i6", "j2"]


# ------------------------------------------------------------------------------------------------ models


def test_the_causal_mask_keeps_sasrec_from_seeing_later_items():
    torch.manual_seed(0)
    model = create_model("sasrec_test").eval()
    items = torch.randint(1, 41, (2, 8))
    later = items.clone()
    later[:, 5:] = torch.randint(1, 41, (2, 3))
    with torch.no_grad():
        a, b = model.forward_features(items), model.forward_features(later)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("name", ["sasrec_test", "bert4rec_test", "gru4rec_test", "mf_test"])
def test_a_history_scores_the_same_however_it_is_padded(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    history = torch.tensor([[3, 9, 4]])
    padded = torch.tensor([[0, 0, 0, 3, 9, 4], [5, 6, 7, 8, 1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.next_item_scores(history)[0], model.next_item_scores(padded)[0])


def test_masked_models_hide_items_and_predict_them(tmp_path):
    task = task_from(
        recommend_recipe(write_interactions(tmp_path / "log.tsv"), tmp_path / "run", "bert4rec_test")
    )
    model = create_model("bert4rec_test", **task.model_overrides())
    batch = next(task.train_batches(16, 0))
    items, targets, _ = task._inputs(model, batch)
    hidden = items == model.mask_id
    assert torch.equal(hidden, targets != 0)
    assert bool(hidden.any(dim=1).all())  # every row hides at least one item
    assert torch.equal(targets[hidden], batch["window"][:, 1:][hidden])


# ------------------------------------------------------------------------------------------------ learning


def _learn_cycle(tmp_path, model: str, steps: int = 60, **data: object) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = recommend_recipe(write_interactions(tmp_path / "log.tsv"), tmp_path / "run", model, max_steps=steps)
    raw["data"].update(data)
    trainer = make_trainer(raw)
    trainer.fit()
    return trainer.task.evaluate(trainer.model, "test", 64, CPU)


def test_sasrec_learns_a_cycle_to_hr_at_1(tmp_path):
    got = _learn_cycle(tmp_path, "sasrec_test")
    assert got["mrr@5"] == 1.0  # every test target ranked first: HR@1 = 1
    assert got["ndcg@10"] == 1.0 and got["sampled_hr@5"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "data", "floor"),
    [
        ("sasrec_test", {"loss": "bce"}, 1.0),
        ("gru4rec_test", {}, 1.0),
        ("mf_test", {"loss": "bpr"}, 0.0),  # order-free: it cannot tell which seen item came last
        # the cloze task trains the newest position only when it is hidden: more hidden items learn faster
        ("bert4rec_test", {"mask_ratio": 0.4}, 0.95),
    ],
)
def test_every_model_learns_a_cycle_better_than_most_popular(tmp_path, model, data, floor):
    got = _learn_cycle(tmp_path / model, model, steps=300, **data)
    popular = _learn_cycle(tmp_path / "pop", "pop", steps=300)
    assert got["mrr@5"] >= floor
    assert got["ndcg@10"] > popular["ndcg@10"] + 0.1


# ------------------------------------------------------------------------------------------------ predict


def test_predict_takes_ids_or_titles_and_scores_candidates(tmp_path):
    log = write_interactions(tmp_path / "log.tsv")
    titles = tmp_path / "titles.tsv"
    titles.write_text("item_id\ttitle\n" + "".join(f"m{i}\tFilm, number {i}\n" for i in range(24)))
    raw = recommend_recipe(log, tmp_path / "run")
    raw["data"]["titles"] = str(titles)
    task = task_from(raw)
    torch.manual_seed(0)
    model = create_model("sasrec_test", **task.model_overrides())
    by_id = task.predict(model, ["m1,m2"], CPU, k=5, candidates="m3,m1")[0]
    by_title = task.predict(model, ["film, number 1|Film, number 2"], CPU, k=5)[0]
    assert by_id["items"] == by_title["items"] and len(by_id["items"]) == 5
    assert by_id["items"][0]["title"].startswith("Film, number")
    probabilities = [item["probability"] for item in by_id["items"]]
    assert probabilities == sorted(probabilities, reverse=True)
    m3, m1 = by_id["candidates"]
    assert m1["probability"] == 0.0 and 0 < m3["probability"] < 1  # m1 is in the history
    text = task.format_prediction(by_id, 3)
    assert "history: m1, m2" in text and "candidate" in text
    with pytest.raises(DataError, match=r"input 1: unknown items \['m99', 'nope'\]"):
        task.predict(model, ["m1,m99,nope"], CPU)
    with pytest.raises(DataError, match="input 1 is empty"):
        task.predict(model, [" , "], CPU)
