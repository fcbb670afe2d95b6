"""Plain text to memory-mapped token files, and language-model batches from them.

The corpus is streamed, never read whole: :func:`iter_text_chunks` decodes a UTF-8 file piece by piece,
:func:`encode_to_token_file` writes the ids as a flat ``uint16``/``uint32`` file (as nanoGPT's
``prepare.py`` does) with a JSON sidecar that says how it was made, and :func:`open_token_file` maps it
read-only. :func:`lm_batch` draws random windows from it, like nanoGPT's ``get_batch``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import mmap
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tansuo.atomic import atomic_write_text, fsync_dir
from tansuo.data.tokenizers import encode_chars, is_char_tokenizer
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

_BPE_PIECE_CHARS = 1 << 16  # BPE text is encoded in pieces of about this size, in parallel


def _require_text_file(path: str | Path, hint: str = "") -> Path:
    path = Path(path)
    if not path.is_file():
        message = f"data file not found: {path}; pass --data PATH to a plain-text file"
        raise DataError(f"{message}. {hint}" if hint else message)
    return path


def iter_text_chunks(path: str | Path, chunk_chars: int = 1 << 20, *, hint: str = "") -> Iterator[str]:
    """Stream a UTF-8 text file in chunks, never holding more than one chunk in memory.

    The text is returned exactly as stored: no newline translation, a byte-order mark is kept as U+FEFF.
    ``chunk_chars`` bytes are read at a time, so a chunk holds at most ``chunk_chars`` characters; a
    character is never split between chunks.

    Args:
        path: The text file.
        chunk_chars: Bytes to read per chunk.
        hint: Appended to the "not found" message, e.g. where to download the data set.

    Returns:
        An iterator over non-empty pieces of the text, in order. A missing file raises at once; bad bytes
        raise when reached.

    Raises:
        DataError: If the file is missing, or holds bytes that are not UTF-8 (the message gives the offset).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    return _iter_chunks(_require_text_file(path, hint), chunk_chars)


def _iter_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes read before the current block
    with path.open("rb") as file:
        while True:
            block = file.read(chunk_chars)
            pending = len(decoder.getstate()[0])  # bytes of a character left over from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                position = offset - pending + error.start
                raise DataError(
                    f"{path} is not valid UTF-8: undecodable byte(s) "
                    f"{error.object[error.start : error.end]!r} at byte offset {position}; "
                    f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name})"
                ) from error
            if text:
                yield text
            if not block:
                return
            offset += len(block)


# Cut BPE text only between a non-space character and an ASCII whitespace character. Every GPT-2 pre-token
# ends there in the whole text too (none runs from a non-space into a space), and the regex has no
# look-behind, so both sides pre-tokenize exactly as the whole text does. ASCII whitespace is whitespace for
# both Python and the tokenizer's regex; ``str.isspace`` covers at least the regex's Unicode ``\s``.
_ASCII_SPACE = frozenset(" \t\n\r\f\v")
_BOUNDARY = re.compile(r"(?<=\S)(?=[ \t\n\r\f\v])")


def _find_cut(text: str, target: int, limit: int) -> int:
    """The last safe cut at or before ``target``, else the first one before ``limit``, else 0."""
    for i in range(min(target, len(text) - 1), 0, -1):
        if text[i] in _ASCII_SPACE and not text[i - 1].isspace():
            return i
    match = _BOUNDARY.search(text, target, limit)
    return match.start() if match else 0


def _safe_pieces(chunks: Iterator[str], piece_chars: int) -> Iterator[str]:
    """Re-cut a stream of text into pieces of about ``piece_chars`` characters at safe cuts (see above).

    A run longer than ``max(8 * piece_chars, 65536)`` characters with no safe cut is cut anyway (logged), so
    memory stays bounded; that is the one case where the ids can differ from encoding the whole text.
    """
    limit = max(8 * piece_chars, 1 << 16)
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > piece_chars:
            cut = _find_cut(buffer, piece_chars, limit)
            if cut == 0:
                if len(buffer) < limit:
                    break  # wait for more text
                cut = limit
                logger.warning("no whitespace in %d characters of text; cutting it mid-word", limit)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65535``), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 of the tokenizer's JSON: two tokenizers with the same fingerprint encode alike."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def _sidecar_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".json")


