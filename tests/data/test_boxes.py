"""Box conversions, IoU, GIoU and NMS against hand computations and kornia."""

import pytest
import torch
from kornia.geometry.bbox import nms as kornia_nms

from tansuo.data.boxes import (
    batched_nms,
    box_area,
    box_convert,
    box_iou,
    box_iou_pairs,
    generalized_box_iou,
    generalized_box_iou_pairs,
)

XYXY = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 2.0]])
XYWH = torch.tensor([[10.0, 20.0, 20.0, 40.0], [0.0, 0.0, 4.0, 2.0]])
CXCYWH = torch.tensor([[20.0, 40.0, 20.0, 40.0], [2.0, 1.0, 4.0, 2.0]])


@pytest.mark.parametrize(
    ("a", "fa", "b", "fb"),
    [
        (XYXY, "xyxy", XYWH, "xywh"),
        (XYXY, "xyxy", CXCYWH, "cxcywh"),
        (XYWH, "xywh", CXCYWH, "cxcywh"),
    ],
)
def test_conversions_match_hand_computed_boxes_both_ways(a, fa, b, fb):
    torch.testing.assert_close(box_convert(a, fa, fb), b)
    torch.testing.assert_close(box_convert(b, fb, fa), a)
    torch.testing.assert_close(box_convert(a, fa, fa), a)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="xyxy"):
        box_convert(XYXY, "yolo", "xyxy")


def test_area_iou_and_giou_match_hand_computations():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    assert box_area(b).tolist() == [4.0, 4.0, 4.0]
    # overlap 1, union 7; identical; disjoint
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    # enclosing boxes: 3x3 = 9 (empty share (9-7)/9), 2x2, 6x2 = 12 (empty share (12-8)/12)
    want = torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - 4 / 12]])
    torch.testing.assert_close(generalized_box_iou(a, b), want)
    torch.testing.assert_close(generalized_box_iou_pairs(a.expand(3, 4), b), want[0])
    torch.testing.assert_close(box_iou_pairs(a.expand(3, 4), b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_pairwise_iou_agrees_with_the_element_wise_one_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    pairwise = box_iou(boxes[:10], boxes[10:])
    elementwise = box_iou_pairs(boxes[:10, None], boxes[None, 10:])
    torch.testing.assert_close(pairwise, elementwise, atol=1e-5, rtol=1e-5)
    assert (generalized_box_iou(boxes, boxes) <= box_iou(boxes, boxes) + 1e-6).all()


def test_batched_nms_keeps_classes_apart_and_matches_kornia_within_a_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    same = torch.zeros(4, dtype=torch.long)
    assert batched_nms(boxes, scores, same, 0.5).tolist() == kornia_nms(boxes, scores, 0.5).tolist() == [0, 2]
    labels = torch.tensor([0, 0, 0, 1])  # the last box overlaps the first fully but is another class
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.numel() == 0
    flat = torch.tensor([[5.0, 5, 5, 9], [0, 0, 4, 4]])  # a box without area is dropped, not an error
    assert batched_nms(flat, torch.tensor([0.9, 0.5]), torch.zeros(2, dtype=torch.long), 0.5).tolist() == [1]
