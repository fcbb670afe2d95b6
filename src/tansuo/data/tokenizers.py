"""Character-level and byte-level BPE tokenizers, built on Hugging Face ``tokenizers``.

Two kinds are trained here, and both round-trip text exactly through :func:`encode` / :func:`decode`:

- **character**: one token per Unicode code point, ids ``0..V-1`` in sorted character order and no special
  tokens, as in nanoGPT's ``shakespeare_char`` (tiny Shakespeare gives V = 65). Spaces, tabs, newlines and
  any other character survive unchanged. A character never seen in training has no id: :func:`encode`
  raises :class:`~tansuo.errors.DataError` naming it (``strict=True``, the default) or drops it with a
  warning (``strict=False``).
- **byte-level BPE** (GPT-2, Radford et al. 2019): text is split with the GPT-2 pattern, mapped to bytes
  and merged by BPE; every string can be encoded, none has an unknown token.

A third kind, **WordPiece** (BERT, Devlin et al. 2019), is for text classification: lower-cased, split on
whitespace and punctuation, with the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4 when trained
here) and the template ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` added by ``tok.encode``. It does not
round-trip text exactly (case and spacing are lost); it is not meant to.

Tokenizers are stored as a single ``tokenizer.json`` (:func:`save_tokenizer`, :func:`load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tansuo.atomic import atomic_write_text
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

# One pre-token per code point. "[\s\S]" matches every character, newlines included ("." would not).
_CHAR_PATTERN = r"[\s\S]"
_CHAR_PRE_TOKENIZER = {
    "type": "Split",
    "pattern": {"Regex": _CHAR_PATTERN},
    "behavior": "Isolated",
    "invert": False,
}
# Byte-level BPE always holds the 256 single bytes, so a smaller vocabulary cannot be honoured.
MIN_BPE_VOCAB_SIZE = 256


def train_char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Build a character-level tokenizer over every character in ``texts``.

    Args:
        texts: Strings, or chunks of one large text (e.g. from ``iter_text_chunks``), to take characters from.

    Returns:
        A tokenizer whose vocabulary is the sorted set of characters seen, with ids ``0..V-1`` in that order
        and no special tokens.

    Raises:
        DataError: If ``texts`` hold no characters at all.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("cannot build a character vocabulary from empty text; pass a non-empty text file")
    vocab = {char: index for index, char in enumerate(sorted(chars))}
    # "[UNK]" is not in the vocabulary, so an unseen character makes the library raise, never a silent id.
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with nothing in between
    logger.debug("character vocabulary of %d symbols", len(vocab))
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, encoder: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Args:
        texts: Training strings; chunks of one large text work too.
        vocab_size: Largest vocabulary wanted: the 256 byte symbols plus up to ``vocab_size - 256`` merges.
            Training may stop earlier when no pair occurs ``min_frequency`` times.
        min_frequency: A pair must occur at least this often to be merged.
        encoder: For a BERT-style encoder (as RoBERTa): add the special tokens
            ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4) and the ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]``
            template, as :func:`train_wordpiece_tokenizer` does.

    Returns:
        A tokenizer that encodes any string and decodes it back exactly (special tokens skipped), with no
        special tokens unless ``encoder``.

    Raises:
        ValueError: If ``vocab_size`` is below 256 or ``min_frequency`` below 1.
    """
    specials = list(WORDPIECE_SPECIAL_TOKENS) if encoder else []
    if vocab_size < MIN_BPE_VOCAB_SIZE + len(specials):
        need = MIN_BPE_VOCAB_SIZE + len(specials)
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: its 256 byte symbols alone need "
            f"{MIN_BPE_VOCAB_SIZE}{' (plus 5 special tokens)' if encoder else ''}; pass vocab_size >= {need}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if encoder:
        _bert_post_processor(tok)
    logger.debug("byte-level BPE vocabulary of %d tokens", tok.get_vocab_size())
    return tok


