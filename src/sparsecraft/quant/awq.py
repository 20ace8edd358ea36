"""Activation-aware weight scaling (AWQ; Lin et al., arXiv 2306.00978), before RTN or GPTQ.

Idea: a few input channels carry much larger activations than the rest, and the rounding error of
the weights that multiply them dominates the layer's output error. Scaling those weight columns up
by s (and the input down by the same s) gives them a finer grid *relative to their size*; the
function is unchanged before quantization because the 1/s is folded into whatever produces the
input:

* a normalisation (RMSNorm/LayerNorm) in front of q/k/v or gate/up: its weight (and bias) ÷ s;
* a linear whose output is the input, e.g. up_proj in front of down_proj (act(gate)·up is linear in
  up's output rows) or v_proj in front of o_proj: that linear's output rows (and bias) ÷ s.

Per group of layers that share one input, s = mean|x|^α (normalised), with α picked from a grid in
[0, 1) to minimise Σ_layers ‖X Wᵀ − X diag(1/s) Q(W diag(s))ᵀ‖², Q being the run's RTN quantizer
(without the clipping search, which the real quantizer runs afterwards: putting it inside the
search was measured in session 5 and did not help). With H = Σ x xᵀ that error is
tr(Δ H Δᵀ), Δ = W − Q(W diag(s)) diag(1/s), exact over all calibration tokens. α = 0 (s = 1,
plain RTN) is on the grid, so the search never does worse than no scaling on its own objective.
Column scaling by s > 0 keeps every zero a zero.

Which producer a group's input comes from is not read from names: on block 0, the tensor each
group receives is traced to the module that returned it (a norm candidate) or, failing that, the
earlier linears of the block whose output width matches (row-fold candidates). Each candidate is
*probed*: folded with random scales in [0.5, 2] and kept only if the model's logits do not move
(within float tolerance); the probe undoes itself. So a gated MLP's up_proj is found and its
gate_proj rejected (SiLU is not homogeneous), o_proj is skipped under grouped-query attention
(v_proj is narrower than o_proj's input; a fold with the scale tied across the query heads that read
one v_proj row was measured in session 5 and did not help: docs/results/formats_quant.md), and a
Gemma norm (weight applied as 1 + w) fails the probe
and is skipped with a warning: a fold is either function-preserving or not done.

The walk is the pruning engine's (:func:`sparsecraft.prune.engine.run_sequential`) with a
read-only solver: the statistics pass collects H and mean|x| per group, the search runs per group,
and the folds are written into the block once all its groups are searched. Folds preserve the
block's function, so the engine's kept outputs remain the next block's inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import SparsecraftError
from ..models.discovery import block_linears, decoder_blocks, prunable_linears, weight_matrix
from ..prune.engine import EngineOptions, SolveResult, run_sequential
from .rtn import QuantConfig, rtn_quantize

log = logging.getLogger(__name__)

# scales are kept in this range so that neither W·s nor the folded 1/s under/overflows
SCALE_MIN, SCALE_MAX = 1e-4, 1e4
PROBE_TOKENS = 32


# ---------------------------------------------------------------- pure tensor functions


def awq_scale(act_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^α, normalised so that max(s)·min(s) = 1 (the scale's overall size is arbitrary:
    only the ratio between channels matters to the grid)."""
    a = act_mean.float().clamp_min(1e-8) ** alpha
    s = a / torch.sqrt(a.max() * a.min())
    return s.clamp(SCALE_MIN, SCALE_MAX)


def scale_columns(w: Tensor, s: Tensor) -> Tensor:
    """W diag(s): input column j multiplied by s_j. Zeros stay zeros (checked)."""
    out = w * s.to(w).unsqueeze(0)
    if not torch.equal(out == 0, w == 0):
        raise SparsecraftError("AWQ: scaling the weight columns created or removed a zero (bug)")
    return out


