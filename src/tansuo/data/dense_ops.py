"""Resizing and augmenting dense-vision samples with their boxes and masks kept on the same pixels.

- :func:`resize_sample` letterboxes (scale the long side to the model's size, pad the rest, centred, as
  Ultralytics does) or stretches a sample to a square input; the :class:`Placement` it returns maps the
  model's boxes and class scores back onto the original image.
- :func:`augment_batch` runs kornia's ``AugmentationSequential`` with ``input``, ``bbox_xyxy`` and ``mask``
  keys (a horizontal flip and a random affine: scale and translation), seeded per batch as
  :mod:`tansuo.data.augment` seeds its draws, so a batch is a pure function of (run seed, step).

kornia moves points with pixel-centre coordinates (pixel ``i`` at ``i``); our boxes are continuous (pixel
``i`` spans ``i .. i+1``), so boxes are shifted by half a pixel around the transform.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from tansuo.data.dense import IGNORE_INDEX, DenseSample, boxes_from_masks

RESIZE_MODES = ("letterbox", "stretch")


@dataclass(frozen=True)
class Placement:
    """Where an original ``height`` x ``width`` image lies in a square model input of side ``size``: scaled
    by ``scale_x`` / ``scale_y``, then shifted by ``pad_x`` / ``pad_y`` pixels."""

    height: int
    width: int
    size: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, height: int, width: int, size: int, mode: str = "letterbox") -> Placement:
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
        if mode == "stretch":
            return cls(height, width, size, size / width, size / height, 0, 0)
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        return cls(
            height, width, size, new_w / width, new_h / height, (size - new_w) // 2, (size - new_h) // 2
        )

    @property
    def inner(self) -> tuple[int, int]:
        """(H, W) of the image inside the model input."""
        return max(1, round(self.height * self.scale_y)), max(1, round(self.width * self.scale_x))

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        scale = np.array([self.scale_x, self.scale_y] * 2, np.float32)
        return boxes * scale + np.array([self.pad_x, self.pad_y] * 2, np.float32)

    def boxes_to_original(self, boxes: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, 4) xyxy boxes on the model input -> on the original image, clipped to it."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = (boxes - np.array([self.pad_x, self.pad_y] * 2, np.float32)) / np.array(
            [self.scale_x, self.scale_y] * 2, np.float32
        )
        return np.clip(out, 0, [self.width, self.height, self.width, self.height]).astype(np.float32)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., size, size)`` -> the ``(..., h, w)`` part that shows the image (padding cut off)."""
        h, w = self.inner
        return x[..., self.pad_y : self.pad_y + h, self.pad_x : self.pad_x + w]

    def scores_to_original(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores ``(K, S, S)`` (S any multiple of the input side's grid) -> ``(K, H, W)`` on
        the original image: the padding cut off, then bilinear resizing."""
        if scores.shape[-1] != self.size:
            scores = F.interpolate(scores[None], size=(self.size, self.size), mode="bilinear")[0]
        inner = self.crop(scores)[None]
        return F.interpolate(inner, size=(self.height, self.width), mode="bilinear")[0]


def image_to_input(image: np.ndarray, placement: Placement, fill: int = 0) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, size, size) in 0..255: resized (bilinear, antialiased) and padded."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]  # (1, 3, H, W)
    h, w = placement.inner
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = torch.full((3, placement.size, placement.size), float(fill))
    out[:, placement.pad_y : placement.pad_y + h, placement.pad_x : placement.pad_x + w] = x[0]
    return out


def _resize_labels(maps: np.ndarray, placement: Placement, fill: int) -> np.ndarray:
    """(C, H, W) integer or bool maps -> (C, size, size), nearest neighbour, padding = ``fill``."""
    h, w = placement.inner
    x = torch.from_numpy(maps.astype(np.int64))[None].float()
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="nearest-exact")
    out = np.full((maps.shape[0], placement.size, placement.size), fill, dtype=maps.dtype)
    out[:, placement.pad_y : placement.pad_y + h, placement.pad_x : placement.pad_x + w] = (
        x[0].numpy().astype(maps.dtype)
    )
    return out


def resize_sample(
    sample: DenseSample, size: int, mode: str = "letterbox", fill: int = 0
) -> tuple[DenseSample, Placement]:
    """A sample resized to a ``size`` x ``size`` model input, boxes and masks with it.

    Padding gets pixel value ``fill``, no object, and :data:`IGNORE_INDEX` in the class map (it is not part
    of the image, so it is not scored).

    Returns:
        The resized sample (image uint8) and the :class:`Placement` that maps results back.
    """
    image = sample.pixels()
    placement = Placement.fit(image.shape[0], image.shape[1], size, mode)
    pixels = image_to_input(image, placement, fill).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    masks = None if sample.masks is None else _resize_labels(sample.masks, placement, 0).astype(bool)
    semantic = None
    if sample.semantic is not None:
        semantic = _resize_labels(sample.semantic[None], placement, IGNORE_INDEX)[0]
    resized = replace(
        sample,
        image=np.ascontiguousarray(pixels),
        boxes=placement.boxes_to_input(sample.boxes),
        masks=masks,
        semantic=semantic,
        size=None,
    )
    resized.__post_init__()
    return resized, placement


def augment_batch(
    images: torch.Tensor,
    seed: int,
    *,
    semantic: torch.Tensor | None = None,
    boxes: list[torch.Tensor] | None = None,
    masks: list[torch.Tensor] | None = None,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.75, 1.25),
    translate: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Flip and affinely move a batch, its class maps, boxes and instance masks alike (kornia).

    Args:
        images: (B, C, H, W) float images.
        seed: This batch's seed (``batch_seed(run seed, step, salt)``); the draw is a pure function of it and
            the global random state is left as it was.
        semantic: (B, H, W) int64 class maps; pixels moved in from outside become :data:`IGNORE_INDEX`.
        boxes: Per image (N_i, 4) xyxy boxes; clipped to the image afterwards (and, where ``masks`` are
            given, replaced by the tight boxes of the moved masks).
        masks: Per image (N_i, H, W) bool instance masks.
        hflip: Probability of a horizontal flip.
        scale: Range of the random zoom.
        translate: Largest shift, as a fraction of the side.

    Returns:
        ``(images, semantic, boxes, masks)`` moved, None where not given.
    """
    import kornia.augmentation as K

    height, width = images.shape[-2:]
    keys, args = ["input"], [images]
    if semantic is not None:
        keys.append("mask")
        args.append((semantic + 1).float()[:, None])  # 0 marks pixels from outside the image
    if boxes is not None:
        keys.append("bbox_xyxy")
        args.append([b.float() - 0.5 for b in boxes])  # continuous -> kornia's pixel-centre coordinates
    if masks is not None:
        counts = [len(m) for m in masks]
        most = max(counts, default=0)
        stacked = torch.zeros(len(masks), max(most, 1), height, width)
        for i, m in enumerate(masks):
            stacked[i, : len(m)] = m.float()
        keys.append("mask")
        args.append(stacked)
    aug = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=hflip),
        K.RandomAffine(degrees=0.0, translate=(translate, translate), scale=scale, p=1.0),
        data_keys=keys,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = aug(*args)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    moved_images = out.pop(0)
    moved_semantic = moved_boxes = moved_masks = None
    if semantic is not None:
        raw = out.pop(0)[:, 0].round().long()
        moved_semantic = torch.where(raw == 0, IGNORE_INDEX, raw - 1)
    if boxes is not None:
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        moved_boxes = [torch.minimum((b + 0.5).clamp(min=0), limit) for b in out.pop(0)]
    if masks is not None:
        stacked = out.pop(0) > 0.5
        moved_masks = [stacked[i, :n] for i, n in enumerate(counts)]
        if moved_boxes is not None:
            moved_boxes = [
                torch.from_numpy(boxes_from_masks(m.numpy())) if len(m) else b
                for m, b in zip(moved_masks, moved_boxes, strict=True)
            ]
    return moved_images, moved_semantic, moved_boxes, moved_masks
