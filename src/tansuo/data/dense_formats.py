"""Loaders of the dense-vision file formats users bring, each into a :class:`~tansuo.data.dense.DenseDataset`:

- :func:`read_coco_instances`: a COCO instances JSON (boxes; polygons and RLE masks through pycocotools'
  mask utilities), as ``pycocotools.coco.COCO`` reads it;
- :func:`read_yolo`: Ultralytics' YOLO txt folders (``cls cx cy w h`` normalised, or ``cls x1 y1 x2 y2 ...``
  polygons for YOLO-seg); an image without a label file is a background image, as Ultralytics treats it;
- :func:`read_semantic_pngs`: class-index PNGs, one per image, with the same stem;
- :func:`read_instance_pngs`: object-id PNGs (one id per object, 0 background), boxes derived from the masks.

Class ids in files become indices ``0..K-1`` into ``names`` in the order the ids are listed (``names`` may
be a list, id ``i`` being ``names[i]``, or a mapping ``{id: name}`` as YOLO and COCO configs write it).
Every error names the file and says how to fix it; images are read with :func:`~tansuo.data.dense.read_image`
(decompression bombs refused).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tansuo.data.dense import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    DenseDataset,
    DenseSample,
    boxes_from_masks,
    check_sample,
    image_size_of,
    read_image,
    read_label_png,
)
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

Names = Sequence[str] | Mapping[int, str]


def class_table(names: Names) -> tuple[dict[int, int], list[str]]:
    """``{file class id: index}`` and the names in index order, from a list or an ``{id: name}`` mapping."""
    if isinstance(names, Mapping):
        items = [(int(k), str(v)) for k, v in names.items()]
    else:
        items = [(i, str(v)) for i, v in enumerate(names)]
    if not items:
        raise DataError("names is empty; list the class names (a list, or a mapping of id to name)")
    listed = [name for _, name in items]
    if len(set(listed)) != len(listed):
        twice = next(n for n in listed if listed.count(n) > 1)
        raise DataError(f"names lists {twice!r} twice; every class needs its own name")
    return {cid: i for i, (cid, _) in enumerate(items)}, listed


def read_names(path: str | Path) -> dict[int, str]:
    """Class names from a YOLO-style YAML config (``names:`` or ``classes:``, a list or ``{id: name}``), or a
    text file with one name a line (ids from 0).

    Raises:
        DataError: If the file is missing or holds no such list.
    """
    import yaml

    path = _existing(path, "names file")
    if path.suffix.lower() not in (".yaml", ".yml"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return dict(enumerate(lines))
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DataError(f"{path} is not valid YAML ({error})") from error
    found = None
    if isinstance(config, dict):
        found = config.get("names", config.get("classes"))
    if isinstance(found, list):
        return {i: str(v) for i, v in enumerate(found)}
    if isinstance(found, dict) and all(isinstance(k, int) for k in found):
        return {int(k): str(v) for k, v in found.items()}
    raise DataError(f"{path} has no 'names:' (or 'classes:') list or {{id: name}} mapping")


def _existing(path: str | Path, what: str, folder: bool = False) -> Path:
    path = Path(path).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise DataError(f"{what} not found: {path}; check the path (or --data-dir)")
    return path


def list_images(images_dir: str | Path) -> list[Path]:
    """Picture files under a folder (sub-folders too), sorted by path."""
    folder = _existing(images_dir, "images folder", folder=True)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _sample(path: Path, lazy: bool, **fields: Any) -> DenseSample:
    if lazy:
        return DenseSample(source=str(path), path=path, size=image_size_of(path), **fields)
    return DenseSample(source=str(path), image=read_image(path), path=path, **fields)


def _rasterize_polygons(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """bool (H, W): the union of polygons given as flat pixel coordinates ``[x1, y1, x2, y2, ...]``."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


