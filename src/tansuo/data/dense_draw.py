"""Pictures of dense predictions: a class mask drawn over its image, boxes drawn on it, and class masks as
PNG files.

Colours follow Pascal VOC's palette (the bits of the class id spread over R, G and B), so neighbouring ids
get distinct colours and the same id always the same one; background (0) is left undrawn.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def palette(n: int) -> np.ndarray:
    """uint8 (n, 3) colours of ids 0..n-1, Pascal VOC's ``labelcolormap``."""
    colours = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def png_bytes(array: np.ndarray, colours: np.ndarray | None = None) -> bytes:
    """A PNG file of an image (uint8 (H, W, 3)) or of a class mask (uint8 (H, W); with ``colours`` a palette
    PNG whose pixel values stay the class ids, as VOC's masks are stored)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(array))
    if array.ndim == 2 and colours is not None:
        picture = picture.convert("P")
        picture.putpalette(colours.reshape(-1).tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_mask(image: np.ndarray, mask: np.ndarray, names: list[str], alpha: float = 0.5) -> bytes:
    """A PNG of ``image`` (uint8 (H, W, 3)) with each non-background class of ``mask`` (H, W) blended in its
    palette colour at opacity ``alpha``, and a legend of the classes shown in the top-left corner."""
    from PIL import Image, ImageDraw

    colours = palette(max(len(names), int(mask.max()) + 1))
    blended = image.astype(np.float32)
    drawn = mask > 0
    blended[drawn] = (1 - alpha) * blended[drawn] + alpha * colours[mask[drawn]]
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    for row, cls in enumerate(c for c in np.unique(mask) if c > 0):
        y = 2 + 12 * row
        pen.rectangle((2, y, 11, y + 9), fill=tuple(int(v) for v in colours[cls]), outline=(255, 255, 255))
        label = names[cls] if cls < len(names) else str(cls)
        pen.text((15, y - 1), label, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_boxes(image: np.ndarray, detections: list[dict[str, Any]], class_names: list[str]) -> bytes:
    """A PNG of ``image`` (uint8 (H, W, 3)) with each detection's box and ``label score`` drawn on it, one
    colour per class (Pascal VOC's palette, as segmentation's overlays)."""
    from PIL import Image, ImageDraw

    colours = palette(len(class_names) + 1)[1:]
    picture = Image.fromarray(np.ascontiguousarray(image))
    pen = ImageDraw.Draw(picture)
    width = max(1, round(max(image.shape[:2]) / 200))
    for d in detections:
        colour = tuple(int(c) for c in colours[class_names.index(d["label"])])
        x1, y1, x2, y2 = d["box"]
        pen.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        lift = bottom - top + 2
        pen.rectangle([x1, y1 - lift, x1 + right - left + 2, y1], fill=colour)
        pen.text((x1 + 1, y1 - lift), text, fill=(0, 0, 0))
    return png_bytes(np.asarray(picture))
