"""Text sources and the token windows cut from them.

Named sources are bundled with the package (see ``bundled/ATTRIBUTION.md``):

- ``wikitext2``, ``ptb``: test splits, evaluation only;
- ``c4``: C4 train documents 0–899, for calibration and training;
- ``c4val``: C4 train documents 900–999, held out for validation/evaluation;
- any ``.txt`` file (whole text) or ``.jsonl`` file (a ``text`` field per line) given by path.

Purposes keep the splits apart: ``calibration`` and ``training`` refuse evaluation-only sources.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import SparsecraftError

BUNDLED = Path(__file__).with_name("bundled")
C4_FILE = BUNDLED / "c4" / "c4_train_00000_first1000.jsonl"
C4_TRAIN_DOCS = 900  # documents [0, 900) calibrate and train; [900, 1000) validate

EVAL_ONLY = {"wikitext2", "ptb"}
NAMED = {"wikitext2", "ptb", "c4", "c4val"}
PURPOSES = {"calibration", "training", "evaluation"}


def _read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SparsecraftError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if field not in record:
                raise SparsecraftError(f"{path}:{lineno}: no {field!r} field (JSON lines need a text field)")
            texts.append(record[field])
    return texts


@lru_cache(maxsize=8)
def _documents(source: str) -> tuple[str, ...]:
    if source == "wikitext2":
        # The HF test rows: each line keeps its newline; blank lines become "".
        lines = open(BUNDLED / "wikitext2" / "wiki.test.raw", encoding="utf-8", newline="").readlines()
        return tuple(line if line.strip() else "" for line in lines)
    if source == "ptb":
        return tuple(line.strip() for line in open(BUNDLED / "ptb" / "ptb.test.txt", encoding="utf-8"))
    if source in ("c4", "c4val"):
        docs = _read_jsonl_texts(C4_FILE)
        return tuple(docs[:C4_TRAIN_DOCS] if source == "c4" else docs[C4_TRAIN_DOCS:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise SparsecraftError(
            f"{source}: no such text file; use one of {', '.join(sorted(NAMED))} or a .txt/.jsonl path"
        )
    if path.suffix == ".jsonl":
        return tuple(_read_jsonl_texts(path))
    if path.suffix == ".txt":
        return (path.read_text(encoding="utf-8"),)
    raise SparsecraftError(
        f"{source}: unsupported file type; give a .txt file or a .jsonl file with a text field"
    )


def load_text(source: str, purpose: str) -> str:
    """The source's text joined the way the SparseGPT/Wanda protocol joins it."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}")
    if source in EVAL_ONLY and purpose != "evaluation":
        raise SparsecraftError(
            f"{source}: is a test split and is used for evaluation only; calibrate or train on c4 "
            "or your own .txt/.jsonl file"
        )
    docs = _documents(source)
    # WikiText rows are joined with blank lines; PTB sentences and C4 documents with a space.
    text = "\n\n".join(docs) if source == "wikitext2" else " ".join(docs)
    if not text.strip():
        raise SparsecraftError(f"{source}: contains no text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, shape (n,), tokenized once as the protocol does."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids.to(torch.long)


@lru_cache(maxsize=16)
def _token_stream(tokenizer, source: str, purpose: str) -> torch.Tensor:
    return tokenize(tokenizer, load_text(source, purpose))


def eval_windows(tokenizer, source: str = "wikitext2", seqlen: int = 512,
                 max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) of the tokenized text, tail dropped (paper protocol)."""
    if seqlen < 2:
        raise SparsecraftError(f"seqlen {seqlen}: must be at least 2")
    ids = _token_stream(tokenizer, source, "evaluation")
    n = ids.numel() // seqlen
    if n == 0:
        raise SparsecraftError(
            f"{source}: {ids.numel()} tokens is shorter than one window of {seqlen}; use a smaller --seqlen"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen).clone()


def calibration_windows(tokenizer, source: str = "c4", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, purpose: str = "calibration") -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets in the tokenized text.

    C4 documents are mostly shorter than a window, so windows are cut from the documents
    concatenated in order (the papers pick one long document per window, which this slice
    has too few of).
    """
    if nsamples < 1 or seqlen < 2:
        raise SparsecraftError(f"nsamples={nsamples}, seqlen={seqlen}: need nsamples >= 1 and seqlen >= 2")
    ids = _token_stream(tokenizer, source, purpose)
    if ids.numel() < nsamples * seqlen:
        raise SparsecraftError(
            f"{source}: {ids.numel()} tokens is shorter than nsamples × seqlen = {nsamples} × {seqlen}; "
            "lower --nsamples or --seqlen, or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