#: BERT's special tokens, in the order that gives them ids 0..4 in a vocabulary trained here.
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, lowercase: bool = True
) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer on ``texts``.

    Args:
        texts: Training strings.
        vocab_size: Largest vocabulary wanted, special tokens and single characters included.
        min_frequency: A pair must occur at least this often to be merged.
        lowercase: Lower-case and strip accents (as ``bert-base-uncased``).

    Returns:
        A tokenizer with ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4`` whose ``encode(a)`` gives
        ``[CLS] a [SEP]`` and ``encode(a, b)`` gives ``[CLS] a [SEP] b [SEP]`` with type ids 0 then 1.

    Raises:
        ValueError: If ``vocab_size`` does not exceed the 5 special tokens or ``min_frequency`` is below 1.
    """
    if vocab_size <= len(WORDPIECE_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} leaves no room beside the 5 special tokens; pass more")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(WORDPIECE_SPECIAL_TOKENS),
        show_progress=False,
    )
    _bert_pipeline(tok, lowercase)
    tok.train_from_iterator(texts, trainer=trainer)
    _bert_post_processor(tok)
    logger.debug("WordPiece vocabulary of %d tokens", tok.get_vocab_size())
    return tok


def load_wordpiece_vocab(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Build a BERT tokenizer from a ``vocab.txt`` (one token per line, as Hugging Face BERT models ship).

    Args:
        path: The vocabulary file; it must hold ``[UNK]``, ``[CLS]`` and ``[SEP]``.
        lowercase: Lower-case and strip accents (True for ``*-uncased`` vocabularies).

    Raises:
        DataError: If the file is missing or lacks a special token.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"vocabulary file not found: {path}; pass the path to a BERT vocab.txt")
    vocab = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.rstrip("\r\n")
        if token and token not in vocab:
            vocab[token] = len(vocab)
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise DataError(f"{path}: the vocabulary lacks {missing}; pass a BERT vocab.txt")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    _bert_pipeline(tok, lowercase)
    tok.add_special_tokens([t for t in WORDPIECE_SPECIAL_TOKENS if t in vocab])
    _bert_post_processor(tok)
    return tok


def _bert_pipeline(tok: Tokenizer, lowercase: bool) -> None:
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def _bert_post_processor(tok: Tokenizer) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tok`` to ``path`` (a ``tokenizer.json``) atomically: temporary file, fsync, rename.

    Args:
        tok: The tokenizer to save.
        path: Destination file; its folder must exist.
    """
    atomic_write_text(Path(path), tok.to_str(pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer from a ``tokenizer.json`` file.

    Args:
        path: The file written by :func:`save_tokenizer` (or any Hugging Face ``tokenizer.json``).

    Returns:
        The tokenizer.

    Raises:
        DataError: If the file is missing or is not a valid tokenizer file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}; pass the path to a tokenizer.json file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception on bad JSON
        raise DataError(
            f"{path} is not a valid tokenizer.json ({error}); re-create it, e.g. by training again"
        ) from error


def trained_once(path: Path, key: list[Any], train: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer saved at ``path`` when it was trained for the same ``key`` (its settings and a digest of
    its texts, JSON values), else ``train()``, saved there with its key in ``<stem>-spec.json`` beside it.

    Training again on the same texts may break ties between equally frequent pieces differently in another
    process, and give other token ids: the ranks of a distributed run (rank 0 trains first) and a run resumed
    in a new process need the saved one.
    """
    spec = path.with_name(f"{path.stem}-spec.json")
    if path.is_file() and spec.is_file() and json.loads(spec.read_text(encoding="utf-8")) == key:
        return load_tokenizer(path)
    tok = train()
    save_tokenizer(tok, path)
    atomic_write_text(
        spec, json.dumps(key)
    )  # after the tokenizer: a key on disk means its tokenizer is there
    return tok


def texts_digest(texts: Iterable[str]) -> str:
    """A SHA-256 digest of ``texts`` (for :func:`trained_once`'s key)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


#: ``data.tokenizer`` values that train an encoder tokenizer on the training text (anything else is a path)
TRAINED_ENCODER_TOKENIZERS = ("wordpiece", "bpe")


def encoder_tokenizer(
    spec: str, texts: Callable[[], Iterable[str]], vocab_size: int, lowercase: bool = True
) -> Tokenizer:
    """The tokenizer of a BERT-style encoder, as a ``data.tokenizer`` field says.

    Args:
        spec: ``wordpiece`` or ``bpe`` (byte-level, with BERT's special tokens) to train one on ``texts()``;
            else a ``tokenizer.json``, ``vocab.txt`` or a folder holding one (:func:`load_bert_tokenizer`).
        texts: Called only when training: the training strings.
        vocab_size: Target vocabulary size of a trained tokenizer.
        lowercase: WordPiece training and ``vocab.txt`` only: lower-case and strip accents.

    Raises:
        DataError: For a vocabulary too small for byte-level BPE, or a path with no tokenizer.
    """
    if spec == "wordpiece":
        return train_wordpiece_tokenizer(texts(), vocab_size, lowercase=lowercase)
    if spec == "bpe":
        need = MIN_BPE_VOCAB_SIZE + len(WORDPIECE_SPECIAL_TOKENS)
        if vocab_size < need:
            raise DataError(
                f"data.vocab_size={vocab_size} is too small for byte-level BPE (256 bytes and 5 special "
                f"tokens); set data.vocab_size >= {need}"
            )
        return train_bpe_tokenizer(texts(), vocab_size, encoder=True)
    return load_bert_tokenizer(spec, lowercase=lowercase)


def load_bert_tokenizer(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Load the tokenizer of a BERT-family model from a ``tokenizer.json``, a ``vocab.txt``, or a folder
    holding either (a tansuo bundle, or a Hugging Face model folder; ``tokenizer.json`` is preferred).

    Args:
        path: The file or folder.
        lowercase: For a ``vocab.txt`` only: lower-case and strip accents (``*-uncased`` models).

    Raises:
        DataError: If nothing usable is there.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_bert_tokenizer(path / name, lowercase)
        raise DataError(f"{path} holds neither tokenizer.json nor vocab.txt; pass a folder or file that does")
    tok = load_wordpiece_vocab(path, lowercase=lowercase) if path.suffix == ".txt" else load_tokenizer(path)
    tok.no_padding()  # a Hugging Face tokenizer.json may pad to a fixed length; tansuo pads per batch
    return tok


def is_char_tokenizer(tok: Tokenizer) -> bool:
    """Whether ``tok`` is a character-level tokenizer as built by :func:`train_char_tokenizer`."""
    if not isinstance(tok.model, models.WordLevel) or tok.normalizer is not None:
        return False
    config = json.loads(tok.to_str())
    return (
        config.get("pre_tokenizer") == _CHAR_PRE_TOKENIZER
        and not config.get("added_tokens")
        and all(len(token) == 1 for token in config["model"]["vocab"])
    )


def encode(tok: Tokenizer, text: str, *, strict: bool = True) -> list[int]:
    """Encode ``text`` to token ids, with no special tokens added.

    Character tokenizers are encoded with a vectorised table look-up (same ids as ``tok.encode``, about a
    hundred times faster on large text); other tokenizers go through ``tok.encode``.

    Args:
        tok: A tokenizer from this module or loaded with :func:`load_tokenizer`.
        text: The text.
        strict: For a character tokenizer, what to do with a character that is not in its vocabulary:
            raise (True) or drop it and log a warning (False). Byte-level BPE has no unknown characters.

    Returns:
        The token ids.

    Raises:
        DataError: If ``strict`` and ``text`` holds a character the character tokenizer never saw.
    """
    if is_char_tokenizer(tok):
        return encode_chars(tok, text, strict=strict).tolist()
    return tok.encode(text, add_special_tokens=False).ids


def encode_chars(
    tok: Tokenizer, text: str, *, strict: bool = True, source: str = "", offset: int = 0
) -> np.ndarray:
    """Encode ``text`` with a character tokenizer into an int64 array (see :func:`encode`).

    Args:
        tok: A character tokenizer (see :func:`is_char_tokenizer`).
        text: The text.
        strict: Raise on characters outside the vocabulary (True) or drop them with a warning (False).
        source: File the text comes from, named in error messages.
        offset: Position of ``text`` in that file (in characters), added to positions in error messages.

    Returns:
        The ids, shape ``(len(text),)`` when every character is known.
    """
    vocab = tok.get_vocab()
    codepoints = np.fromiter((ord(char) for char in vocab), dtype=np.int64, count=len(vocab))
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    order = np.argsort(codepoints)
    codepoints, ids = codepoints[order], ids[order]
    # "surrogatepass" keeps lone surrogates (which no file decoded as UTF-8 holds) from raising here.
    text_codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(
        np.int64
    )
    positions = np.searchsorted(codepoints, text_codepoints).clip(max=len(codepoints) - 1)
    known = codepoints[positions] == text_codepoints
    if not known.all():
        unknown_at = np.flatnonzero(~known)
        first = text[int(unknown_at[0])]
        message = (
            f"character {first!r} (U+{ord(first):04X}) at position {offset + int(unknown_at[0])} is not in "
            f"the character tokenizer's vocabulary of {len(vocab)} characters"
        )
        if source:
            message = f"{source}: {message}"
        if strict:
            raise DataError(
                message + "; train the tokenizer on text that contains it, or remove it from the input"
            )
        logger.warning("%s; dropping %d unknown character(s)", message, len(unknown_at))
        positions = positions[known]
    return ids[positions]


def decode(tok: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Decode token ids back to text; ``decode(tok, encode(tok, s)) == s`` for both kinds built here.

    Args:
        tok: The tokenizer that produced the ids.
        ids: Token ids (a list, array or 1-D tensor converted with ``.tolist()``).

    Returns:
        The text. Character tokens are joined with nothing in between.

    Raises:
        DataError: If an id of a character tokenizer is outside its vocabulary.
    """
    ids = [int(i) for i in ids]
    if is_char_tokenizer(tok):
        size = tok.get_vocab_size()
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise DataError(
                f"token id {bad} is outside the tokenizer's vocabulary (0..{size - 1}); "
                "use the tokenizer saved with the model"
            )
        table = [""] * size
        for char, index in tok.get_vocab().items():
            table[index] = char
        return "".join(table[i] for i in ids)
    return tok.decode(ids, skip_special_tokens=False)


#: special tokens of a subword vocabulary trained by :func:`train_subword_tokenizer`, ids 0..3 in this order
SUBWORD_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
#: ``data.tokenizer`` values that train a subword vocabulary (anything else is a path)
SUBWORD_KINDS = ("bpe", "unigram")


def train_subword_tokenizer(
    texts: Iterable[str], kind: str, vocab_size: int, *, lowercase: bool = False
) -> Tokenizer:
    """Train a SentencePiece-style subword vocabulary (Sennrich et al. 2016 BPE, or Kudo 2018's unigram
    language model) on ``texts``, e.g. the source and target sides of a parallel corpus together (a joint
    vocabulary, as fairseq and Marian train for related languages).

    Text is NFKC-normalised (and lower-cased with ``lowercase``); spaces become the ``▁`` marker of the
    following piece (Metaspace), so :meth:`Tokenizer.decode` gives detokenized text back. Special tokens are
    ``<pad> <unk> <s> </s>``, ids 0 to 3; the tokenizer itself adds none (the task places ``<s>``/``</s>``).

    Args:
        texts: Training strings.
        kind: ``bpe`` or ``unigram``.
        vocab_size: Vocabulary size wanted, the special tokens included.
        lowercase: Lower-case before everything else.

    Raises:
        DataError: For an unknown ``kind`` or a vocabulary too small to hold the special tokens.
    """
    if kind not in SUBWORD_KINDS:
        raise DataError(f"unknown subword vocabulary {kind!r}; choose one of {list(SUBWORD_KINDS)}")
    if vocab_size <= 2 * len(SUBWORD_SPECIAL_TOKENS):
        raise DataError(f"data.vocab_size={vocab_size} is too small for a subword vocabulary; use >= 100")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    specials = list(SUBWORD_SPECIAL_TOKENS)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer: Any = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
        )
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainer)
    logger.debug("%s vocabulary of %d pieces", kind, tok.get_vocab_size())
    return tok