def encode_to_token_file(
    text_path: str | Path, tok: Tokenizer, out_path: str | Path, *, chunk_chars: int = 1 << 20
) -> int:
    """Stream-encode a text file into a flat binary token file plus a JSON sidecar.

    The ids are written as ``uint16`` when the vocabulary has at most 65535 entries, else ``uint32``, to a
    temporary file that is fsynced and renamed to ``out_path``. The sidecar ``out_path + ".json"`` records
    ``dtype``, ``num_tokens``, ``vocab_size``, ``source``, ``source_size``, ``source_mtime`` and
    ``tokenizer_sha256`` (see :func:`token_file_is_current`).

    Chunking never changes the ids. Character tokenizers encode each character on its own (a vectorised
    table look-up). For BPE the text is cut only where a non-space character is followed by ASCII
    whitespace, a point where the GPT-2 pre-tokenizer also splits, so the ids equal those of encoding the
    whole text at once; the one exception is a run of more than 65536 characters (or 8 x ``chunk_chars``)
    with no such point, which is cut mid-word with a warning. Pieces are encoded in parallel batches.

    Args:
        text_path: UTF-8 text file.
        tok: Character or byte-level BPE tokenizer.
        out_path: Token file to write; its folder is created if needed.
        chunk_chars: Characters read and encoded at a time.

    Returns:
        The number of tokens written.

    Raises:
        DataError: If the text file is missing or not UTF-8, or (character tokenizer) holds a character
            outside the vocabulary.
    """
    text_path, out_path = _require_text_file(text_path), Path(out_path)
    started = time.perf_counter()
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    char_level = is_char_tokenizer(tok)
    chunks = iter_text_chunks(text_path, chunk_chars)
    source_stat = text_path.stat()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    num_tokens = 0
    try:
        with os.fdopen(handle, "wb") as file:
            if char_level:
                chars_done = 0
                for chunk in chunks:
                    ids = encode_chars(tok, chunk, strict=True, source=str(text_path), offset=chars_done)
                    ids.astype(dtype).tofile(file)
                    num_tokens += len(ids)
                    chars_done += len(chunk)
            else:
                piece_chars = min(chunk_chars, _BPE_PIECE_CHARS)
                batch: list[str] = []
                batch_chars = 0
                for piece in _safe_pieces(chunks, piece_chars):
                    batch.append(piece)
                    batch_chars += len(piece)
                    if batch_chars >= chunk_chars:
                        num_tokens += _write_bpe_batch(tok, batch, dtype, file)
                        batch, batch_chars = [], 0
                num_tokens += _write_bpe_batch(tok, batch, dtype, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)
    sidecar = {
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "source": str(text_path),
        "source_size": source_stat.st_size,
        "source_mtime": source_stat.st_mtime,
        "tokenizer_sha256": tokenizer_fingerprint(tok),
    }
    atomic_write_text(_sidecar_path(out_path), json.dumps(sidecar, indent=2) + "\n")
    logger.info(
        "encoded %s into %d tokens (%s) in %.2f s -> %s",
        text_path,
        num_tokens,
        dtype.name,
        time.perf_counter() - started,
        out_path,
    )
    return num_tokens


def _write_bpe_batch(tok: Tokenizer, pieces: list[str], dtype: np.dtype, file) -> int:
    if not pieces:
        return 0
    count = 0
    for encoding in tok.encode_batch(pieces, add_special_tokens=False):
        np.asarray(encoding.ids, dtype=dtype).tofile(file)
        count += len(encoding.ids)
    return count


