"""Data: tokenizers, token files, labelled text, image arrays, seeded splits, augmentation. No task logic."""

from tansuo.data.augment import AUTO_AUGMENT, auto_augment, mix_batch, random_shift
from tansuo.data.image_csv import load_csv_arrays
from tansuo.data.images import ImageArrays, infer_pixel_max, load_digits_arrays, load_npz_arrays, map_labels
from tansuo.data.masking import mask_tokens
from tansuo.data.pictures import load_image_file
from tansuo.data.splits import split_indices, split_sizes
from tansuo.data.text import (
    encode_to_token_file,
    iter_text_chunks,
    lm_batch,
    open_token_file,
    read_token_file_info,
    split_tokens,
    token_dtype,
    token_file_is_current,
    token_splits,
    tokenizer_fingerprint,
)
from tansuo.data.textsets import LabelledRow, iter_labelled_rows, read_labelled_text, text_format
from tansuo.data.tokenizers import (
    TRAINED_ENCODER_TOKENIZERS,
    WORDPIECE_SPECIAL_TOKENS,
    decode,
    encode,
    encoder_tokenizer,
    is_char_tokenizer,
    load_bert_tokenizer,
    load_tokenizer,
    load_wordpiece_vocab,
    save_tokenizer,
    texts_digest,
    train_bpe_tokenizer,
    train_char_tokenizer,
    train_wordpiece_tokenizer,
    trained_once,
)

__all__ = [
    "AUTO_AUGMENT",
    "auto_augment",
    "mix_batch",
    "mask_tokens",
    "TRAINED_ENCODER_TOKENIZERS",
    "WORDPIECE_SPECIAL_TOKENS",
    "encoder_tokenizer",
    "ImageArrays",
    "LabelledRow",
    "decode",
    "encode",
    "encode_to_token_file",
    "infer_pixel_max",
    "is_char_tokenizer",
    "load_bert_tokenizer",
    "iter_labelled_rows",
    "iter_text_chunks",
    "lm_batch",
    "load_csv_arrays",
    "load_digits_arrays",
    "load_image_file",
    "load_npz_arrays",
    "load_tokenizer",
    "load_wordpiece_vocab",
    "map_labels",
    "open_token_file",
    "random_shift",
    "read_labelled_text",
    "read_token_file_info",
    "save_tokenizer",
    "texts_digest",
    "trained_once",
    "split_indices",
    "split_sizes",
    "split_tokens",
    "text_format",
    "token_dtype",
    "token_file_is_current",
    "token_splits",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "train_char_tokenizer",
    "train_wordpiece_tokenizer",
]
