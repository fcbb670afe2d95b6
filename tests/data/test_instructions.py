"""Instruction data: reading JSONL, the assistant's spans found by incremental rendering, packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tansuo.data import train_char_tokenizer
from tansuo.data.chat import ChatError
from tansuo.data.instructions import (
    IGNORE_INDEX,
    PLAIN_EOS,
    PLAIN_TEMPLATE,
    Example,
    encode_segments,
    fit_length,
    one_per_row,
    pack,
    read_conversations,
    render_segments,
)
from tansuo.errors import DataError

#: a tiny ChatML-like template: each turn "<s>role\ncontent</s>\n"
TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}"
)
CHAT = {"template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
#: SmolLM2's habit: a default system turn when the conversation has none
WITH_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<s>system\\nbe kind</s>\\n' }}"
    "{% endif %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def _tokenizer(*specials: str):
    tok = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz ?!.:\n<>/|"])
    if specials:
        tok.add_special_tokens(list(specials))
    return tok


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _labelled(tok, example: Example) -> list[str]:
    """The labelled tokens of an example, each as text, in order."""
    return [tok.id_to_token(int(i)) for i, m in zip(example.ids, example.labelled, strict=True) if m]


def test_prompt_and_response_label_exactly_the_answer_and_its_end_of_turn() -> None:
    tok = _tokenizer("<s>", "</s>")
    messages = [{"role": "user", "content": "is it good?"}, {"role": "assistant", "content": "yes"}]
    ex = encode_segments(render_segments(messages, CHAT), tok, tok.token_to_id("</s>"))
    prompt = _ids(tok, "<s>user\nis it good?</s>\n<s>assistant\n")
    assert ex.ids.tolist() == prompt + _ids(tok, "yes</s>\n")
    want = [False] * len(prompt) + [True] * 4 + [False]  # y, e, s, </s>; not the newline after it
    assert ex.labelled.tolist() == want
    x, y = ex.pairs()
    assert x.tolist() == ex.ids[:-1].tolist()
    kept = y != IGNORE_INDEX
    assert y[kept].tolist() == _ids(tok, "yes</s>")
    assert np.flatnonzero(kept).tolist() == list(range(len(prompt) - 1, len(prompt) + 3))


def test_multi_turn_labels_each_assistant_turn_and_nothing_else() -> None:
    tok = _tokenizer("<s>", "</s>")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
        {"role": "user", "content": "left out: nothing answers it"},
    ]
    pieces = render_segments(messages, CHAT)
    assert [said for _, said in pieces] == [False, True, False, True]
    assert "".join(text for text, _ in pieces) == (
        "<s>system\nbe brief</s>\n<s>user\nhi</s>\n<s>assistant\nhello</s>\n<s>user\nbye</s>\n"
        "<s>assistant\nciao</s>\n"
    )
    ex = encode_segments(pieces, tok, tok.token_to_id("</s>"))
    assert _labelled(tok, ex) == [*"hello", "</s>", *"ciao", "</s>"]


def test_a_default_system_turn_the_template_adds_is_not_labelled() -> None:
    tok = _tokenizer("<s>", "</s>")
    chat = {"template": WITH_DEFAULT_SYSTEM, "eos_token": "</s>"}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pieces = render_segments(messages, chat)
    assert pieces[0] == ("<s>system\nbe kind</s>\n<s>user\nhi</s>\n<s>assistant\n", False)
    assert _labelled(tok, encode_segments(pieces, tok, tok.token_to_id("</s>"))) == ["y", "o", "</s>"]


def test_without_an_end_of_turn_token_the_whole_answer_piece_is_labelled() -> None:
    tok = _tokenizer()  # "</s>" is spelled in characters
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = encode_segments(render_segments(messages, CHAT), tok, None)
    assert "".join(_labelled(tok, ex)) == "yo</s>\n"


def test_plain_format_ends_the_answer_with_the_end_of_text_token() -> None:
    chat = {"template": PLAIN_TEMPLATE, "eos_token": PLAIN_EOS}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pieces = render_segments(messages, chat)
    assert pieces == [("user: hi\nassistant: ", False), (f"yo{PLAIN_EOS}\n", True)]


def test_a_template_that_does_not_append_turns_is_refused() -> None:
    chat = {"template": "{{ messages[-1]['content'] }}"}  # only the last message
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ChatError, match="cannot be told apart"):
        render_segments(messages, chat)


# ------------------------------------------------------------------------------------------------ reading


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "a", "response": "b"})


def test_both_forms_read_blank_lines_skipped_with_their_line_numbers(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]
    path = _write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"system": "s", "prompt": "p", "response": "r", "id": 7}),  # other keys are ignored
            "",
            json.dumps({"messages": messages}),
        ],
    )
    first, second = read_conversations(path)
    assert first.line == 1 and [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in first.messages] == ["s", "p", "r"]
    assert second.line == 3 and second.messages == messages


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        (json.dumps({"prompt": "only a prompt"}), "neither messages nor prompt and response"),
        (json.dumps({"prompt": "p", "response": 3}), "response must be text"),
        (json.dumps({"messages": []}), "non-empty list"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "message 0 must be"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "opens with the assistant"),
        (json.dumps({"messages": [], "prompt": "p", "response": "r"}), "both messages and prompt"),
    ],
)
def test_a_bad_line_is_a_data_error_naming_file_line_and_what_is_expected(
    tmp_path: Path, line: str, said: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", [GOOD, GOOD, line])
    with pytest.raises(DataError) as info:
        read_conversations(path)
    message = str(info.value)
    assert f"{path}:3:" in message and said in message
    assert '"prompt": text, "response": text' in message or "start with system or user" in message


def test_an_empty_or_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no examples"):
        read_conversations(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="not found"):
        read_conversations(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ packing


def _example(length: int, first: int, answer: int = 2) -> Example:
    """``length`` tokens numbered from ``first``, the last ``answer`` of them labelled."""
    ids = np.arange(first, first + length)
    return Example(ids, np.arange(length) >= length - answer)


def test_packing_places_whole_examples_in_order_and_pads_the_rest() -> None:
    examples = [_example(5, 10), _example(4, 20), _example(7, 30), _example(3, 40)]  # 4, 3, 6, 2 pairs
    rows = pack(examples, block_size=8, order=[0, 1, 2, 3])
    assert rows.lengths.tolist() == [7, 8]  # [4 + 3] then [6 + 2]: no example straddles two rows
    assert rows.x[0].tolist() == [10, 11, 12, 13, 20, 21, 22, 0]
    i = IGNORE_INDEX
    assert rows.y[0].tolist() == [i, i, 13, 14, i, 22, 23, i]
    assert rows.x[1].tolist() == [30, 31, 32, 33, 34, 35, 40, 41]
    assert rows.y[1].tolist() == [i, i, i, i, 35, 36, 41, 42]
    other = pack(examples, block_size=8, order=[3, 2, 1, 0])
    assert other.x[0].tolist()[:2] == [40, 41]
    batch = rows.batch([0])
    assert batch["x"].shape == (1, 7)  # cut to the longest row of the batch
    alone = one_per_row(examples, block_size=8)
    assert alone.lengths.tolist() == [4, 3, 6, 2]


def test_long_examples_are_cut_and_those_left_without_an_answer_dropped() -> None:
    long_answer = _example(12, 0, answer=8)  # cut to 9 tokens: 5 labelled remain
    long_prompt = _example(12, 0, answer=2)  # cut to 9: its answer is gone
    fitted = fit_length([long_answer, long_prompt, _example(4, 0)], block_size=8)
    assert (fitted.truncated, fitted.dropped) == (2, 1)
    assert [len(e.ids) for e in fitted.examples] == [9, 4]
    assert int(fitted.examples[0].labelled.sum()) == 5
