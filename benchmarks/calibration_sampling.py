"""SparseGPT/Wanda on SmolLM2 with three ways to cut the C4 calibration windows (docs/results/oneshot.md,
session 3): ``concat`` (the default, ``sparsecraft.data.calibration_windows``: random offsets in the
space-joined documents), ``docs`` (the papers' protocol: a random document longer than the window,
a random window inside it) and ``eos`` (documents joined with the end-of-text token, random
offsets). Prints the WikiText-2 perplexity (40 x 512).

    .venv/bin/python benchmarks/calibration_sampling.py sparsegpt 0.5 docs
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsecraft.data.sources import _documents, tokenize
from sparsecraft.eval import perplexity
from sparsecraft.models import load
from sparsecraft.prune import PruneConfig, prune

SEQLEN, NSAMPLES = 512, 128


def document_windows(docs: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """One window per draw, inside a random document longer than the window."""
    long = [d for d in docs if d.numel() > SEQLEN]
    windows = []
    for _ in range(NSAMPLES):
        d = long[int(torch.randint(len(long), (1,), generator=gen))]
        s = int(torch.randint(d.numel() - SEQLEN, (1,), generator=gen))
        windows.append(d[s : s + SEQLEN])
    return torch.stack(windows)


def eos_windows(docs: list[torch.Tensor], eos_id: int, gen: torch.Generator) -> torch.Tensor:
    """Windows at random offsets in the documents joined with the end-of-text token."""
    eos = torch.tensor([eos_id])
    ids = torch.cat([t for d in docs for t in (d, eos)])
    starts = torch.randint(0, ids.numel() - SEQLEN + 1, (NSAMPLES,), generator=gen)
    return torch.stack([ids[s : s + SEQLEN] for s in starts.tolist()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", choices=["sparsegpt", "wanda"])
    ap.add_argument("sparsity", type=float)
    ap.add_argument("mode", choices=["concat", "docs", "eos"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    calib = None  # concat: the engine's default windows
    if args.mode != "concat":
        docs = [tokenize(tok, d) for d in _documents("c4")]
        if args.mode == "docs":
            calib = document_windows(docs, gen)
        else:
            calib = eos_windows(docs, tok.eos_token_id if tok.eos_token_id is not None else 0, gen)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity, nsamples=NSAMPLES, seqlen=SEQLEN,
                      calib_dtype="bfloat16")
    t = time.time()
    prune(model, tok, cfg, calibration=calib, progress=False)
    prune_s = time.time() - t
    ppl = perplexity(model, tok, "wikitext2", SEQLEN, 40, progress=False)
    print(f"RESULT {args.method} {args.sparsity} {args.mode} ppl {ppl:.3f} prune_s {prune_s:.1f}", flush=True)


if __name__ == "__main__":
    main()
