"""Segmentation metrics shared by the demo, the accuracy benchmark, training and the tests."""

from __future__ import annotations

import numpy as np

from .vocabulary import UNLABELLED


class ConfusionMatrix:
    """Accumulates a (C x C) pixel confusion matrix; unlabelled predictions count as wrong."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # last column: unlabelled

    def add(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        if truth.shape != prediction.shape:
            raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in size")
        pred = prediction.astype(np.int64).ravel()
        pred[pred == UNLABELLED] = self.num_classes
        pred[pred > self.num_classes] = self.num_classes
        gt = truth.astype(np.int64).ravel()
        valid = gt < self.num_classes
        index = gt[valid] * (self.num_classes + 1) + pred[valid]
        self.matrix += np.bincount(index, minlength=self.matrix.size).reshape(self.matrix.shape)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both truth and prediction."""
        tp = np.diag(self.matrix[:, : self.num_classes]).astype(np.float64)
        gt_total = self.matrix.sum(axis=1)
        pred_total = self.matrix[:, : self.num_classes].sum(axis=0)
        union = gt_total + pred_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def present(self) -> np.ndarray:
        return self.matrix.sum(axis=1) > 0

    def mean_iou(self, classes: list[int] | None = None) -> float:
        """Mean IoU over the given classes that occur in the ground truth (all such classes if None)."""
        iou = self.iou()
        mask = self.present()
        if classes is not None:
            chosen = np.zeros_like(mask)
            chosen[classes] = True
            mask &= chosen
        values = iou[mask]
        return float(np.nanmean(values)) if values.size else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix[:, : self.num_classes]) / total) if total else float("nan")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
