"""Instruction data: conversations read from JSONL, rendered with a chat template, labelled on the assistant's
tokens only, and packed into rows.

Each line of the file is one example, either ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles
``system``, ``user``, ``assistant``; at least one assistant turn, and not first) or
``{"prompt": ..., "response": ...}`` with an optional ``"system"`` (read as system, user, assistant). Other
keys are ignored; blank lines are skipped.

Rendering follows the model's chat template (:mod:`tansuo.data.chat`). The assistant's spans are found by
rendering the conversation incrementally, as TRL's and torchtune's masking do, never by searching strings:
for each assistant turn ``i``, ``render(messages[:i], add_generation_prompt=True)`` ends where its answer
starts and ``render(messages[:i + 1])`` where it ends. The conversation is cut into these pieces, each piece
is tokenized on its own (so a prompt is tokenized exactly as it is at inference, when the answer starts from
the opened assistant turn), and only the assistant's pieces are labelled, up to and including the template's
end-of-turn token (what teaches the model to stop); separators the template writes after it are not. Turns
after the last assistant answer teach nothing and are left out.

Packing (:func:`pack`) places whole examples, in a seeded order, one after another into rows of at most
``block_size`` tokens (next fit; an example never straddles two rows) and pads the rest. Attention stays
plain causal: a token can attend to the earlier examples of its row, as in TRL's default packing, and
positions run on across them. Unpacked, every example is a row of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tansuo.data.chat import ChatError, check_messages, render_chat
from tansuo.data.tokenizers import load_tokenizer, train_bpe_tokenizer, train_char_tokenizer
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

#: the target of a token that is not learned (``F.cross_entropy``'s default ``ignore_index``)
IGNORE_INDEX = -100

#: what one line must hold, for error messages
EXPECTED = (
    'expected one JSON object a line: {"messages": [{"role": "system"|"user"|"assistant", "content": '
    'text}, ...]} or {"prompt": text, "response": text} (optionally "system": text)'
)

#: the plain format of instruction data when the model has no chat template: ``role: content`` lines, the
#: assistant's answer ended by the end-of-turn token (``eos_token``, by default :data:`PLAIN_EOS`)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
PLAIN_EOS = "<|endoftext|>"


@dataclass
class Conversation:
    """One example: its messages and where it came from (for error messages)."""

    messages: list[dict[str, str]]
    line: int


@dataclass
class Example:
    """One tokenized example: ``ids`` (L,) and ``labelled`` (L,), True where the token is learned."""

    ids: np.ndarray
    labelled: np.ndarray

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets, (L - 1,) each; unlabelled targets are :data:`IGNORE_INDEX`."""
        x = self.ids[:-1]
        y = np.where(self.labelled[1:], self.ids[1:], IGNORE_INDEX)
        return x, y


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every example of a JSONL instruction file, checked.

    Raises:
        DataError: A missing or empty file, or a line that is not an example (naming the file, the line and
            what a line must hold).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction file not found: {path}; {EXPECTED}")
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                out.append(Conversation(_parse(line, f"{path}:{number}"), number))
    if not out:
        raise DataError(f"{path} holds no examples; {EXPECTED}")
    return out


def _parse(line: str, where: str) -> list[dict[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}); {EXPECTED}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; {EXPECTED}")
    if "messages" in record and ("prompt" in record or "response" in record):
        raise DataError(f"{where}: both messages and prompt/response; give one form; {EXPECTED}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list; {EXPECTED}")
        try:
            messages = check_messages(messages)
        except ChatError as e:
            raise DataError(f"{where}: {e}; {EXPECTED}") from None
    elif "prompt" in record and "response" in record:
        parts = {k: record[k] for k in ("system", "prompt", "response") if k in record}
        bad = [k for k, v in parts.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{where}: {', '.join(bad)} must be text; {EXPECTED}")
        messages = [{"role": "system", "content": parts["system"]}] if "system" in parts else []
        messages += [
            {"role": "user", "content": parts["prompt"]},
            {"role": "assistant", "content": parts["response"]},
        ]
    else:
        raise DataError(
            f"{where}: neither messages nor prompt and response (keys: {sorted(record)}); {EXPECTED}"
        )
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant message, so nothing to learn; {EXPECTED}")
    if roles[0] == "assistant":
        raise DataError(f"{where}: the conversation opens with the assistant; start with system or user")
    return messages


def render_segments(messages: Sequence[dict[str, str]], chat: dict[str, Any]) -> list[tuple[str, bool]]:
    """The conversation's text cut into pieces, each marked True when the assistant says it.

    ``chat`` is ``{"template", "bos_token", "eos_token"}`` (a bundle's ``chat``). The pieces join into
    ``render(messages[:k + 1], add_generation_prompt=False)`` for the last assistant turn ``k``.

    Raises:
        ChatError: The template refuses the conversation, or does not render it incrementally (a
            conversation's text must start with the text of each of its prefixes).
    """

    def render(part: Sequence[dict[str, str]], opened: bool) -> str:
        return render_chat(
            chat.get("template"),
            list(part),
            add_generation_prompt=opened,
            bos_token=chat.get("bos_token"),
            eos_token=chat.get("eos_token"),
        )

    pieces: list[tuple[str, bool]] = []
    done = ""  # the text through the previous assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ChatError(
                f"the chat template does not render message {i} after the text of the messages before it, "
                "so the assistant's tokens cannot be told apart; use a template that appends each turn"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return [(text, said) for text, said in pieces if text]


def encode_segments(pieces: Iterable[tuple[str, bool]], tokenizer: Any, eos_id: int | None) -> Example:
    """Tokenize each piece on its own (no special tokens added) and label the assistant's, each up to and
    including its last ``eos_id`` when it holds one (what follows, e.g. a newline, is not learned)."""
    ids: list[int] = []
    labelled: list[bool] = []
    for text, said in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        marks = [said] * len(piece)
        if said and eos_id is not None and eos_id in piece:
            end = len(piece) - piece[::-1].index(eos_id)  # just after the last end-of-turn token
            marks = [True] * end + [False] * (len(piece) - end)
        ids += piece
        labelled += marks
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(labelled, dtype=bool))


