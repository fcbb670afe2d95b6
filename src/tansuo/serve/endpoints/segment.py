"""``POST /v1/segment`` for semantic segmenters: an uploaded picture -> its class mask.

The request holds base64 pictures (PNG, JPEG, ...; a data: URL too) as the image endpoint takes them. Each
answer has the picture's size, the share of its pixels of each class, and the class mask: a PNG whose pixel
values are class ids (a palette PNG, so it also looks like the mask; ``mask_format: "png"``, the default) or,
with ``mask_format: "rle"``, one COCO run-length encoding per class present (pycocotools' compressed
``counts``, column-major, as COCO's ``segmentation``). A picture with more than ``--max-pixels`` pixels is
refused before it is decoded (413); a file that is not a picture, or is truncated, is a 422.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.data.dense import read_image
from tansuo.data.dense_draw import palette, png_bytes
from tansuo.errors import TansuoError
from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint


class SegmentInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(description="a PNG/JPEG/BMP/WebP file, base64-encoded (a data: URL too)")


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: SegmentInput | list[SegmentInput] = Field(description="a picture, or a list of pictures")
    mask_format: Literal["png", "rle"] = Field(
        "png", description="png: a class-id PNG, base64; rle: COCO run-length encodings per class"
    )


def decode_upload(text: str, name: str, max_pixels: int) -> np.ndarray:
    """A base64 picture (or data: URL) as uint8 (H, W, 3) RGB.

    Raises:
        ApiError: 422 for bad base64, a file that is not a picture or is damaged; 413 for more than
            ``max_pixels`` pixels (read from the header, before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    data = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"{name} is not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(raw)) as picture:
            width, height = picture.size
    except UnidentifiedImageError as e:
        raise ApiError(422, f"{name} is not a picture Pillow reads; send a PNG or JPEG file") from e
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name} has too many pixels ({e})") from e
    except (OSError, ValueError) as e:
        raise ApiError(422, f"{name} cannot be read ({e}); the file is damaged or truncated") from e
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{name} is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} (--max-pixels)",
        )
    try:
        return read_image(io.BytesIO(raw), name=name)
    except TansuoError as e:
        raise ApiError(422, str(e)) from e


def rle_by_class(mask: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """COCO compressed RLE (``{"size": [H, W], "counts": str}``) of each non-background class present."""
    from pycocotools import mask as mask_utils

    out = {}
    for cls in np.unique(mask):
        if cls == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray((mask == cls).astype(np.uint8)))
        size = [int(v) for v in rle["size"]]
        out[names[int(cls)]] = {"size": size, "counts": rle["counts"].decode("ascii")}
    return out


@register_endpoint("segment")
class Segment(Endpoint):
    """``POST /v1/segment``: pictures to class masks."""

    path = "/v1/segment"
    summary = "Segment pictures"
    input_kind = "image"
    request_model = SegmentRequest

    def items(self, request: SegmentRequest) -> list[np.ndarray]:
        inputs = [request.inputs] if isinstance(request.inputs, SegmentInput) else list(request.inputs)
        self._count(inputs)
        limit = self.limits.max_pixels
        return [decode_upload(item.image, f"inputs[{i}].image", limit) for i, item in enumerate(inputs)]

    def run(self, items: list[np.ndarray]) -> list[np.ndarray]:
        return self.task.segment_images(self.model, items, self.device)

    def respond(self, request: SegmentRequest, results: list[np.ndarray]) -> dict[str, Any]:
        names = self.task.class_names
        colours = palette(len(names))
        predictions = []
        for mask in results:
            answer: dict[str, Any] = {
                "height": int(mask.shape[0]),
                "width": int(mask.shape[1]),
                "areas": self.task.areas(mask),
            }
            if request.mask_format == "png":
                answer["mask_png"] = base64.b64encode(png_bytes(mask, colours)).decode("ascii")
            else:
                answer["mask_rle"] = rle_by_class(mask, names)
            predictions.append(answer)
        return {"classes": names, "colours": colours.tolist(), "predictions": predictions}

    def warm_up_items(self) -> list[np.ndarray]:
        size = self.task.data.image_size
        return [np.zeros((size, size, 3), np.uint8)]

    def card(self) -> dict[str, Any]:
        names = self.task.class_names
        return {
            "labels": names,
            "colours": palette(len(names)).tolist(),
            "image_size": self.task.data.image_size,
        }