def read_token_file_info(out_path: str | Path) -> dict | None:
    """The sidecar of a token file as a dict, or None if it is missing or unreadable."""
    try:
        return json.loads(_sidecar_path(Path(out_path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def token_file_is_current(
    text_path: str | Path, out_path: str | Path, vocab_size: int, *, tokenizer: Tokenizer | None = None
) -> bool:
    """Whether ``out_path`` was encoded from ``text_path`` as it is now, so it can be reused.

    True when the token file and its sidecar exist, the file has the recorded length, the source path,
    size and modification time match, the vocabulary size matches and, if ``tokenizer`` is given, so does
    its fingerprint (a retrained tokenizer of the same size gives different ids).

    Args:
        text_path: The source text file.
        out_path: The token file.
        vocab_size: Vocabulary size of the tokenizer in use.
        tokenizer: The tokenizer in use, to compare fingerprints.

    Returns:
        True if the token file can be reused.
    """
    text_path, out_path = Path(text_path), Path(out_path)
    info = read_token_file_info(out_path)
    if info is None or not out_path.is_file() or not text_path.is_file():
        return False
    try:
        source_stat = text_path.stat()
        current = (
            Path(info["source"]).resolve() == text_path.resolve()
            and info["source_size"] == source_stat.st_size
            and info["source_mtime"] == source_stat.st_mtime
            and info["vocab_size"] == vocab_size
            and out_path.stat().st_size == info["num_tokens"] * np.dtype(info["dtype"]).itemsize
        )
        if current and tokenizer is not None:
            current = info.get("tokenizer_sha256") == tokenizer_fingerprint(tokenizer)
    except (KeyError, TypeError):
        return False
    return bool(current)


def open_token_file(path: str | Path) -> np.ndarray:
    """Map a token file written by :func:`encode_to_token_file` read-only.

    Args:
        path: The token file; its ``.json`` sidecar must sit next to it.

    Returns:
        A read-only ``np.memmap`` of shape ``(num_tokens,)`` with the recorded dtype.

    Raises:
        DataError: If the file or sidecar is missing, the file is truncated, or it holds no tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file not found: {path}; create it with encode_to_token_file")
    info = read_token_file_info(path)
    if info is None or "dtype" not in info or "num_tokens" not in info:
        raise DataError(
            f"token file {path} has no readable sidecar {_sidecar_path(path).name}; "
            "delete the token file so it is encoded again"
        )
    dtype = np.dtype(info["dtype"])
    expected = info["num_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(
            f"token file {path} has {path.stat().st_size} bytes, its sidecar says {expected}; "
            "delete it so it is encoded again"
        )
    if info["num_tokens"] == 0:
        raise DataError(f"token file {path} holds no tokens: its source text is empty; use a non-empty text")
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["num_tokens"],))


def split_tokens(tokens: np.ndarray, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a token array into a leading train part and a trailing validation part (views, no copy).

    Args:
        tokens: 1-D token array (e.g. from :func:`open_token_file`).
        train_fraction: Share of tokens for training, in (0, 1]; the first ``int(n * train_fraction)``.

    Returns:
        ``(train, val)``.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    cut = int(len(tokens) * train_fraction)
    return tokens[:cut], tokens[cut:]


def token_splits(
    source: Path,
    tok: Tokenizer,
    tokens_path: Path,
    train_fraction: float,
    *,
    need: int,
    field: str,
    value: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``source`` into ``tokens_path`` (unless that file is current) and cut it into training and
    validation tokens (:func:`split_tokens`).

    Args:
        need: Fewest tokens each split must hold.
        field, value: The ``data:`` setting that sets ``need`` and its value, for the error message.

    Raises:
        DataError: If a split holds fewer than ``need`` tokens.
    """
    if not token_file_is_current(source, tokens_path, tok.get_vocab_size(), tokenizer=tok):
        encode_to_token_file(source, tok, tokens_path)
    train, val = split_tokens(open_token_file(tokens_path), train_fraction)
    for name, part in (("training", train), ("validation", val)):
        if len(part) < need:
            raise DataError(
                f"{source}: the {name} split has {len(part)} tokens but {field} {value} needs at least "
                f"{need}; use a longer corpus or lower data.{field}"
            )
    return train, val


#: windows of a memory-mapped token file read between two releases of its pages (:func:`lm_batch`)
WINDOWS_PER_RELEASE = 8


def lm_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` random windows of ``block_size`` tokens and their next-token targets.

    Args:
        tokens: 1-D token array.
        batch_size: B, windows per batch.
        block_size: T, tokens per window.
        generator: Source of the offsets: ``torch.randint(len(tokens) - T, (B,), generator=generator)``.

    Returns:
        ``(x, y)``, int64 tensors of shape (B, T) on the CPU, with ``y[:, t] == x[:, t + 1]``.

    Raises:
        DataError: If ``tokens`` holds fewer than ``block_size + 1`` tokens.
    """
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the text has {len(tokens)} tokens but block_size={block_size} needs at least {block_size + 1}; "
            "use a longer text (or a larger validation share) or a smaller block_size"
        )
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()  # (B,)
    index = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
    # a token file's windows are read a few at a time, their pages unmapped after each few: every window
    # faults in a whole cached folio around it (up to megabytes), so 240 evaluation windows at once made a
    # 280 MB spike of mapped pages on a 4 GB token file
    step = WINDOWS_PER_RELEASE if getattr(tokens, "_mmap", None) is not None else batch_size
    parts = []
    for i in range(0, batch_size, step):
        parts.append(np.asarray(tokens[index[i : i + step]]).astype(np.int64))
        release_pages(tokens)
    window = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def release_pages(tokens: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped token file that reads have faulted in (they stay in the page cache,
    so the next read of them is cheap). Random windows would otherwise map the kernel's large cached folios
    around each one, and the process's resident memory would grow with the corpus (3x at 2 GB against
    20 MB, ``bench/corpus_scale.py``). A no-op for arrays in memory."""
    mapping = getattr(tokens, "_mmap", None)  # numpy's memmap (and its slices) keep their mmap here
    # read-only maps only: on a copy-on-write map, dropping pages would drop the changes written to them
    if mapping is not None and getattr(tokens, "mode", None) == "r" and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
