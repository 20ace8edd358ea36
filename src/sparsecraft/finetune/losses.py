"""Loss terms of sparse fine-tuning, as pure functions of tensors.

Token masks are (batch, seq) with 1/True on the tokens that count. Every loss is computed in
float32 whatever dtype the model ran in, so that bf16 autocast changes the forward pass only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def squarehead_loss(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): Σ_layers MSE(h_s, h_t) / MSE(h_t, 0) over the masked tokens.

    Each hidden is (batch, seq, dim). The per-layer normalisation by the teacher's mean square
    makes layers with large activations (late blocks) weigh no more than early ones.
    """
    if len(student_hiddens) != len(teacher_hiddens):
        raise ValueError(f"{len(student_hiddens)} student hiddens but {len(teacher_hiddens)} teacher hiddens")
    if len(student_hiddens) == 0:
        raise ValueError("squarehead_loss needs at least one layer")
    total = student_hiddens[0].new_zeros((), dtype=torch.float32)
    weight = None
    if attention_mask is not None:
        weight = attention_mask.to(torch.float32).unsqueeze(-1)
    for hs, ht in zip(student_hiddens, teacher_hiddens):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden shapes differ: student {tuple(hs.shape)}, teacher {tuple(ht.shape)}")
        hs = hs.to(torch.float32)
        ht = ht.to(device=hs.device, dtype=torch.float32)
        diff2 = (hs - ht).square()
        ref2 = ht.square()
        if weight is not None:
            w = weight.to(hs.device)
            diff2 = diff2 * w
            ref2 = ref2 * w
        # The two means share their denominator (tokens × dim), so the ratio of sums is exact.
        total = total + diff2.sum() / ref2.sum().clamp_min(eps)
    return total


def shifted_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: position t predicts a supervised token labels[t+1]; the last position never does."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the tokens whose label is not -100."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float32)
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0  # keeps the graph; nothing supervised in this batch
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the temperature-softened next-token distributions, mean over tokens.

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, teacher "
            f"{tuple(teacher_logits.shape)}"
            " (vocabulary mismatch?)"
        )
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(s.device)
    if token_mask is not None:
        keep = token_mask.reshape(-1).to(s.device).bool()
        if not bool(keep.any()):
            return student_logits.sum().to(torch.float32) * 0.0
        s, t = s[keep], t[keep]
    log_ps = F.log_softmax(s.to(torch.float32) / temperature, dim=-1)
    log_pt = F.log_softmax(t.to(torch.float32) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2
