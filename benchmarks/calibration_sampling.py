"""SparseGPT/Wanda on SmolLM2 with three ways to cut the C4 calibration windows (docs/results/oneshot.md,
session 3): ``concat`` (the default: random offsets in the space-joined documents), ``docs`` (the
papers' protocol: a random document longer than the window, a random window inside it) and ``eos``
(documents joined with the end-of-text token). Prints the WikiText-2 perplexity (40 x 512).

    .venv/bin/python benchmarks/calibration_sampling.py sparsegpt 0.5 docs
"""
import sys, time, torch
from sparsecraft.models import load
from sparsecraft.data.sources import _documents, tokenize
from sparsecraft.eval import perplexity
from sparsecraft.prune import PruneConfig, prune
torch.set_num_threads(2)
method, sparsity, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model, tok = load("smollm2-135m")
seqlen, n = 512, 128
gen = torch.Generator().manual_seed(0)
if mode == "docs":  # reference style: a random long-enough document per window, random start inside
    docs = [tokenize(tok, d) for d in _documents("c4")]
    long = [d for d in docs if d.numel() > seqlen]
    wins = []
    for _ in range(n):
        d = long[int(torch.randint(len(long), (1,), generator=gen))]
        s = int(torch.randint(d.numel() - seqlen, (1,), generator=gen))
        wins.append(d[s:s + seqlen])
    calib = torch.stack(wins)
elif mode == "eos":  # documents joined with the end-of-text token, random offsets
    docs = [tokenize(tok, d) for d in _documents("c4")]
    eos = torch.tensor([tok.eos_token_id if tok.eos_token_id is not None else 0])
    ids = torch.cat([t for d in docs for t in (d, eos)])
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    calib = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
else:
    calib = None
cfg = PruneConfig(method=method, sparsity=sparsity, nsamples=n, seqlen=seqlen, calib_dtype="bfloat16")
t = time.time()
prune(model, tok, cfg, calibration=calib, progress=False)
pt = time.time() - t
ppl = perplexity(model, tok, "wikitext2", 512, 40, progress=False)
print(f"RESULT {method} {sparsity} {mode} ppl {ppl:.3f} prune_s {pt:.1f}", flush=True)
