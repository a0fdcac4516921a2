"""Evaluation: per-sample scores as sums that reduce exactly over ranks, and sliding-window inference."""

from .scores import confusion_matrices, confusion_matrix, dice_iou, psnr, ssim, topk_correct
from .sliding_window import sliding_window

__all__ = ["confusion_matrices", "confusion_matrix", "dice_iou", "psnr", "sliding_window", "ssim", "topk_correct"]
