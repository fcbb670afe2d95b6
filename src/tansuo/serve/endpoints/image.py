"""The image endpoint: ``POST /v1/predict`` for image classifiers (base64 pictures or pixel arrays)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.data.images import decode_picture, image_from_array
from tansuo.errors import TansuoError
from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint


# ------------------------------------------------------------------------------------------ image
class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr | None = Field(None, description="a PNG/JPEG/BMP file, base64-encoded (a data: URL too)")
    pixels: list[Any] | None = Field(
        None, description="pixel values in the training data's units: (H, W), (C, H, W), (H, W, C) or flat"
    )


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: ImageInput | list[ImageInput] = Field(description="an image, or a list of images")


@register_endpoint("image")
class ImagePredict(Endpoint):
    """``POST /v1/predict`` for image classifiers."""

    path = "/v1/predict"
    input_kind = "image"
    request_model = ImageRequest

    def items(self, request: ImageRequest) -> list[np.ndarray]:
        images = [request.inputs] if isinstance(request.inputs, ImageInput) else list(request.inputs)
        self._count(images)
        c, h, _ = self.task.image_shape
        out = []
        for i, image in enumerate(images):
            name = f"inputs[{i}]"
            if (image.image is None) == (image.pixels is None):
                raise ApiError(422, f"{name}: give exactly one of 'image' (base64 picture) or 'pixels'")
            try:
                if image.image is not None:
                    data = image.image.split(",", 1)[1] if image.image.startswith("data:") else image.image
                    try:
                        raw = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise ApiError(422, f"{name}.image is not valid base64 ({e})") from e
                    array = decode_picture(
                        raw, image_size=h, channels=c, pixel_max=self.task.pixel_max, name=name
                    )
                else:
                    try:
                        pixels = np.asarray(image.pixels, dtype=np.float64)
                    except (ValueError, TypeError) as e:
                        raise ApiError(
                            422, f"{name}.pixels is not a rectangular array of numbers ({e})"
                        ) from e
                    array = image_from_array(pixels, image_size=h, channels=c, name=f"{name}.pixels")
            except TansuoError as e:
                raise ApiError(422, str(e)) from e
            out.append(array)
        return out

    def run(self, items: list[np.ndarray]) -> list[dict[str, Any]]:
        results = self.task.predict_arrays(self.model, np.stack(items), [""] * len(items), self.device)
        for r in results:
            del r["input"]
        return results

    def respond(self, request: ImageRequest, results: list[Any]) -> dict[str, Any]:
        return {"predictions": results}

    def warm_up_items(self) -> list[np.ndarray]:
        return [np.zeros(self.task.image_shape, dtype=np.float32)]

    def card(self) -> dict[str, Any]:
        c, h, w = self.task.image_shape
        return {
            "labels": list(self.task.class_names),
            "image_shape": [c, h, w],
            "pixel_max": self.task.pixel_max,
        }
