"""The sequential engine: walk a causal LM block by block and let a per-layer solver rewrite
every linear layer from statistics of its real inputs.

Walk
----
1. *Capture*: the calibration windows run through the model up to the decoder blocks only
   (every block is swapped for a recorder that keeps the block's arguments and returns its input
   unchanged), giving the inputs of block 0 and, for every block, the extra arguments the model
   passes it (rotary embeddings, attention masks, ...).
2. For each block, one at a time on the compute device: a *statistics pass* runs the block on
   all windows with pre-hooks on its linear layers that accumulate :class:`LayerStats`; the
   solver rewrites each layer; an *output pass* re-runs the rewritten block so that the next
   block sees the outputs of the already-solved model. With ``true_sequential`` the layers are
   solved group by group in execution order (q/k/v, then o, then gate/up, then down), each group
   seeing the inputs produced by the already-solved groups before it.
3. Block inputs live on the CPU between passes (optionally in fp16), or on the device when two
   copies fit (``inputs_on``); the model's master weights stay where they are (normally the
   CPU), and the block is copied to the device (in the forward dtype) for its passes. A solver
   that changes weights makes the statistics pass stop at the last linear's input.
4. After each block a checkpoint (the block's new weights, the next block's inputs, the report
   so far) makes ``resume=True`` finish with exactly the weights of an uninterrupted run.

Layers that receive the very same input tensor object (q/k/v; gate/up) share one statistics
object: the sharing is read from the tensors the hooks see, not from layer names.

Solver protocol
---------------
Anything with these members plugs in (pruning methods here, GPTQ in ``sparsecraft.quant``)::

    class MySolver:
        needs_hessian: bool          # collect Σ x xᵀ (float32) in LayerStats.hessian
        needs_absmean: bool          # optional: collect Σ |x| (LayerStats.absmean)

        def solve(self, name: str, layer: nn.Module, weight: Tensor, stats: LayerStats
                  ) -> Tensor | SolveResult:
            # name: model-relative ("model.layers.3.mlp.down_proj"); layer: the model's module
            # (read-only; the engine writes the result); weight: (out, in) float32 copy on the
            # compute device; stats: statistics of this layer's input over all calibration tokens.
            # Return the new (out, in) weight, or a SolveResult with the keep-mask and extra info.

        # optional
        def solve_group(self, names, layers, weights, stats) -> list[Tensor | SolveResult]:
            # layers that share one input (and one LayerStats), solved together (SparseGPT
            # factors the Hessian once for q/k/v).
        def end_block(self, index: int) -> None: ...  # after every layer of block `index` is solved
        def block_report(self, index: int) -> dict: ...  # merged into the block's progress line
        modifies_weights: bool  # False for read-only walks (statistics only): outputs are reused

Usage (e.g. GPTQ)::

    report = run_sequential(model, calibration_ids, MySolver(), EngineOptions(device="auto"))

The engine returns an :class:`EngineReport` (per-layer records with the relative reconstruction
error ‖WX − ŴX‖/‖WX‖, wall-time split into forward passes / statistics / solve / error
measurement, peak host and device memory).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..allocator import keep_freed_memory
from ..errors import SparsecraftError
from ..models.discovery import block_linears, decoder_blocks, weight_matrix
from .stats import LayerStats, relative_error

log = logging.getLogger(__name__)

__all__ = [
    "EngineOptions",
    "EngineReport",
    "LayerRecord",
    "LayerSolver",
    "SolveResult",
    "resolve_device",
    "run_sequential",
]


@dataclass
class SolveResult:
    """A solver's answer for one layer: the new weight (out, in), optionally its keep-mask
    (True = kept; pruning methods) and figures for the report (e.g. the damping used)."""

    weight: Tensor
    mask: Tensor | None = None
    info: dict = field(default_factory=dict)
    # the weight the reconstruction error is measured against (default: the layer's weight
    # before the solve; ``sparsecraft refine`` passes the dense model's)
    reference: Tensor | None = None


@runtime_checkable
class LayerSolver(Protocol):
    needs_hessian: bool

    def solve(
        self, name: str, layer: nn.Module, weight: Tensor, stats: LayerStats
    ) -> Tensor | SolveResult: ...


@dataclass
class EngineOptions:
    """How the walk runs (not what it computes, except ``forward_dtype``/``true_sequential``)."""

    device: str | torch.device = "auto"
    # dtype of the calibration forwards; None = the model's dtype. bfloat16 on an fp32 model is
    # the CPU fast mode (avx512_bf16 matmuls are ~4x faster); solves always run in float32.
    forward_dtype: torch.dtype | None = None
    batch_size: int = 8
    # dtype of the block inputs kept on the CPU between passes; None = forward dtype.
    offload_dtype: torch.dtype | None = None
    true_sequential: bool = False
    targets: Sequence[str] | None = None
    ignore: Sequence[str] | None = None
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    # identifies the run in a checkpoint: resuming with another recipe is refused
    fingerprint: dict | None = None
    # where block inputs/outputs live between passes: "cpu", "device", or "auto" (the device when
    # two copies fit in a quarter of its free memory, else the CPU)
    inputs_on: str = "auto"
    # TF32 tensor cores for the Σ x xᵀ product on CUDA (statistics only; solves stay fp32)
    tf32_stats: bool = True
    # tokens kept per layer to measure the reconstruction error when no Hessian is collected
    error_rows: int = 512
    # In the bf16 fast mode, accumulate Σ x xᵀ with bf16 products (exact for bf16 inputs) and
    # float32 sums per batch instead of float32 products.
    bf16_hessian: bool = False
    # torch threads during CPU solves: their many small per-column ops lose to thread
    # synchronisation (badly so on a shared machine), so one thread is faster. None = unchanged.
    solve_threads: int | None = 1
    progress: bool = True


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    error_measure: str
    solve_s: float
    info: dict = field(default_factory=dict)


@dataclass
class EngineReport:
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: int = 0
    tokens: int = 0
    forward_s: float = 0.0
    statistics_s: float = 0.0
    solve_s: float = 0.0
    checkpoint_s: float = 0.0
    error_s: float = 0.0  # measuring the per-layer reconstruction errors
    total_s: float = 0.0
    peak_host_mib: float = 0.0
    peak_device_mib: float | None = None
    device: str = "cpu"
    forward_dtype: str = "float32"
    inputs_on: str = "cpu"
    resumed_from_block: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        return d


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SparsecraftError(f"device {device!r}: not a torch device (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparsecraftError(f"device {device!r}: CUDA is not available here; use --device cpu")
    return dev


def _peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _to(obj: Any, device: torch.device, dtype: torch.dtype | None, memo: dict) -> Any:
    """Move tensors in nested args to ``device``; floating ones also to ``dtype``. ``memo``
    keeps one converted copy per source tensor (all blocks share the rotary tables)."""
    if isinstance(obj, Tensor):
        key = id(obj)
        if key not in memo:
            if dtype is not None and obj.is_floating_point():
                memo[key] = (obj, obj.to(device=device, dtype=dtype))
            else:
                memo[key] = (obj, obj.to(device))
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype, memo) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call, returns its input."""

    def __init__(self, index: int, block: nn.Module, sink: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: stays where it is
        self.index, self.sink, self.last = index, sink, last

    def __getattr__(self, name: str):  # models read attributes such as attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((self.index, hidden, rest, kwargs))
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def _capture(
    model,
    blocks: nn.ModuleList,
    batches: list[Tensor],
    device: torch.device,
    fdtype: torch.dtype,
    store_dtype: torch.dtype,
    store_device: torch.device,
):
    """Inputs of block 0 (CPU, per batch) and each block's extra call arguments (per batch)."""
    originals = list(blocks)
    n = len(originals)
    sink: list = []
    for i, b in enumerate(originals):
        blocks[i] = _Recorder(i, b, sink, last=i == n - 1)
    home = next(model.parameters()).device
    inputs: list[Tensor] = []
    extra: list[list[tuple]] = [[] for _ in range(n)]
    try:
        model.to(device)  # only the parts outside the blocks: the blocks are recorders now
        for ids in batches:
            sink.clear()
            memo: dict = {}  # holds the source tensors too, so their ids stay unique
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            if len(sink) != n:
                raise SparsecraftError(
                    f"{type(model).__name__}: the forward pass called {len(sink)} of {n} decoder blocks; "
                    "this architecture's block loop is not supported by the engine"
                )
            for index, hidden, rest, kwargs in sink:
                if index == 0:
                    inputs.append(hidden.to(store_device, store_dtype))
                extra[index].append(_to((rest, kwargs), device, fdtype, memo))
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
        model.to(home)
        sink.clear()
    return inputs, extra


def _inputs_placement(ids: Tensor, model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda":
        return "cpu"
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    need = 2 * ids.numel() * int(hidden) * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need < free / 4 else "cpu"


def _clock(device) -> float:
    """perf_counter after the device's queued work (so the time split is right on CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: one float32 reduction (NaN and ±Inf survive a sum) instead of a mask."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32)))


def _block_output(out):
    return out[0] if isinstance(out, tuple | list) else out


class _StatsCollector:
    """Pre-hooks on a block's linears: group layers by identical input tensor, accumulate."""

    def __init__(
        self,
        layers: dict[str, nn.Module],
        needs_hessian: bool,
        device,
        error_rows: int,
        sample_every: int,
        hessian_dtype: torch.dtype | None,
        tf32: bool = False,
        needs_absmean: bool = False,
    ):
        self.layers = layers
        self.needs_hessian = needs_hessian
        self.needs_absmean = needs_absmean
        self.device = device
        self.error_rows = error_rows
        self.sample_every = sample_every
        self.hessian_dtype = hessian_dtype
        self.tf32 = tf32
        self.stats: dict[str, LayerStats] = {}  # layer -> (shared) stats
        self.leader: dict[str, str] = {}  # layer -> name of the group's first layer
        self.order: list[str] = []  # layers in execution order
        self.discovering = True
        self.active: set[str] | None = None  # groups (by leader) accumulating now; None = all
        self.stop_after: str | None = None  # leader after whose update the forward stops
        self.accumulate = True
        self.seen: list[tuple[Tensor, str]] = []
        self.time_s = 0.0
        self.handles = []

    def __enter__(self):
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.seen.clear()

    def new_batch(self):
        self.seen.clear()

    def end_discovery(self):
        self.discovering = False
        self.seen.clear()

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.order:
            out.setdefault(self.leader[name], []).append(name)
        return list(out.values())

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            t0 = _clock(self.device)
            if self.discovering:
                if name not in self.leader:
                    for seen_x, seen_name in self.seen:
                        if seen_x is x:
                            self.leader[name] = self.leader[seen_name]
                            self.stats[name] = self.stats[seen_name]
                            break
                    else:
                        self.leader[name] = name
                        self.stats[name] = LayerStats(
                            x.shape[-1],
                            with_hessian=self.needs_hessian,
                            with_absmean=self.needs_absmean,
                            device=self.device,
                            hessian_matmul_dtype=self.hessian_dtype, tf32=self.tf32,
                            sample_rows=0 if self.needs_hessian else self.error_rows,
                        )
                    self.order.append(name)
                    self.seen.append((x, name))
            lead = self.leader.get(name)
            if self.accumulate and lead == name and (self.active is None or name in self.active):
                self.stats[name].update(x, sample_every=self.sample_every)
            self.time_s += _clock(self.device) - t0
            if self.stop_after is not None and name == self.stop_after:
                raise _StopForward

        return hook


class _BlockRun:
    """One block being processed: its forward copy on the device, passes and solves."""

    def __init__(
        self,
        master: nn.Module,
        prefix: str,
        extra: list,
        solver,
        report: EngineReport,
        opts: EngineOptions,
        device: torch.device,
        fdtype: torch.dtype,
        store_dtype: torch.dtype,
    ):
        self.master, self.prefix, self.extra, self.solver, self.report = master, prefix, extra, solver, report
        self.opts, self.device, self.fdtype, self.store_dtype = opts, device, fdtype, store_dtype
        self.store_device = torch.device("cpu") if opts.inputs_on == "cpu" else device
        self.master_layers = block_linears(master, prefix, opts.targets, opts.ignore)
        p = next(master.parameters())
        same = device == p.device and fdtype == p.dtype
        self.fwd = master if same else copy.deepcopy(master).to(device=device, dtype=fdtype)
        self.fwd_layers = block_linears(self.fwd, prefix, opts.targets, opts.ignore)
        self.records: list[LayerRecord] = []
        self.new_weights: dict[str, Tensor] = {}
        self.changed = False

    def run_pass(self, xs: list[Tensor], collector: _StatsCollector | None, keep_outputs: bool,
                 stop_early: bool = False):
        """Run the block on every batch. ``stop_early``: a statistics-only pass that ends each
        forward at the last linear layer's input (the rest of the block is not needed)."""
        outs = [] if keep_outputs else None
        for bi, x in enumerate(xs):
            rest, kwargs = self.extra[bi]
            if collector is not None:
                collector.new_batch()
            try:
                out = self.fwd(x.to(device=self.device, dtype=self.fdtype), *rest, **kwargs)
            except _StopForward:
                out = None
            if collector is not None and collector.discovering:
                collector.end_discovery()
                if stop_early and collector.order:
                    collector.stop_after = collector.leader[collector.order[-1]]
            if outs is not None and out is not None:
                outs.append(_block_output(out).to(self.store_device, self.store_dtype))
        return outs

    def _call_solver(self, names, layers, dense, stats) -> list[SolveResult]:
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and self.opts.solve_threads:
            torch.set_num_threads(self.opts.solve_threads)
        try:
            if len(names) > 1 and hasattr(self.solver, "solve_group"):
                return [
                    _as_result(r)
                    for r in self.solver.solve_group(names, layers, [w.clone() for w in dense], stats)
                ]
            return [
                _as_result(self.solver.solve(n, layer, w.clone(), stats))
                for n, layer, w in zip(names, layers, dense)
            ]
        finally:
            torch.set_num_threads(threads)

    def solve_group(self, collector: _StatsCollector, group: list[str]) -> None:
        device, prefix = self.device, self.prefix
        stats = collector.stats[group[0]]
        stats.check_finite(prefix + group[0])
        t0 = _clock(self.device)
        dense = []
        for rel in group:
            w = weight_matrix(self.master_layers[rel]).to(device=device, dtype=torch.float32)
            if not _finite(w):
                raise SparsecraftError(f"{prefix}{rel}: the weight contains NaN or Inf; the model is corrupt")
            dense.append(w)
        results = self._call_solver(
            [prefix + rel for rel in group], [self.master_layers[rel] for rel in group], dense, stats
        )
        solve_s = (_clock(self.device) - t0) / len(group)
        self.report.solve_s += _clock(self.device) - t0
        for rel, w, res in zip(group, dense, results):
            new = res.weight.to(device=device, dtype=torch.float32)
            if new.shape != w.shape:
                raise RuntimeError(f"solver returned {tuple(new.shape)} for {prefix}{rel} {tuple(w.shape)}")
            ref = w if res.reference is None else res.reference.to(device=device, dtype=torch.float32)
            t_err = _clock(device)
            err, how = relative_error(ref, new, stats)
            self.report.error_s += _clock(device) - t_err
            sparsity = float((new == 0).float().mean())
            self.records.append(
                LayerRecord(prefix + rel, tuple(w.shape), sparsity, err, how, solve_s, res.info)
            )
            self.changed |= not torch.equal(new, w)
            master_w = weight_matrix(self.master_layers[rel])
            master_w.copy_(new.to(master_w))
            if self.fwd is not self.master:
                fwd_w = weight_matrix(self.fwd_layers[rel])
                fwd_w.copy_(new.to(fwd_w))
            self.new_weights[rel] = master_w
        stats.release()


def _fingerprint_hash(fp: dict | None) -> str:
    return hashlib.sha256(json.dumps(fp or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Checkpoint:
    """state.json (commit point) + block_NNNNN.safetensors + inputs_NNNNN.pt in one directory."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict | None):
        self.root = Path(root)
        self.fp = _fingerprint_hash(fingerprint)

    def load(self) -> dict | None:
        state_path = self.root / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != self.fp:
            raise SparsecraftError(
                f"{self.root}: the checkpoint was made with a different recipe or model; "
                "rerun without --resume (or with the original options)"
            )
        return state

    def save(self, next_block: int, weights: dict[str, Tensor], inputs: list[Tensor], report: EngineReport):
        self.root.mkdir(parents=True, exist_ok=True)
        b = next_block - 1
        tmp = self.root / f".block_{b:05d}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, self.root / f"block_{b:05d}.safetensors")
        tmp = self.root / f".inputs_{next_block:05d}.tmp"
        torch.save(inputs, tmp)
        os.replace(tmp, self.root / f"inputs_{next_block:05d}.pt")
        state = {"fingerprint": self.fp, "next_block": next_block, "report": report.to_dict()}
        tmp = self.root / ".state.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.root / "state.json")  # commit
        old = self.root / f"inputs_{b:05d}.pt"
        if old.exists():
            old.unlink()

    def block_weights(self, b: int) -> dict[str, Tensor]:
        return load_file(str(self.root / f"block_{b:05d}.safetensors"))

    def inputs(self, next_block: int) -> list[Tensor]:
        return torch.load(self.root / f"inputs_{next_block:05d}.pt")


def _as_result(out: Tensor | SolveResult) -> SolveResult:
    return out if isinstance(out, SolveResult) else SolveResult(weight=out)


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    calibration_ids: Tensor,
    solver: LayerSolver,
    options: EngineOptions | None = None,
    on_block: Callable[[int, list[LayerRecord]], None] | None = None,
) -> EngineReport:
    """Walk ``model`` block by block and let ``solver`` rewrite every selected linear layer.

    ``calibration_ids``: LongTensor (n, seqlen) of token ids. The model is modified in place
    (its master weights keep their dtype and device). ``on_block(index, records)`` is called
    after each block (progress lines).
    """
    opts = options or EngineOptions()
    t_start = time.perf_counter()
    if not isinstance(calibration_ids, Tensor) or calibration_ids.dim() != 2 or calibration_ids.numel() == 0:
        raise SparsecraftError("calibration: expected a non-empty LongTensor of shape (nsamples, seqlen)")
    if opts.batch_size < 1:
        raise SparsecraftError(f"batch_size {opts.batch_size}: must be >= 1")
    device = resolve_device(opts.device)
    keep_freed_memory()  # the block passes re-allocate the same large buffers for every batch
    model.eval()
    blocks_name, blocks = decoder_blocks(model)
    fdtype = opts.forward_dtype or next(model.parameters()).dtype
    store_dtype = opts.offload_dtype or fdtype
    report = EngineReport(
        blocks=len(blocks),
        tokens=int(calibration_ids.numel()),
        device=str(device),
        forward_dtype=str(fdtype).replace("torch.", ""),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    needs_hessian = bool(getattr(solver, "needs_hessian", False))
    hessian_dtype = torch.bfloat16 if (opts.bf16_hessian and fdtype == torch.bfloat16) else None
    batches = list(calibration_ids.split(opts.batch_size))
    sample_every = max(1, report.tokens // max(opts.error_rows, 1))

    t0 = _clock(device)
    if opts.inputs_on not in ("cpu", "device", "auto"):
        raise SparsecraftError(f"inputs_on {opts.inputs_on!r}: choose cpu, device or auto")
    if opts.inputs_on == "auto":
        opts = copy.copy(opts)
        opts.inputs_on = _inputs_placement(calibration_ids, model, device, store_dtype)
    store_device = torch.device("cpu") if opts.inputs_on == "cpu" else device
    report.inputs_on = opts.inputs_on
    inputs, extra = _capture(model, blocks, batches, device, fdtype, store_dtype, store_device)
    report.forward_s += _clock(device) - t0

    ckpt = _Checkpoint(opts.checkpoint_dir, opts.fingerprint) if opts.checkpoint_dir else None
    start = 0
    if ckpt is not None and opts.resume:
        state = ckpt.load()
        if state is not None:
            start = int(state["next_block"])
            saved = state["report"]
            report.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in saved["layers"]]
            for key in ("forward_s", "statistics_s", "solve_s", "checkpoint_s", "error_s"):
                setattr(report, key, getattr(report, key) + saved[key])
            for b in range(start):
                state_w = ckpt.block_weights(b)
                linears = block_linears(blocks[b])
                for rel, w in state_w.items():
                    weight_matrix(linears[rel]).copy_(w.to(weight_matrix(linears[rel]).dtype))
            if start < len(blocks):
                inputs = ckpt.inputs(start)
            report.resumed_from_block = start
            log.info("resuming from block %d/%d (%s)", start, len(blocks), ckpt.root)

    bar = tqdm(range(start, len(blocks)), desc="blocks", disable=not opts.progress, leave=False)
    for b in bar:
        prefix = f"{blocks_name}.{b}."
        blk = _BlockRun(blocks[b], prefix, extra[b], solver, report, opts, device, fdtype, store_dtype)
        fwd_layers, records = blk.fwd_layers, blk.records
        t_block = time.perf_counter()
        collector = _StatsCollector(
            fwd_layers, needs_hessian, device, opts.error_rows, sample_every, hessian_dtype, opts.tf32_stats,
            needs_absmean=bool(getattr(solver, "needs_absmean", False)),
        )
        with collector:
            t0 = _clock(device)
            if not opts.true_sequential:
                # a solver that changes weights needs the re-run anyway: its statistics pass
                # stops at the last linear's input; a read-only one (OWL's profile) keeps outputs
                modifies = bool(getattr(solver, "modifies_weights", True))
                outs = blk.run_pass(inputs, collector, keep_outputs=not modifies, stop_early=modifies)
                collector.stop_after = None
                report.forward_s += _clock(device) - t0 - collector.time_s
                report.statistics_s += collector.time_s
                for group in collector.groups():
                    blk.solve_group(collector, group)
            else:
                # discover groups on one batch, then one partial pass per group
                collector.accumulate = False
                blk.run_pass(inputs[:1], collector, keep_outputs=False)
                collector.accumulate = True
                report.forward_s += _clock(device) - t0 - collector.time_s
                for group in collector.groups():
                    collector.time_s = 0.0
                    collector.active, collector.stop_after = {group[0]}, group[0]
                    t0 = _clock(device)
                    blk.run_pass(inputs, collector, keep_outputs=False)
                    report.forward_s += _clock(device) - t0 - collector.time_s
                    report.statistics_s += collector.time_s
                    blk.solve_group(collector, group)
                collector.active, collector.stop_after = None, None
                outs = None
        missing = sorted(set(fwd_layers) - set(collector.order))
        if missing:
            log.warning("block %d: layers never called in the forward pass, left unchanged: %s", b, missing)
        if hasattr(solver, "end_block"):
            solver.end_block(b)
        t0 = _clock(device)
        if b == len(blocks) - 1:
            outs = []  # nothing reads the last block's outputs
        elif blk.changed or outs is None:
            outs = blk.run_pass(inputs, None, keep_outputs=True)
        report.forward_s += _clock(device) - t0
        for o in outs:
            if not _finite(o):
                raise SparsecraftError(
                    f"{prefix.rstrip('.')}: the block's outputs contain NaN or Inf; try a float32 or "
                    "bfloat16 forward dtype"
                )
        inputs = outs
        report.layers.extend(records)
        if ckpt is not None:
            t0 = time.perf_counter()
            ckpt.save(b + 1, blk.new_weights, inputs, report)
            report.checkpoint_s += time.perf_counter() - t0
        extra_info = solver.block_report(b) if hasattr(solver, "block_report") else {}
        if records:
            mean_sp = sum(r.sparsity * r.shape[0] * r.shape[1] for r in records) / sum(
                r.shape[0] * r.shape[1] for r in records
            )
            max_err = max(r.rel_error for r in records)
            bar.set_postfix(sparsity=f"{mean_sp:.3f}", max_err=f"{max_err:.3f}")
            log.info(
                "block %d/%d: %d layers, sparsity %.4f, max rel. error %.4f, %.1f s%s",
                b + 1,
                len(blocks),
                len(records),
                mean_sp,
                max_err,
                time.perf_counter() - t_block,
                "".join(f", {k} {v}" for k, v in extra_info.items()),
            )
        if on_block is not None:
            on_block(b, records)
        del blk, fwd_layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    report.total_s = time.perf_counter() - t_start
    report.peak_host_mib = _peak_host_mib()
    if device.type == "cuda":
        report.peak_device_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return report
