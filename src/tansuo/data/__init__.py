"""Data: tokenizers, text token files, image arrays, seeded splits and augmentation. No task logic."""

from tansuo.data.images import (
    ImageArrays,
    infer_pixel_max,
    load_csv_arrays,
    load_digits_arrays,
    load_image_file,
    load_npz_arrays,
    map_labels,
    random_shift,
)
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
    tokenizer_fingerprint,
)
from tansuo.data.tokenizers import (
    decode,
    encode,
    is_char_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
)

__all__ = [
    "ImageArrays",
    "decode",
    "encode",
    "encode_to_token_file",
    "infer_pixel_max",
    "is_char_tokenizer",
    "iter_text_chunks",
    "lm_batch",
    "load_csv_arrays",
    "load_digits_arrays",
    "load_image_file",
    "load_npz_arrays",
    "load_tokenizer",
    "map_labels",
    "open_token_file",
    "random_shift",
    "read_token_file_info",
    "save_tokenizer",
    "split_indices",
    "split_sizes",
    "split_tokens",
    "token_dtype",
    "token_file_is_current",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "train_char_tokenizer",
]