@dataclass
class Fitted:
    """Examples cut to a length, and how many were cut or dropped."""

    examples: list[Example]
    truncated: int
    dropped: int  # nothing labelled left after the cut


def fit_length(examples: Iterable[Example], block_size: int) -> Fitted:
    """Each example cut to ``block_size + 1`` tokens (``block_size`` input-target pairs); one with no
    labelled target left is dropped."""
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if len(ex.ids) > block_size + 1:
            truncated += 1
            ex = Example(ex.ids[: block_size + 1], ex.labelled[: block_size + 1])
        if len(ex.ids) < 2 or not ex.labelled[1:].any():
            dropped += 1
            continue
        kept.append(ex)
    return Fitted(kept, truncated, dropped)


@dataclass
class Rows:
    """Training rows: ``x`` and ``y`` (N, block_size), padded (``x`` with 0, ``y`` with IGNORE_INDEX) past
    ``lengths`` (N,)."""

    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``index`` as int64 tensors ``x``, ``y`` (B, T), T the longest of them."""
        index = np.asarray(index)
        width = int(self.lengths[index].max())
        return {
            "x": torch.from_numpy(self.x[index, :width].astype(np.int64)),
            "y": torch.from_numpy(self.y[index, :width].astype(np.int64)),
        }


def pack(examples: Sequence[Example], block_size: int, order: Sequence[int] | None = None) -> Rows:
    """Whole examples placed one after another in ``order`` into rows of at most ``block_size`` pairs (a row
    is closed when the next example does not fit). Examples must already fit (:func:`fit_length`)."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = block_size  # forces a first row
    for i in range(len(examples)) if order is None else order:
        x, y = examples[i].pairs()
        if len(x) > block_size:
            raise ValueError(f"example {i} has {len(x)} pairs, more than block_size={block_size}")
        if used + len(x) > block_size:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    return _rows(
        [(np.concatenate([x for x, _ in r]), np.concatenate([y for _, y in r])) for r in rows], block_size
    )


def one_per_row(examples: Sequence[Example], block_size: int) -> Rows:
    """Every example in a row of its own (no packing)."""
    return _rows([ex.pairs() for ex in examples], block_size)


def _rows(pairs: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int) -> Rows:
    n = len(pairs)
    x = np.zeros((n, block_size), dtype=np.int64)
    y = np.full((n, block_size), IGNORE_INDEX, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : len(xi)], y[i, : len(yi)], lengths[i] = xi, yi, len(xi)
    return Rows(x, y, lengths)


# ------------------------------------------------------------------ the lm task's instruction data
def named_tokenizer(spec: str) -> tuple[Any | None, dict[str, Any] | None]:
    """The tokenizer ``data.tokenizer`` names (None for char / bpe, which are trained), and the chat
    template of the bundle folder it names, if any."""
    if spec in ("char", "bpe"):
        return None, None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return load_tokenizer(path), None
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"data.tokenizer {path} is a folder without tokenizer.json; name a bundle or a file")
    info = path / "task.json"
    chat = json.loads(info.read_text(encoding="utf-8")).get("chat") if info.is_file() else None
    return load_tokenizer(path / "tokenizer.json"), chat


def chat_in_effect(
    inherited: dict[str, Any] | None, given: dict[str, Any] | None, *, plain: bool
) -> dict[str, Any] | None:
    """The template in effect: the tokenizer bundle's, with what ``data.chat`` sets in its place; for
    instructions without any, the plain format."""
    chat = dict(inherited or {})
    if given is not None:
        chat.update({k: v for k, v in given.items() if v is not None})
    if not chat.get("template"):
        if not plain:
            return None
        chat = {
            "template": PLAIN_TEMPLATE,
            "bos_token": chat.get("bos_token"),
            "eos_token": chat.get("eos_token") or PLAIN_EOS,
        }
    return chat


def render_file(source: Path, chat: dict[str, Any]) -> list[list[tuple[str, bool]]]:
    """Every example of an instruction file as text pieces marked by who says them."""
    out = []
    for conversation in read_conversations(source):
        try:
            out.append(render_segments(conversation.messages, chat))
        except ChatError as e:
            raise DataError(
                f"{source}:{conversation.line}: {e}; roles are system, user and assistant, in an order the "
                "model's chat template accepts"
            ) from None
    return out


def trained_tokenizer(kind: str, vocab_size: int, texts: Iterator[str], chat: dict[str, Any] | None) -> Any:
    """A char or byte-level BPE tokenizer trained on ``texts``; a chat template's special tokens are added
    whole, so the end of a turn is one token."""
    tokenizer = train_char_tokenizer(texts) if kind == "char" else train_bpe_tokenizer(texts, vocab_size)
    specials = [t for t in ((chat or {}).get("bos_token"), (chat or {}).get("eos_token")) if t]
    if specials:
        tokenizer.add_special_tokens(list(dict.fromkeys(specials)))
    return tokenizer
