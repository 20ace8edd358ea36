"""Typed, validated configuration of a sparse fine-tuning run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import SparsecraftError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
TEACHER_CACHES = ("none", "memory", "disk")
DISTILL_MASKS = ("loss", "attention")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three loss terms: a_ce·CE + a_kd·T²·KL + a_sh·SquareHead."""

    ce: float = 1.0
    kd: float = 1.0
    squarehead: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ce", "kd", "squarehead"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SparsecraftError(f"loss weight {name}={value!r}: must be a finite number >= 0")
        if self.ce == 0 and self.kd == 0 and self.squarehead == 0:
            raise SparsecraftError("loss weights: all three are 0; give at least one of ce, kd, "
                "squarehead > 0")

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.squarehead > 0

    @classmethod
    def parse(cls, text: str) -> LossWeights:
        """Parse ``"ce=1,kd=0.5,squarehead=1"`` (missing terms are 0) or ``"squarehead,ce"`` (weight 1)."""
        aliases = {"ce": "ce", "kd": "kd", "squarehead": "squarehead", "sh": "squarehead"}
        values = {"ce": 0.0, "kd": 0.0, "squarehead": 0.0}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, raw = part.partition("=")
            name = aliases.get(key.strip().lower())
            if name is None:
                raise SparsecraftError(
                    f"loss weights {text!r}: unknown term {key!r}; use ce, kd, squarehead (e.g. "
                    "ce=1,squarehead=1)"
                )
            try:
                values[name] = float(raw) if raw else 1.0
            except ValueError:
                raise SparsecraftError(f"loss weights {text!r}: {raw!r} is not a number") from None
        return cls(**values)


@dataclass
class FinetuneConfig:
    """Everything that decides what a fine-tuning run computes.

    ``batch_size`` is windows per micro-batch per process; one optimizer step sees
    ``batch_size * grad_accum * world_size`` windows (the global batch).
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    loss_weights: LossWeights = field(default_factory=LossWeights)
    kd_temperature: float = 1.0
    distill_mask: str = "loss"  # KD/SquareHead on the tokens CE is computed on, or on all real tokens
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, fp32 otherwise
    gradient_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_batch_size: int = 4
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    teacher_cache: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, str):
            self.loss_weights = LossWeights.parse(self.loss_weights)
        elif isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                bound = ">= 0" if allow_zero else ">= 1"
                raise SparsecraftError(f"finetune config {name}={v!r}: must be an integer {bound}")

        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints"):
            positive_int(name)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            positive_int(name, allow_zero=True)
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise SparsecraftError(f"finetune config lr={self.lr!r}: the learning rate must be > 0 "
                "(e.g. 1e-4)")
        if self.warmup_steps > self.steps:
            raise SparsecraftError(
                f"finetune config warmup_steps={self.warmup_steps}: longer than steps={self.steps}"
            )
        if self.schedule not in SCHEDULES:
            raise SparsecraftError(f"finetune config schedule={self.schedule!r}: use one of "
                f"{', '.join(SCHEDULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SparsecraftError(f"finetune config min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.weight_decay < 0:
            raise SparsecraftError(f"finetune config weight_decay={self.weight_decay}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SparsecraftError(f"finetune config betas={self.betas}: two numbers in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise SparsecraftError(f"finetune config max_grad_norm={self.max_grad_norm}: must be >= "
                "0 or None")
        if self.kd_temperature <= 0:
            raise SparsecraftError(f"finetune config kd_temperature={self.kd_temperature}: must be > 0")
        if self.distill_mask not in DISTILL_MASKS:
            raise SparsecraftError(
                f"finetune config distill_mask={self.distill_mask!r}: use one of {', '.join(DISTILL_MASKS)}"
            )
        if self.precision not in PRECISIONS:
            raise SparsecraftError(f"finetune config precision={self.precision!r}: use one of "
                f"{', '.join(PRECISIONS)}")
        if self.teacher_cache not in TEACHER_CACHES:
            raise SparsecraftError(
                f"finetune config teacher_cache={self.teacher_cache!r}: use one of "
                f"{', '.join(TEACHER_CACHES)}"
            )

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based): warmup, then the decay."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d
