"""``POST /v1/detect`` for detect bundles: an uploaded picture (base64) to boxes, labels and scores.

A request carries one picture and optionally ``score_threshold``, ``max_detections`` (at most the server's
``--max-detections``) and ``iou_threshold``; pictures of concurrent requests run through the model in one
call. A body that is not base64 or not a picture (truncated, or larger than Pillow's decompression-bomb
limit) is a 422 saying why."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.data.dense import read_image
from tansuo.errors import TansuoError
from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(description="a PNG/JPEG/BMP/WebP file, base64-encoded (a data: URL too)")
    score_threshold: float = Field(0.3, ge=0, le=1, description="lowest score kept")
    max_detections: int | None = Field(None, ge=1, description="most boxes (default and cap: the server's)")
    iou_threshold: float = Field(0.6, gt=0, le=1, description="NMS overlap above which a box is dropped")


class _Item(NamedTuple):
    image: np.ndarray
    score_threshold: float
    max_detections: int
    iou_threshold: float


@register_endpoint("detect")
class Detect(Endpoint):
    """``POST /v1/detect``: boxes in one picture."""

    path = "/v1/detect"
    summary = "Detect objects"
    input_kind = "image"
    request_model = DetectRequest

    def items(self, request: DetectRequest) -> list[_Item]:
        limit = self.limits.max_detections
        wanted = limit if request.max_detections is None else request.max_detections
        if wanted > limit:
            raise ApiError(
                422, f"max_detections {wanted} is above this server's limit {limit} (--max-detections)"
            )
        data = request.image.split(",", 1)[1] if request.image.startswith("data:") else request.image
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(422, f"image is not valid base64 ({e})") from e
        try:
            image = read_image(io.BytesIO(raw), name="image")
        except TansuoError as e:
            raise ApiError(422, str(e)) from e
        return [_Item(image, request.score_threshold, wanted, request.iou_threshold)]

    def run(self, items: list[_Item]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, item in enumerate(items):  # one model call per distinct setting (usually one)
            groups.setdefault(item[1:], []).append(i)
        for (score, most, iou), where in groups.items():
            rows = self.task.predict_images(
                self.model, [items[i].image for i in where], [""] * len(where), self.device, score, most, iou
            )
            for i, row in zip(where, rows, strict=True):
                del row["input"]
                results[i] = row
        return [r for r in results if r is not None]

    def respond(self, request: DetectRequest, results: list[Any]) -> dict[str, Any]:
        return results[0]

    def warm_up_items(self) -> list[_Item]:
        size = self.task.image_size
        return [_Item(np.zeros((size, size, 3), np.uint8), 0.3, 1, 0.6)]

    def card(self) -> dict[str, Any]:
        return {"labels": list(self.task.class_names), "image_size": self.task.image_size}
