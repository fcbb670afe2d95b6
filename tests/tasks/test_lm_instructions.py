"""The ``lm`` task on instruction data: the loss counts only the assistant's tokens, packing, held-back
evaluation independent of the batch size, batches a pure function of the step, data errors with line numbers,
and ``tansuo train`` end to end into a bundle that chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tansuo.bundle import load_bundle
from tansuo.data.instructions import IGNORE_INDEX
from tansuo.errors import DataError
from tansuo.models import create_model
from tansuo.tasks.lm import LMTask
from tests.helpers import run, task_from, write_recipe

CPU = torch.device("cpu")
#: a tiny ChatML-like template: each turn "<s>role\ncontent</s>\n"
TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}"
)
CHAT = {"template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
GOOD = ["sun", "cake", "song", "gift", "joke"]
BAD = ["rain", "mud", "flu", "debt", "fog"]


def write_instructions(path: Path, n: int = 60) -> Path:
    """``n`` questions "is X good?" (yes or no, as X decides), some with a system turn; one multi-turn."""
    lines = []
    for i in range(n):
        word = (GOOD if i % 2 else BAD)[(i // 2) % 5]
        record = {"prompt": f"is {word} good?", "response": "yes" if i % 2 else "no"}
        if i % 7 == 0:
            record["system"] = "answer yes or no"
        lines.append(json.dumps(record))
    turns = [
        {"role": "user", "content": "is sun good?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "is fog good?"},
        {"role": "assistant", "content": "no"},
    ]
    lines.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe(data: Path, out: Path, **fields: object) -> dict:
    """A tiny GPT fine-tuned on instructions with a character tokenizer and :data:`CHAT`."""
    return {
        "task": "lm",
        "seed": 3,
        "data": {"path": str(data), "block_size": 64, "chat": CHAT, **fields},
        "model": {"name": "gpt_test", "overrides": {"dropout": 0.0}},
        "train": {"out_dir": str(out), "max_steps": 12, "batch_size": 4, "lr": 3e-3, "log_every": 4},
    }


@pytest.fixture
def task(tmp_path: Path) -> LMTask:
    return task_from(recipe(write_instructions(tmp_path / "qa.jsonl"), tmp_path / "run"))


def _model(task: LMTask) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("gpt_test", dropout=0.0, **task.model_overrides()).eval()


def _decode_targets(task: LMTask, y: torch.Tensor) -> list[str]:
    return [task.tokenizer.id_to_token(int(t)) for t in y[y != IGNORE_INDEX]]


def test_jsonl_is_read_as_instructions_and_text_stays_text(tmp_path: Path) -> None:
    data = write_instructions(tmp_path / "qa.jsonl")
    assert task_from(recipe(data, tmp_path / "a")).data.instructions()
    plain = tmp_path / "qa.txt"
    plain.write_text(data.read_text())
    assert task_from(recipe(plain, tmp_path / "b", format="instructions")).data.instructions()
    as_text = task_from(recipe(data, tmp_path / "c", format="text", block_size=16))
    assert not as_text.data.instructions() and as_text.steps_per_epoch(4) is None


def test_only_the_assistants_tokens_and_end_of_turn_are_targets(task: LMTask) -> None:
    eos = task.tokenizer.token_to_id("</s>")
    assert eos is not None  # the template's special tokens were added to the trained tokenizer whole
    for batch in task.train_batches(8, 0):
        for x, y in zip(batch["x"], batch["y"], strict=True):
            targets = "".join(_decode_targets(task, y))
            answers = targets.split("</s>")
            assert answers[-1] == "" and set(answers[:-1]) <= {"yes", "no"}  # each ends with the end of turn
            # every target follows the opened assistant turn or an earlier answer token
            text = task.tokenizer.decode(x.tolist(), skip_special_tokens=False)
            assert text.count("<s>assistant\n") == len(answers) - 1
        break


def test_the_loss_counts_only_the_assistants_tokens(task: LMTask) -> None:
    model = _model(task)
    batch = next(task.train_batches(4, 0))
    y = batch["y"]
    assert task.count(batch) == int((y != IGNORE_INDEX).sum()) < y.numel()
    with torch.no_grad():
        logits = model(batch["x"])  # (B, T, V)
        loss = task.loss(model, batch)
        scored, targets = task.logits(model, batch)
    keep = y != IGNORE_INDEX
    want = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(F.cross_entropy(scored, targets), want)
    assert targets.shape == (task.count(batch),)

    class Scrambled(torch.nn.Module):  # other logits wherever nothing is learned: the same loss
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = model(x).clone()
            out[~keep] = torch.randn_like(out[~keep]) * 10
            return out

    with torch.no_grad():
        torch.testing.assert_close(task.loss(Scrambled(), batch), loss)


def test_packing_fills_rows_with_whole_examples(tmp_path: Path) -> None:
    data = write_instructions(tmp_path / "qa.jsonl")
    packed = task_from(recipe(data, tmp_path / "a", block_size=160))
    alone = task_from(recipe(data, tmp_path / "b", block_size=160, packing=False))
    per_row = packed.steps_per_epoch(1)
    assert alone.steps_per_epoch(1) == 55  # round(0.9 x 61) examples, one a row
    assert per_row is not None and per_row < 55 / 3  # three or more short questions a row
    label_count = sum(
        packed.count(b) for b, _ in zip(packed.train_batches(1, 0), range(per_row), strict=False)
    )
    alone_count = sum(alone.count(b) for b, _ in zip(alone.train_batches(1, 0), range(55), strict=False))
    assert label_count == alone_count  # the same examples, the same targets
    for batch, _ in zip(packed.train_batches(1, 0), range(per_row), strict=False):
        text = packed.tokenizer.decode(batch["x"][0].tolist(), skip_special_tokens=False)
        assert text.startswith("<s>")  # a row starts with an example, never in the middle of one
        assert batch["x"].shape[1] <= 160


def test_training_batches_are_a_pure_function_of_the_step(task: LMTask) -> None:
    def nth(start: int, n: int) -> dict[str, torch.Tensor]:
        for i, b in enumerate(task.train_batches(4, start)):
            if i == n:
                return b
        raise AssertionError

    per_epoch = task.steps_per_epoch(4)
    assert per_epoch is not None
    for step in (0, 3, per_epoch, per_epoch + 2):  # within the first epoch and into the second
        a, b = nth(0, step), nth(step, 0)
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert not torch.equal(nth(0, 0)["x"], nth(per_epoch, 0)["x"][: len(nth(0, 0)["x"])])


def test_evaluation_is_the_loss_per_assistant_token_whatever_the_batch_size(task: LMTask) -> None:
    model = _model(task)
    results = [task.evaluate(model, "val", bs, CPU) for bs in (1, 3, 64)]
    for r in results[1:]:
        assert r["loss"] == pytest.approx(results[0]["loss"], abs=1e-5)
    # by hand: each held-back example alone, the summed loss of its labelled tokens over their number
    rows = task._instruction_rows()[1]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            b = rows.batch([i])
            keep = b["y"] != IGNORE_INDEX
            total += F.cross_entropy(model(b["x"])[keep], b["y"][keep], reduction="sum").item()
            tokens += int(keep.sum())
    assert results[0]["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert len(rows) == 6  # 61 examples, round(0.9 x 61) = 55 train


def test_a_bad_line_is_a_data_error_with_its_line_number(tmp_path: Path) -> None:
    data = write_instructions(tmp_path / "qa.jsonl", n=5)
    data.write_text(data.read_text() + '{"prompt": "no response"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:7: neither messages nor prompt and response"):
        task_from(recipe(data, tmp_path / "run"))


def test_a_role_the_template_refuses_is_a_data_error_with_its_line_number(tmp_path: Path) -> None:
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    data = write_instructions(tmp_path / "qa.jsonl", n=5)  # line 1 has a system turn
    raw = recipe(data, tmp_path / "run")
    raw["data"]["chat"] = {"template": strict, "eos_token": "</s>"}
    with pytest.raises(DataError, match=r"qa\.jsonl:1: .*no system turns"):
        task_from(raw)


def test_an_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        task_from(recipe(empty, tmp_path / "run"))


def test_without_a_template_the_plain_format_is_used_and_kept(tmp_path: Path) -> None:
    raw = recipe(write_instructions(tmp_path / "qa.jsonl"), tmp_path / "run")
    del raw["data"]["chat"]
    task = task_from(raw)
    assert task.chat is not None and task.chat["eos_token"] == "<|endoftext|>"
    assert task.chat_prompt([{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "
    batch = next(task.train_batches(4, 0))
    assert "".join(_decode_targets(task, batch["y"][0])).endswith("<|endoftext|>")


def test_tansuo_train_on_instructions_writes_a_bundle_that_chats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    raw = recipe(write_instructions(tmp_path / "qa.jsonl"), tmp_path / "run")
    raw["model"]["overrides"] = {"dropout": 0.0, "embed_dim": 64}
    raw["train"].update(max_steps=150, batch_size=8, lr=1e-2, warmup_steps=10, eval_every=75)
    path = write_recipe(tmp_path / "recipe.yaml", raw)
    code, out, err = run(["train", str(path)], monkeypatch, capsys)
    assert code == 0, out + err
    bundle = tmp_path / "run" / "bundle"
    info = json.loads((bundle / "task.json").read_text())
    assert info["chat"] == CHAT and info["data"]["path"] == raw["data"]["path"]
    b = load_bundle(bundle)
    metrics = b.task.evaluate(b.model, "val", 16, CPU)
    assert metrics["loss"] < 0.5  # yes / no and the end of the turn, given the question
    answer = b.task.reply(b.model, [{"role": "user", "content": "is cake good?"}], temperature=0.0)
    assert answer == "yes"  # decoding stopped at the learned end of turn
    code, out, err = run(
        ["generate", str(bundle), "--chat", "--prompt", "is mud good?", "--temperature", "0"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and out.strip() == "no", out + err


def test_a_bundle_folder_as_tokenizer_gives_its_chat_template_and_data_chat_overrides_it(
    tmp_path: Path,
) -> None:
    from tansuo.data import save_tokenizer, train_char_tokenizer

    bundle = tmp_path / "chat-model"  # what a bundle imported from a chat model holds, in small
    bundle.mkdir()
    tok = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz ?\n"])
    tok.add_special_tokens(["<s>", "</s>"])
    save_tokenizer(tok, bundle / "tokenizer.json")
    (bundle / "task.json").write_text(json.dumps({"task": "lm", "chat": CHAT}))
    raw = recipe(
        write_instructions(tmp_path / "qa.jsonl"), tmp_path / "a", tokenizer=str(bundle), packing=False
    )
    del raw["data"]["chat"]
    task = task_from(raw)
    assert task.chat == CHAT and task.vocab_size == tok.get_vocab_size()
    batch = next(task.train_batches(4, 0))
    assert "".join(_decode_targets(task, batch["y"][0])) in ("yes</s>", "no</s>")
    raw["data"]["chat"] = {"eos_token": "<s>"}  # one field replaced, the rest kept
    raw["train"]["out_dir"] = str(tmp_path / "b")
    assert task_from(raw).chat == {**CHAT, "eos_token": "<s>"}