# ------------------------------------------------------------------ COCO
def read_coco_instances(json_path: str | Path, images_dir: str | Path, *, lazy: bool = False) -> DenseDataset:
    """A COCO instances JSON: ``images``, ``annotations`` (``bbox`` xywh, ``segmentation`` as polygons, RLE
    or uncompressed RLE, ``iscrowd``) and ``categories`` (names in the order listed).

    Args:
        json_path: The JSON file.
        images_dir: Folder the images' ``file_name`` are relative to.
        lazy: Read pixels on first use instead of now.

    Raises:
        DataError: Naming the file for: unreadable JSON, a missing image, an annotation whose category is
            not listed, an image whose size differs from its entry, an RLE mask of another size, a box outside
            the image.
    """
    json_path = _existing(json_path, "COCO JSON file")
    images_dir = _existing(images_dir, "images folder", folder=True)
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
        images, annotations, categories = coco["images"], coco.get("annotations", []), coco["categories"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path} is not valid JSON ({error})") from error
    except (KeyError, TypeError) as error:
        raise DataError(f"{json_path} lacks COCO's 'images' and 'categories' lists ({error})") from error
    class_index, names = class_table({int(c["id"]): c["name"] for c in categories})
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    samples = []
    for entry in images:
        path = images_dir / entry["file_name"]
        if not path.is_file():
            raise DataError(f"{json_path}: image {entry['file_name']!r} not found in {images_dir}")
        sample = _sample(path, lazy)
        height, width = sample.height, sample.width
        if (entry.get("height"), entry.get("width")) not in ((height, width), (None, None)):
            raise DataError(
                f"{json_path}: image {entry['file_name']!r} is listed as {entry['width']}x{entry['height']} "
                f"but is {width}x{height} (W x H); fix its entry"
            )
        anns = by_image.get(int(entry["id"]), [])
        boxes, labels, masks, crowd = [], [], [], []
        for ann in anns:
            cid = int(ann["category_id"])
            if cid not in class_index:
                raise DataError(
                    f"{json_path}: annotation {ann.get('id')} of {entry['file_name']!r} has category_id "
                    f"{cid}, which is not among the categories ({sorted(class_index)})"
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(class_index[cid])
            crowd.append(bool(ann.get("iscrowd", 0)))
            if "segmentation" in ann:
                masks.append(
                    _coco_mask(
                        ann["segmentation"],
                        height,
                        width,
                        f"{json_path}: annotation {ann.get('id')} of {entry['file_name']!r}",
                    )
                )
        has_masks = len(masks) == len(anns)
        sample.boxes = np.array(boxes, np.float32).reshape(-1, 4)
        sample.labels = np.array(labels, np.int64)
        sample.crowd = np.array(crowd, bool)
        sample.masks = (
            np.stack(masks)
            if masks and has_masks
            else (np.zeros((0, height, width), bool) if not anns else None)
        )
        sample.source = f"{path} ({json_path.name})"
        samples.append(check_sample(sample, len(names)))
    logger.info(
        "%s: %d images, %d objects, %d classes",
        json_path,
        len(samples),
        sum(len(s.labels) for s in samples),
        len(names),
    )
    return DenseDataset(names, samples)


def _coco_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """bool (H, W) from a COCO ``segmentation``: polygons, uncompressed RLE (``counts`` a list) or RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), bool)
        return _rasterize_polygons(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise DataError(
                f"{where}: its RLE mask is {size[0]}x{size[1]} but the image is {height}x{width} (H x W); "
                "masks must match their image's size"
            )
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle["counts"], str):
            rle = {"size": size, "counts": rle["counts"].encode("ascii")}
        try:
            return mask_utils.decode(rle).astype(bool)
        except (ValueError, TypeError) as error:
            raise DataError(f"{where}: cannot decode its RLE mask ({error})") from error
    raise DataError(f"{where}: segmentation must be a list of polygons or an RLE {{size, counts}}")


# ------------------------------------------------------------------ YOLO
def read_yolo(
    images_dir: str | Path, labels_dir: str | Path, names: Names, *, lazy: bool = False
) -> DenseDataset:
    """Ultralytics' YOLO folders: for ``images_dir/a/b.jpg`` the labels are ``labels_dir/a/b.txt``, a line
    per object: ``cls cx cy w h`` (normalised to 0..1) or, for YOLO-seg, ``cls x1 y1 x2 y2 ...`` (a
    normalised polygon of at least 3 points; its box is the polygon's extent).

    An image without a label file is a background image (no objects); label files without an image are
    ignored, as Ultralytics does. When any object has a polygon, every sample gets masks (box-only objects
    get their filled box).

    Raises:
        DataError: Naming the file and line for: a line that is not numbers or has a wrong count, a class id
            outside ``names``, coordinates outside the image.
    """
    class_index, class_names = class_table(names)
    labels_root = _existing(labels_dir, "labels folder", folder=True)
    images_root = Path(images_dir).expanduser()
    samples, polygons_seen = [], False
    for path in list_images(images_root):
        sample = _sample(path, lazy)
        label_file = (labels_root / path.relative_to(images_root)).with_suffix(".txt")
        boxes, labels, polygons = [], [], []
        lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.is_file() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{label_file}, line {number}"
            try:
                values = [float(v) for v in line.split()]
            except ValueError:
                raise DataError(f"{where}: {line.strip()!r} is not a list of numbers") from None
            if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
                raise DataError(
                    f"{where}: expected 'class cx cy w h' (5 numbers) or 'class x1 y1 x2 y2 x3 y3 ...' "
                    f"(a polygon of at least 3 points), found {len(values)} numbers"
                )
            cid = values[0]
            if cid != int(cid) or int(cid) not in class_index:
                raise DataError(
                    f"{where}: class {cid:g} is not among the {len(class_names)} names "
                    f"(ids {min(class_index)}..{max(class_index)}); fix the label or the names"
                )
            coords = np.array(values[1:], np.float64)
            if np.any(coords < -0.01) or np.any(coords > 1.01):
                raise DataError(
                    f"{where}: coordinates must be normalised to 0..1 (found "
                    f"{coords.min():g}..{coords.max():g}); divide pixel coordinates by the image's width and "
                    "height"
                )
            scale = np.array([sample.width, sample.height])
            if len(values) == 5:
                (cx, cy), (w, h) = coords[:2] * scale, coords[2:] * scale
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                polygons.append([box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]])
            else:
                points = coords.reshape(-1, 2) * scale
                box = (*points.min(axis=0), *points.max(axis=0))
                polygons.append(points.reshape(-1).tolist())
                polygons_seen = True
            boxes.append(box)
            labels.append(class_index[int(cid)])
        sample.boxes, sample.labels = np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)
        sample.source = str(label_file) if label_file.is_file() else str(path)
        samples.append((check_sample(sample, len(class_names)), polygons))
    if polygons_seen:
        for sample, polygons in samples:
            sample.masks = (
                np.stack([_rasterize_polygons([p], sample.height, sample.width) for p in polygons])
                if polygons
                else np.zeros((0, sample.height, sample.width), bool)
            )
    logger.info(
        "%s: %d images (%d without labels), %d classes",
        images_root,
        len(samples),
        sum(1 for s, _ in samples if Path(s.source).suffix != ".txt"),
        len(class_names),
    )
    return DenseDataset(class_names, [s for s, _ in samples])


# ------------------------------------------------------------------ mask PNGs
def _paired(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs by stem; images without a mask are skipped (logged)."""
    images_root = Path(images_dir).expanduser()
    masks_root = _existing(masks_dir, "masks folder", folder=True)
    pairs, missing = [], 0
    for path in list_images(images_root):
        mask = (masks_root / path.relative_to(images_root)).with_suffix(".png")
        if mask.is_file():
            pairs.append((path, mask))
        else:
            missing += 1
    if missing:
        logger.info("%s: %d images have no mask in %s and are left out", images_root, missing, masks_root)
    if not pairs:
        raise DataError(f"no image in {images_root} has a mask PNG of the same name in {masks_root}")
    return pairs


def read_semantic_pngs(
    images_dir: str | Path,
    masks_dir: str | Path,
    names: Names,
    *,
    background: int = 0,
    ignore_value: int | None = IGNORE_INDEX,
    lazy: bool = False,
) -> DenseDataset:
    """Class-index PNG folders: ``masks_dir/x.png`` holds the class id of each pixel of ``images_dir/x.jpg``.

    Ids are those of ``names`` (a list, or ``{id: name}`` as a YOLO config's ``classes:``); the
    ``background`` id is not a class (its entry in ``names``, if any, is dropped), ``ignore_value`` pixels are
    not scored. Images without a mask are left out (logged). The class maps keep ``names`` order: value k is
    the k-th remaining name.

    Raises:
        DataError: Naming the mask for: a size differing from its image's, an id outside ``names``, a colour
            PNG, an unreadable file.
    """
    table = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
    table.pop(background, None)
    if ignore_value is not None:
        table.pop(ignore_value, None)
    class_index, class_names = class_table(table)
    top = max([*class_index, background, ignore_value or 0]) + 1
    if len(class_names) >= IGNORE_INDEX:
        raise DataError(f"{len(class_names)} classes: class maps hold at most {IGNORE_INDEX - 1}")
    lut = np.full(max(top, 65536), -1, np.int64)
    lut[background] = 0
    if ignore_value is not None:
        lut[ignore_value] = IGNORE_INDEX
    for cid, i in class_index.items():
        lut[cid] = i + 1
    samples = []
    for path, mask_path in _paired(images_dir, masks_dir):
        raw = read_label_png(mask_path)
        semantic = lut[np.clip(raw, 0, len(lut) - 1)]
        if (semantic < 0).any() or raw.max() >= len(lut):
            bad = int(raw[(semantic < 0) | (raw >= len(lut))][0])
            raise DataError(
                f"{mask_path}: class id {bad} is not among the names (ids {sorted(class_index)[:20]}"
                f"{' ...' if len(class_index) > 20 else ''}), background {background}"
                + (f" or ignored {ignore_value}" if ignore_value is not None else "")
                + "; add it to names"
            )
        sample = _sample(path, lazy, semantic=semantic.astype(np.uint8))
        sample.source = str(mask_path)
        samples.append(check_sample(sample, len(class_names)))
    logger.info("%s: %d images with class masks, %d classes", masks_dir, len(samples), len(class_names))
    return DenseDataset(class_names, samples)


def read_instance_pngs(
    images_dir: str | Path,
    masks_dir: str | Path,
    names: Sequence[str],
    *,
    label_divisor: int | None = None,
    lazy: bool = False,
) -> DenseDataset:
    """Object-id PNG folders: ``masks_dir/x.png`` holds one id per object of ``images_dir/x.jpg``, 0 for
    background; boxes are the masks' extents.

    With one name, every object is of that class (as the Penn-Fudan pedestrian masks). With
    ``label_divisor`` (Cityscapes' 1000), an id ``v`` is object ``v`` of class ``v // label_divisor`` (an
    index into ``names``).

    Raises:
        DataError: Naming the mask for: a size differing from its image's, a class outside ``names``, several
            names without ``label_divisor``.
    """
    names = [str(n) for n in names]
    if label_divisor is None and len(names) != 1:
        raise DataError(
            f"instance masks with {len(names)} class names need label_divisor (id = class * divisor + "
            "object); with one id per object and no class in it, give one name"
        )
    samples = []
    for path, mask_path in _paired(images_dir, masks_dir):
        raw = read_label_png(mask_path)
        ids = [int(v) for v in np.unique(raw) if v != 0]
        labels = np.array([v // label_divisor if label_divisor else 0 for v in ids], np.int64)
        masks = np.stack([raw == v for v in ids]) if ids else np.zeros((0, *raw.shape), bool)
        sample = _sample(path, lazy, labels=labels, boxes=boxes_from_masks(masks), masks=masks)
        sample.source = str(mask_path)
        samples.append(check_sample(sample, len(names)))
    logger.info("%s: %d images, %d objects", masks_dir, len(samples), sum(len(s.labels) for s in samples))
    return DenseDataset(names, samples)