def scale_rows(w: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """diag(1/s) W and bias/s: output row j divided by s_j (the producer side of a row fold)."""
    inv = 1.0 / s.to(w)
    return w * inv.unsqueeze(1), None if bias is None else bias * inv.to(bias)


def fold_norm(weight: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """A norm's elementwise weight (and bias) divided by s: its output becomes x / s."""
    return weight / s.to(weight), None if bias is None else bias / s.to(bias)


def output_error(w: Tensor, wq: Tensor, hessian: Tensor) -> Tensor:
    """‖X Wᵀ − X Wqᵀ‖² over the tokens X whose Σ x xᵀ is ``hessian``: tr(Δ H Δᵀ)."""
    d = (w - wq).float()
    return ((d @ hessian) * d).sum()


def scaled_quant_error(
    weights: list[Tensor], hessian: Tensor, s: Tensor, quantize: Callable[[Tensor], Tensor]
) -> float:
    """Σ_layers ‖X Wᵀ − X diag(1/s) Q(W diag(s))ᵀ‖²: the output error of the scaled quantized layers,
    their input divided by s."""
    total = 0.0
    for w in weights:
        wq = quantize(scale_columns(w, s)).to(w) / s.to(w).unsqueeze(0)
        total += float(output_error(w, wq, hessian))
    return total


@dataclass
class ScaleSearch:
    """The chosen scale of one group and the search's figures."""

    scale: Tensor
    alpha: float
    error: float  # at the chosen α
    error_unscaled: float  # at α = 0 (plain RTN)


def search_scale(
    weights: list[Tensor],
    hessian: Tensor,
    act_mean: Tensor,
    quantize: Callable[[Tensor], Tensor],
    grid: int = 20,
) -> ScaleSearch:
    """α on {0, 1/grid, ..., (grid−1)/grid} minimising :func:`scaled_quant_error` (first minimum
    wins on ties, so α = 0 unless scaling strictly helps)."""
    best: ScaleSearch | None = None
    base = None
    for k in range(grid):
        alpha = k / grid
        s = awq_scale(act_mean, alpha)
        err = scaled_quant_error(weights, hessian, s, quantize)
        base = err if base is None else base
        if best is None or err < best.error:
            best = ScaleSearch(s, alpha, err, base)
    assert best is not None
    best.error_unscaled = base
    return best


def rtn_quantizer(config: QuantConfig, where: str) -> Callable[[Tensor], Tensor]:
    """Q of the search: RTN with the run's bits / group size / symmetry, mask = the weight's zeros."""

    def quantize(w: Tensor) -> Tensor:
        qw = rtn_quantize(w, None, config.bits, config.group_size, config.symmetric, where)
        return qw.dequantize()

    return quantize


# ---------------------------------------------------------------- folds on a block


@dataclass(frozen=True)
class Fold:
    """Where a group's input scale goes: ``kind`` "norm" (``source`` is a norm module) or "rows"
    (``source`` is a linear whose output rows are the input); names are block-relative."""

    consumers: tuple[str, ...]
    kind: str
    source: str


def apply_fold(block: nn.Module, fold: Fold, s: Tensor) -> None:
    """Fold ``s`` into ``block`` in place: consumers' columns × s, the source ÷ s."""
    linears = block_linears(block)
    for name in fold.consumers:
        w = weight_matrix(linears[name])
        w.copy_(scale_columns(w.float(), s).to(w))
    src = block.get_submodule(fold.source)
    bias = getattr(src, "bias", None)
    if fold.kind == "norm":
        new_w, new_b = fold_norm(src.weight.data.float(), None if bias is None else bias.data.float(), s)
        src.weight.data.copy_(new_w)
    else:
        w = weight_matrix(src)
        new_w, new_b = scale_rows(w.float(), None if bias is None else bias.data.float(), s)
        w.copy_(new_w)
    if bias is not None:
        bias.data.copy_(new_b)


def _touched(block: nn.Module, fold: Fold) -> list[Tensor]:
    mods = [block.get_submodule(n) for n in (*fold.consumers, fold.source)]
    params = [getattr(m, attr, None) for m in mods for attr in ("weight", "bias")]
    return [p.data for p in params if p is not None]


def _trace_block0(model: nn.Module, ids: Tensor) -> tuple[list[tuple[tuple[str, ...], str | None]], dict]:
    """Groups of block 0's linears that receive the same input tensor, in execution order, each
    with the name of the submodule that returned that tensor (None: computed outside a module)."""
    _, blocks = decoder_blocks(model)
    block = blocks[0]
    linears = block_linears(block)
    produced: dict[int, tuple[Tensor, str]] = {}  # keeps the tensors alive, so ids stay unique
    calls: list[tuple[str, Tensor]] = []
    handles = []
    for name, mod in block.named_modules():
        if name and name not in linears:
            def out_hook(m, a, out, name=name):
                if isinstance(out, Tensor):
                    produced.setdefault(id(out), (out, name))  # the first producer is the real one
            handles.append(mod.register_forward_hook(out_hook))
    for name, mod in linears.items():
        def in_hook(m, args, name=name):
            calls.append((name, args[0]))
        handles.append(mod.register_forward_pre_hook(in_hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[list[str], Tensor]] = []
    for name, x in calls:
        for g in groups:
            if g[1] is x:
                g[0].append(name)
                break
        else:
            groups.append(([name], x))
    out = [(tuple(names), produced.get(id(x), (None, None))[1]) for names, x in groups]
    return out, linears


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _preserves_function(model: nn.Module, block: nn.Module, fold: Fold, ids: Tensor, ref: Tensor,
                        in_features: int) -> bool:
    """Probe: fold random scales in [0.5, 2] into block 0, compare the logits, undo."""
    saved = [t.clone() for t in _touched(block, fold)]
    gen = torch.Generator().manual_seed(in_features)
    s = 2.0 ** (torch.rand(in_features, generator=gen) * 2 - 1)
    try:
        apply_fold(block, fold, s)
        out = _logits(model, ids)
    finally:
        for t, v in zip(_touched(block, fold), saved):
            t.copy_(v)
    # float32 rounding moves the logits by ~1e-6 relative; a wrong fold with scales in [0.5, 2] by O(1)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return bool(((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)) < tol)


def plan_folds(model: nn.Module, ids: Tensor) -> tuple[list[Fold], list[str]]:
    """Function-preserving folds for block 0's input groups (block-relative names, applied to every
    block) and a list of groups left unscaled (with the reason)."""
    trace, linears = _trace_block0(model, ids)
    _, blocks = decoder_blocks(model)
    block = blocks[0]
    ref = _logits(model, ids)
    folds, skipped = [], []
    executed: list[str] = []
    for consumers, producer in trace:
        in_f = weight_matrix(linears[consumers[0]]).shape[1]
        candidates = []
        if producer is not None:
            w = getattr(block.get_submodule(producer), "weight", None)
            if isinstance(w, Tensor) and w.dim() == 1 and w.numel() == in_f:
                candidates.append(Fold(consumers, "norm", producer))
        # earlier linears whose output width matches, the most recent first
        candidates += [
            Fold(consumers, "rows", n)
            for n in reversed(executed)
            if weight_matrix(linears[n]).shape[0] == in_f
        ]
        found = next((f for f in candidates if _preserves_function(model, block, f, ids, ref, in_f)), None)
        if found is None:
            why = (
                f"no function-preserving fold among {[f.source for f in candidates]}"
                if candidates
                else "its input comes from no module and no earlier linear has its width "
                "(e.g. o_proj under grouped-query attention)"
            )
            skipped.append(f"{'/'.join(consumers)}: {why}")
        else:
            folds.append(found)
        executed += consumers
    return folds, skipped


# ---------------------------------------------------------------- the walk


class _ScaleSearcher:
    """Read-only engine solver: searches each group's scale, folds them at the end of the block."""

    needs_hessian = True
    needs_absmean = True
    modifies_weights = False  # folds preserve the block's function: its outputs are reused

    def __init__(self, blocks: nn.ModuleList, blocks_name: str, folds: list[Fold], selected: set[str],
                 config: QuantConfig, grid: int):
        self.blocks, self.blocks_name, self.config, self.grid = blocks, blocks_name, config, grid
        self.folds = {f.consumers: f for f in folds}
        self.selected = selected
        self.pending: list[tuple[Fold, Tensor]] = []
        self.records: list[dict] = []

    def _rel(self, name: str) -> str:
        """Block-relative name: "model.layers.3.mlp.up_proj" -> "mlp.up_proj"."""
        return name[len(self.blocks_name) + 1:].split(".", 1)[1]

    def solve(self, name, layer, weight, stats) -> SolveResult:
        return self.solve_group([name], [layer], [weight], stats)[0]

    def solve_group(self, names, layers, weights, stats) -> list[SolveResult]:
        unchanged = [SolveResult(weight=w) for w in weights]
        fold = self.folds.get(tuple(self._rel(n) for n in names))
        searched = [w for n, w in zip(names, weights) if n in self.selected]
        if fold is None or not searched:
            return unchanged
        found = search_scale(searched, stats.hessian, stats.absmean, rtn_quantizer(self.config, names[0]),
                             self.grid)
        self.pending.append((fold, found.scale.cpu()))
        self.records.append({"layers": "/".join(names), "alpha": found.alpha,
                             "error_ratio": found.error / max(found.error_unscaled, 1e-30)})
        return unchanged

    def end_block(self, index: int) -> None:
        for fold, s in self.pending:
            apply_fold(self.blocks[index], fold, s)
        self.pending.clear()


@torch.no_grad()
def awq_scale_model(
    model: nn.Module, calibration: Tensor, config: QuantConfig, options: EngineOptions | None = None
) -> dict:
    """Search and fold AWQ scales into ``model`` in place (its function is unchanged up to float
    rounding); the layers ``config.targets``/``ignore`` select are the ones searched for. Returns a
    report: the folds, the groups skipped and why, the α chosen per group."""
    t0 = time.perf_counter()
    blocks_name, blocks = decoder_blocks(model)
    model.eval()
    ids = calibration[:1, :PROBE_TOKENS].to(next(model.parameters()).device)
    folds, skipped = plan_folds(model, ids)
    for why in skipped:
        log.warning("AWQ: left unscaled: %s", why)
    selected = set(prunable_linears(model, config.targets, config.ignore))
    searcher = _ScaleSearcher(blocks, blocks_name, folds, selected, config, config.awq_grid)
    # every linear of a group must be scaled with its input, quantized or not: walk them all; the
    # engine's checkpoints hold linear weights only (not the folded norms), so none for this walk
    opts = dataclasses.replace(
        options or EngineOptions(), targets=None, ignore=None, checkpoint_dir=None, resume=False
    )
    run_sequential(model, calibration, searcher, opts)
    records = searcher.records
    return {
        "grid": config.awq_grid,
        "folds": [f"{'/'.join(f.consumers)} <- {f.kind} {f.source}" for f in folds],
        "skipped": skipped,
        "groups_scaled": len(records),
        # mean over the scaled groups; error_ratio = search error at the chosen α / at α = 0
        "mean_alpha": sum(r["alpha"] for r in records) / len(records) if records else None,
        "mean_error_ratio": sum(r["error_ratio"] for r in records) / len(records) if records else None,
        "groups": records,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


__all__ = [
    "Fold",
    "ScaleSearch",
    "apply_fold",
    "awq_scale",
    "awq_scale_model",
    "fold_norm",
    "output_error",
    "plan_folds",
    "scale_columns",
    "scale_rows",
    "scaled_quant_error",
    "search_scale",
]
