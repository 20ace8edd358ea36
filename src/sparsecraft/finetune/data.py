"""Training windows for fine-tuning: packed text and GSM8K instruction examples.

A :class:`TrainWindows` holds equal-length rows of ``input_ids``, ``labels`` (-100 where no loss
is taken: padding, prompts) and ``attention_mask``. Which rows a step reads is a pure function of
(seed, step, micro-batch, rank), so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import BUNDLED, eval_windows, load_text, tokenize
from ..errors import SparsecraftError
from .losses import IGNORE_INDEX

GSM8K_TRAIN = BUNDLED / "gsm8k" / "train.jsonl"


@dataclass
class TrainWindows:
    input_ids: torch.Tensor  # (n, L) long
    labels: torch.Tensor  # (n, L) long, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor  # (n, L) long, 0 on padding

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise SparsecraftError(f"training windows must be (n, seqlen), got {tuple(self.input_ids.shape)}")
        if self.labels.shape != self.input_ids.shape or self.attention_mask.shape != self.input_ids.shape:
            raise SparsecraftError("training windows: input_ids, labels and attention_mask differ in shape")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> TrainWindows:
        """Plain language-model windows: every token is real and supervised."""
        ids = ids.to(torch.long)
        return cls(ids, ids.clone(), torch.ones_like(ids))


def pack_tokens(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping (n, seqlen) windows, dropping the tail."""
    if seqlen < 2:
        raise SparsecraftError(f"seqlen {seqlen}: must be at least 2")
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def text_windows(tokenizer, source: str, seqlen: int, max_windows: int | None = None) -> TrainWindows:
    """Packed windows from a text source of ``sparsecraft.data`` (c4 = documents 0–899, or a path).

    ``sparsecraft.data`` refuses the WikiText-2/PTB test splits for training.
    """
    ids = tokenize(tokenizer, load_text(source, "training"))
    windows = pack_tokens(ids, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    if len(windows) == 0:
        raise SparsecraftError(
            f"{source}: {ids.numel()} tokens give no training window of {seqlen}; lower --seqlen or "
            "give more text"
        )
    return TrainWindows.from_ids(windows)


def validation_windows(tokenizer, seqlen: int, max_windows: int = 8) -> torch.Tensor:
    """Held-out windows for periodic evaluation: C4 documents 900–999 (never a test split)."""
    return eval_windows(tokenizer, "c4val", seqlen, max_windows)


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def instruction_example(tokenizer, prompt: str, answer: str, seqlen: int) -> tuple[list[int], int] | None:
    """Token ids of prompt + answer (+ EOS) and the prompt length, or None if it does not fit."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    if len(ids) > seqlen:
        return None
    return ids, len(prompt_ids)


def instruction_windows(examples: list[tuple[list[int], int]], seqlen: int, pad_id: int) -> TrainWindows:
    """Right-padded rows; labels only on the answer tokens (the prompt and padding get -100)."""
    if not examples:
        raise SparsecraftError("instruction data: no example fits; raise --seqlen")
    n = len(examples)
    input_ids = torch.full((n, seqlen), pad_id, dtype=torch.long)
    labels = torch.full((n, seqlen), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, seqlen), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        labels[i, prompt_len : len(ids)] = t[prompt_len:]
        attention[i, : len(ids)] = 1
    return TrainWindows(input_ids, labels, attention)


def gsm8k_windows(tokenizer, seqlen: int, max_examples: int | None = None,
                  path: str | Path = GSM8K_TRAIN) -> TrainWindows:
    """GSM8K train as question → worked answer, loss on the answer only (never the test file)."""
    path = Path(path)
    if path.name == "test.jsonl" or not path.is_file():
        raise SparsecraftError(f"{path}: use the GSM8K train file; the test split is for evaluation only")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SparsecraftError("tokenizer has neither a pad nor an EOS token; cannot pad GSM8K examples")
    examples, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            ex = instruction_example(tokenizer, gsm8k_prompt(record["question"]), record["answer"], seqlen)
            if ex is None:
                skipped += 1
                continue
            examples.append(ex)
            if max_examples is not None and len(examples) >= max_examples:
                break
    return instruction_windows(examples, seqlen, pad_id)


def training_data(tokenizer, source: str, seqlen: int, max_windows: int | None = None) -> TrainWindows:
    """``c4`` | ``gsm8k`` | a .txt/.jsonl path | a .jsonl with question/answer fields."""
    if source == "gsm8k":
        return gsm8k_windows(tokenizer, seqlen, max_windows)
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8") as f:
            first = next((json.loads(line) for line in f if line.strip()), None)
        if first is None:
            raise SparsecraftError(f"{source}: the file is empty; give at least one training example")
        if "question" in first and "answer" in first:
            return gsm8k_windows(tokenizer, seqlen, max_windows, path)
    return text_windows(tokenizer, source, seqlen, max_windows)


def step_indices(n: int, step: int, micro: int, rank: int, *, batch_size: int, grad_accum: int,
                 world_size: int, seed: int) -> torch.Tensor:
    """Row indices for one micro-batch of one rank: epochs of seeded permutations, read in order.

    The global batch of ``step`` is the slice [step·G, (step+1)·G) of that stream with
    G = batch_size·grad_accum·world_size, so one process with ``grad_accum·world_size`` micro-batches
    sees the same rows as ``world_size`` processes.
    """
    if n <= 0:
        raise SparsecraftError("training data is empty: no windows to train on")
    start = ((step * grad_accum + micro) * world_size + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out
