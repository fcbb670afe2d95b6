"""Metrics shared by tasks: classification (image and text classification), translation, ranking
(recommendation) and semantic segmentation (per-pixel confusion, IoU, Dice)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> dict[str, float]:
    """Loss, accuracy, macro-F1 and (with more than ``top_k`` classes) top-k accuracy."""
    num_classes = logits.shape[-1]
    pred = logits.argmax(-1)
    metrics = {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (pred == labels).float().mean().item(),
    }
    if num_classes > top_k:
        topk = logits.topk(top_k, dim=-1).indices
        metrics[f"top{top_k}_accuracy"] = (topk == labels[:, None]).any(-1).float().mean().item()
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    metrics["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return metrics


def per_class_report(pred: torch.Tensor, target: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true label, columns:
    predicted label), from predicted and true class ids ``(N,)``."""
    k = len(labels)
    matrix = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)  # (true, predicted)
    per_class = {}
    for c, label in enumerate(labels):
        tp = int(matrix[c, c])
        predicted, actual = int(matrix[:, c].sum()), int(matrix[c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {"per_class": per_class, "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()}}


def classifier_metrics(
    logits: torch.Tensor, labels: torch.Tensor, names: list[str], top_k: int = 5
) -> dict[str, Any]:
    """Everything a classifier's ``evaluate`` reports: accuracy, macro-F1, top-k, per class, confusion."""
    metrics: dict[str, Any] = dict(classification_metrics(logits, labels, top_k))
    metrics.update(per_class_report(logits.argmax(-1), labels, names))
    return metrics


def translation_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level translation metrics with sacreBLEU (Post 2018), one reference per sentence.

    - ``bleu``: sacreBLEU's standard: detokenized text, cased, its ``13a`` tokenization (the signature
      ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp``); the figure to quote;
    - ``chrf``: chrF (Popović 2015), character n-grams, sacreBLEU's defaults;
    - ``bleu_tok_lc``: BLEU of lower-cased ``13a`` tokens, for comparison with papers and notebooks that
      score lower-cased tokenized text (bentrevett's Multi30k anchor: spaCy tokens; not quotable as
      sacreBLEU).
    """
    import sacrebleu  # imported here: `import tansuo` stays light

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    refs = [references]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, refs).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, refs).score),
        "bleu_tok_lc": float(sacrebleu.corpus_bleu(hypotheses, refs, lowercase=True).score),
    }


#: the cut-offs of the ranking metrics (RecBole's ``topk: [5, 10, 20]`` style)
RANKING_KS = (5, 10, 20)


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """The 1-based rank of each row's target among the row's candidates.

    Args:
        scores: ``(N, K)`` scores of K candidates (every item, or a target and its sampled negatives).
        targets: ``(N,)`` the target's column in ``scores``.
        exclude: ``(N, K)`` bool, candidates taken out of the ranking (items the user has seen; column 0,
            padding); the target itself is never taken out.

    Ties are broken by column, lower first: the order of a sort by (score descending, column ascending),
    which is also the order ``predict`` lists items in, so the figures do not depend on a kernel's tie
    order (a most-popular model has many ties).

    Returns:
        ``(N,)`` long ranks, 1 = first.
    """
    scores = scores.float()
    rows = torch.arange(len(targets), device=scores.device)
    target_score = scores[rows, targets][:, None]  # (N, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > target_score) | ((scores == target_score) & (columns < targets[:, None]))
    if exclude is not None:
        ahead = ahead & ~exclude
    return ahead.sum(dim=1) + 1


def ranking_metrics(
    ranks: torch.Tensor, ks: tuple[int, ...] = RANKING_KS, prefix: str = ""
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K averaged over rows, from each row's target rank (one relevant item per row).

    RecBole's definitions with one positive: ``hr@K`` = 1 if rank <= K; ``ndcg@K`` = 1 / log2(rank + 1) if
    rank <= K (the ideal DCG is 1); ``mrr@K`` = 1 / rank if rank <= K; each 0 otherwise. Computed on the
    rank of the target, one vector op per figure: torchmetrics' retrieval metrics would need every (row,
    item) score flattened with a query index (N x items elements, sorted per query) to give the same three
    numbers, and break ties by their own order.

    Args:
        ranks: ``(N,)`` 1-based ranks (:func:`target_ranks`).
        ks: The cut-offs.
        prefix: Put before each name (``"sampled_"`` for the sampled protocol).
    """
    ranks = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"{prefix}hr@{k}"] = float(hit.double().mean())
        out[f"{prefix}ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 1), 0.0).mean())
        out[f"{prefix}mrr@{k}"] = float(torch.where(hit, 1.0 / ranks, 0.0).mean())
    return out


def pixel_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` of per-pixel class ids (rows: true class, columns: predicted), int64;
    pixels whose target is ``ignore_index`` are left out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, -1)


def segmentation_metrics(confusion: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy and mean Dice from a pixel confusion matrix (rows: true, columns: predicted).

    Per class: IoU = TP / (TP + FP + FN) (Jaccard) and Dice = 2 TP / (2 TP + FP + FN) (F1). Means are over
    the classes that occur in the targets or the predictions (a class absent from both has no IoU), as
    mmsegmentation's nan-mean and torchmetrics' ``JaccardIndex(average="macro")`` with absent classes
    dropped. Background (class 0) counts, as in Pascal VOC's mIoU; ``miou_objects`` leaves it out.
    ``per_class_iou`` gives each class's IoU (None where absent).
    """
    matrix = confusion.double()
    tp = matrix.diag()
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    total = float(matrix.sum())

    def nanmean(x: torch.Tensor) -> float:
        return float(x[~x.isnan()].mean()) if (~x.isnan()).any() else 0.0

    return {
        "miou": nanmean(iou),
        "miou_objects": nanmean(iou[1:]),
        "pixel_accuracy": float(tp.sum()) / total if total else 0.0,
        "dice": nanmean(dice),
        "per_class_iou": {n: (None if v.isnan() else float(v)) for n, v in zip(names, iou, strict=True)},
    }
