"""The frozen dense teacher: block outputs and logits, on its own device and dtype, optionally cached."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SparsecraftError
from ..models.discovery import decoder_blocks


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Teacher and student must share architecture, depth, width and vocabulary."""
    s_cfg, t_cfg = student.config, teacher.config
    s_type, t_type = getattr(s_cfg, "model_type", None), getattr(t_cfg, "model_type", None)
    if s_type != t_type:
        raise SparsecraftError(
            f"teacher is a {t_type} model but the student is {s_type}: use the dense model the "
            "student was pruned from"
        )
    if _vocab_size(student) != _vocab_size(teacher):
        raise SparsecraftError(
            f"teacher vocabulary {_vocab_size(teacher)} != student vocabulary {_vocab_size(student)}: "
            "KD needs the same tokenizer; use the dense model the student was pruned from"
        )
    s_blocks, t_blocks = len(decoder_blocks(student)[1]), len(decoder_blocks(teacher)[1])
    if s_blocks != t_blocks:
        raise SparsecraftError(
            f"teacher has {t_blocks} decoder blocks, the student {s_blocks}: SquareHead pairs "
            "blocks one to one"
        )
    s_width = student.get_input_embeddings().weight.shape[1]
    t_width = teacher.get_input_embeddings().weight.shape[1]
    if s_width != t_width:
        raise SparsecraftError(f"teacher hidden size {t_width} != student hidden size {s_width}")


class BlockRecorder:
    """Records each decoder block's output hidden state while ``recording()`` is active.

    The flag matters under gradient checkpointing: blocks re-run during backward, and those
    re-runs must not be recorded again.
    """

    def __init__(self, model: nn.Module):
        self.hiddens: list[torch.Tensor] = []
        self._active = False
        _, blocks = decoder_blocks(model)
        self._handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output) -> None:
        if self._active:
            self.hiddens.append(output[0] if isinstance(output, (tuple, list)) else output)

    @contextlib.contextmanager
    def recording(self):
        self.hiddens = []
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def take(self) -> list[torch.Tensor]:
        hiddens, self.hiddens = self.hiddens, []
        return hiddens

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Teacher:
    """Runs the frozen teacher and hands out (logits, block hiddens) for rows of the training data.

    ``cache``: ``none`` recomputes; ``memory`` keeps outputs per training row; ``disk`` writes them
    per row to ``cache_dir`` (safetensors) so a later run, or this one after ``release()``, needs no
    teacher in memory.
    """

    def __init__(self, model: nn.Module | None, *, device: torch.device | str | None = None,
                 need_logits: bool = True, need_hiddens: bool = True, cache: str = "none",
                 cache_dir: str | Path | None = None):
        self.model = model
        self.need_logits = need_logits
        self.need_hiddens = need_hiddens
        self.cache = cache
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._own_dir = None
        if cache == "disk":
            if cache_dir is None:
                self._own_dir = tempfile.mkdtemp(prefix="sparsecraft-teacher-")
                cache_dir = self._own_dir
            self.cache_dir = Path(cache_dir)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.recorder = None
        if model is not None:
            model.eval()
            model.requires_grad_(False)
            if device is not None:
                model.to(device)
            if getattr(model.config, "use_cache", None):
                model.config.use_cache = False
            self.recorder = BlockRecorder(model) if need_hiddens else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise SparsecraftError("teacher outputs are not cached for these rows and the teacher "
                "was released")
        dev = self.device
        ctx = self.recorder.recording() if self.recorder else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                             use_cache=False)
        result = {}
        if self.need_logits:
            result["logits"] = out.logits
        if self.recorder:
            for i, h in enumerate(self.recorder.take()):
                result[f"h{i}"] = h
        return result

    def _path(self, row: int) -> Path:
        return self.cache_dir / f"row-{row:08d}.safetensors"

    def _lookup(self, row: int) -> dict[str, torch.Tensor] | None:
        if self.cache == "memory":
            return self._memory.get(row)
        if self.cache == "disk" and self._path(row).exists():
            return load_file(self._path(row))
        return None

    def _store(self, row: int, out: dict[str, torch.Tensor]) -> None:
        if self.cache == "memory":
            self._memory[row] = {k: v.clone() for k, v in out.items()}
        elif self.cache == "disk":
            tmp = self._path(row).with_suffix(".tmp")
            save_file({k: v.contiguous().cpu() for k, v in out.items()}, str(tmp))
            tmp.replace(self._path(row))

    def outputs(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Teacher logits (B, L, V) and block hiddens [(B, L, D)] for training rows ``rows``."""
        if self.cache == "none":
            per_batch = self._compute(input_ids, attention_mask)
        else:
            parts = []
            missing = [i for i, r in enumerate(rows.tolist()) if self._lookup(r) is None]
            if missing:
                fresh = self._compute(input_ids[missing], attention_mask[missing])
                for j, i in enumerate(missing):
                    self._store(int(rows[i]), {k: v[j] for k, v in fresh.items()})
            for r in rows.tolist():
                parts.append(self._lookup(r))
            per_batch = {k: torch.stack([p[k].to(device) for p in parts]) for k in parts[0]}
        logits = per_batch["logits"].to(device) if self.need_logits else None
        hiddens = []
        i = 0
        while f"h{i}" in per_batch:
            hiddens.append(per_batch[f"h{i}"].to(device))
            i += 1
        return logits, hiddens

    def precompute(self, data, rows: list[int], batch_size: int = 4) -> None:
        """Fill the cache for ``rows`` now, so the teacher can be released before training."""
        if self.cache == "none":
            raise SparsecraftError("precompute needs teacher_cache memory or disk")
        todo = [r for r in rows if self._lookup(r) is None]
        for start in range(0, len(todo), batch_size):
            idx = torch.tensor(todo[start : start + batch_size])
            batch = data.rows(idx)
            self.outputs(idx, batch["input_ids"], batch["attention_mask"], torch.device("cpu"))

    def release(self) -> None:
        """Drop the teacher model (cached outputs stay usable)."""
        if self.recorder:
            self.recorder.remove()
        self.model = None
        self.recorder = None

    def close(self) -> None:
        self.release()
        self._memory.clear()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)
