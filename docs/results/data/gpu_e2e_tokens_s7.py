"""Session 7 (docs/results/gpu_kernels.md, run 13): why the graph decode's tokens differ from
generate's (bitmask 70%, random llama-7b, fp16). Output: gpu_e2e_tokens_s7.log."""
import copy

import torch

from sparsecraft.cli.bench import _magnitude, parse_format
from sparsecraft.kernels.triton.dispatch import prepare_model
from sparsecraft.models import load
from sparsecraft.runtime import convert, static_greedy
from sparsecraft.runtime.measure import _generate

dense, _ = load("random:llama-7b", dtype=torch.float16, device="cuda")
_magnitude(dense, "0.7")
dense.eval()
spec = parse_format("bitmask")
kw = spec.convert_kwargs(2, 4, 128)
if spec.values == "fp32":
    kw["dtype"] = torch.float16
sp = convert(copy.deepcopy(dense), **kw).to("cuda", torch.float16)
prepare_model(sp, "cuda")
gen = torch.Generator().manual_seed(0)
prompt = torch.randint(0, dense.config.vocab_size - 1, (1, 64), generator=gen).cuda()
N = 128


def first(a, b):
    d = (a != b).nonzero()
    return int(d[0, -1]) if len(d) else -1


with torch.inference_mode():
    g1, g2 = (_generate(sp, prompt, N)[:, 64:] for _ in range(2))
    s1, s2 = (static_greedy(sp, prompt, N)[0] for _ in range(2))
    gd = _generate(dense, prompt, N)[:, 64:]
    sd = static_greedy(dense, prompt, N)[0]
    print("first differing new token (-1: none): generate/generate", first(g1, g2), "graph/graph", first(s1, s2),
          "graph/generate", first(s1, g1), "dense graph/generate", first(sd, gd), "sparse/dense generate",
          first(g1, gd), "sparse/dense graph", first(s1, sd))
    ids = torch.cat([prompt, s1], 1)
    ld, ls = dense(ids).logits[0, 63:-1].float(), sp(ids).logits[0, 63:-1].float()
    top = ld.topk(2, -1).values
    gap = top[:, 0] - top[:, 1]
    k = first(s1, g1)
    print(f"teacher-forced logits, sparse (decoded weights) vs dense: rel err {((ls - ld).norm() / ld.norm()).item():.2e}, "
          f"argmax equal at {(ls.argmax(-1) == ld.argmax(-1)).float().mean().item():.3f}; dense top-2 gap median "
          f"{gap.median().item():.3f}, smallest {gap.min().item():.4f}, at the first graph/generate mismatch "
          f"{gap[k].item() if k >= 0 else float('nan'):.4f}")
    # the batch-1 kernels (walk) in the sparse model: one cached decode step vs the dense model's
    steps = []
    for m in (sp, dense):
        o = m(ids[:, :64], use_cache=True)
        steps.append(m(ids[:, 64:65], past_key_values=o.past_key_values, use_cache=True).logits[0, -1].float())
    print(f"one cached decode step (batch-1 kernels) vs dense: rel err "
          f"{((steps[0] - steps[1]).norm() / steps[1].norm()).item():.2e}")
