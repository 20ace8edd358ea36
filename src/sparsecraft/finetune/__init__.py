"""Sparse fine-tuning that keeps the mask: CE, logit KD and SquareHead distillation from a dense teacher."""

from .config import FinetuneConfig, LossWeights
from .data import (
    TrainWindows,
    gsm8k_windows,
    pack_tokens,
    step_indices,
    text_windows,
    training_data,
    validation_windows,
)
from .losses import ce_loss, kd_loss, shifted_token_mask, squarehead_loss
from .masks import MaskCheck, MaskKeeper, capture_masks, check_masks, detect_nm, mask_summary
from .teacher import BlockRecorder, Teacher, check_compatible
from .trainer import finetune, latest_checkpoint, precompute_teacher, rows_read, save_trained

__all__ = [
    "BlockRecorder", "FinetuneConfig", "LossWeights", "MaskCheck", "MaskKeeper", "Teacher", "TrainWindows",
    "capture_masks", "ce_loss", "check_compatible", "check_masks", "detect_nm", "finetune", "gsm8k_windows",
    "kd_loss", "latest_checkpoint", "mask_summary", "pack_tokens", "precompute_teacher", "rows_read",
    "save_trained", "shifted_token_mask",
    "squarehead_loss", "step_indices", "text_windows", "training_data", "validation_windows",
]
