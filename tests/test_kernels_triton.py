"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against a dense float64 reference."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from sparsecraft.kernels.triton import dispatch, layout  # noqa: E402
from sparsecraft.kernels.triton.dispatch import KernelConfig, decompress, sparse_mm  # noqa: E402
from sparsecraft.kernels.triton.sliced import SlicedWeight, build, sliced_mm  # noqa: E402

formats = pytest.importorskip("sparsecraft.formats")


def _random_nm_keep(out_f, in_f, n, m, gen):
    scores = torch.rand(out_f, in_f // m, m, generator=gen)
    idx = scores.topk(n, dim=-1).indices
    return torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, idx, True).view(out_f, in_f)


def _make(fmt, out_f, in_f, dtype, bits=0, g=32, sym=True, sparsity=0.6, n=2, m=4, seed=0):
    """A random compressed weight (a ``sparsecraft.formats`` object) and its float64 dense value."""
    gen = torch.Generator().manual_seed(seed)
    if fmt == "bitmask":
        keep = torch.rand(out_f, in_f, generator=gen) >= sparsity
    else:
        keep = _random_nm_keep(out_f, in_f, n, m, gen)
    if bits:
        lo, hi = formats.code_range(bits, sym)
        ng = formats.num_groups(in_f, g)
        codes = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen)
        scales = (torch.rand(out_f, ng, generator=gen) * 0.1 + 0.01).half()
        zeros = None if sym else torch.randint(lo, hi + 1, (out_f, ng), generator=gen).to(torch.uint8)
        q = formats.QuantInfo(bits, g, sym, scales, zeros)
        z = zeros.double() if zeros is not None else torch.zeros(out_f, ng, dtype=torch.float64)
        cols = torch.arange(in_f) // g
        ref = (codes.double() - z[:, cols]) * scales.double()[:, cols] * keep
        if fmt == "bitmask":
            obj = formats.BitmaskTensor.from_codes(codes, keep, q, dtype)
        else:
            obj = formats.NMTensor.from_codes(codes, keep, q, dtype, n=n, m=m)
    else:
        w = (torch.randn(out_f, in_f, generator=gen) * keep).to(dtype)
        ref = w.double()
        if fmt == "bitmask":
            obj = formats.BitmaskTensor.from_dense(w, mask=keep)
        else:
            obj = formats.NMTensor.from_dense(w, n=n, m=m, mask=keep)
    return obj, ref


def _check(y: torch.Tensor, ref: torch.Tensor, tol: float):
    assert torch.isfinite(y).all()
    err = (y.double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


CASES = [
    # fmt, out, in, dtype, bits, group, sym, n, m
    ("bitmask", 40, 600, torch.float16, 0, 32, True, 2, 4),
    ("bitmask", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
    ("bitmask", 24, 576, torch.float16, 8, 64, True, 2, 4),
    ("bitmask", 24, 576, torch.float16, 4, 128, True, 2, 4),
    ("bitmask", 17, 300, torch.float16, 4, 32, False, 2, 4),
    ("nm", 40, 576, torch.float16, 0, 32, True, 2, 4),
    ("nm", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
    ("nm", 24, 512, torch.float16, 0, 32, True, 4, 8),
    ("nm", 24, 576, torch.float16, 4, 128, True, 2, 4),
    ("nm", 20, 320, torch.float16, 8, 32, False, 2, 4),
    ("nm", 18, 256, torch.float16, 4, 64, False, 4, 8),
]


def _id(c):
    return f"{c[0]}-{c[1]}x{c[2]}-{str(c[3])[6:]}-q{c[4]}g{c[5]}{'s' if c[6] else 'a'}-{c[7]}of{c[8]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernels_match_dense_reference(case):
    fmt, out_f, in_f, dtype, bits, g, sym, n, m = case
    obj, ref_w = _make(fmt, out_f, in_f, dtype, bits, g, sym, n=n, m=m, seed=out_f + in_f)
    tw = layout.prepare(obj)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    # decompress reproduces the format's own dense weight (and the float64 reference)
    dense = decompress(tw, torch.float32)
    assert torch.allclose(dense, obj.to_dense().float(), rtol=1e-2, atol=1e-6)
    assert torch.allclose(dense.double(), ref_w, rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    bk = 256 if fmt == "bitmask" else 64
    for batch, cfg in [
        (1, KernelConfig(bn=8, bk=bk, bb=1, num_warps=4)),
        (1, KernelConfig(bn=16, bk=bk, bb=1, num_warps=4, split_k=2)),  # split K, atomic adds
        (1, KernelConfig(bn=4, bk=bk, bb=1, num_warps=4, split_k=3)),  # uneven split
        (1, KernelConfig(bn=4, bk=bk, bb=1, num_warps=1, split_k=2)),  # one warp (bitmask: the prefix sum)
        (3, KernelConfig(bn=16, bk=bk, bb=16, num_warps=4)),  # batch tail
        (5, KernelConfig(bn=16, bk=bk, bb=16, num_warps=4)),
        (19, KernelConfig(bn=16, bk=bk, bb=16, num_warps=4, split_k=2)),  # two batch tiles
    ]:
        x = torch.randn(batch, in_f, generator=gen).to(dtype)
        y = sparse_mm(x, tw, cfg)
        assert y.shape == (batch, out_f) and y.dtype == dtype
        _check(y, x.double() @ ref_w.t(), tol)


def test_sparse_linear_dispatch_shapes_and_bias():
    obj, ref_w = _make("nm", 24, 256, torch.float16, seed=3)
    tw = layout.prepare(obj)
    x = torch.randn(2, 3, 256).half()
    bias = torch.randn(24).half()
    y = dispatch.sparse_linear(x, tw, bias)
    assert y.shape == (2, 3, 24)
    _check(y, (x.double() @ ref_w.t()) + bias.double(), 4e-3)


def test_tile_offsets_count_kept_values_before_each_tile():
    keep = torch.rand(5, 700) > 0.3
    mask = formats.BitmaskTensor.from_dense(torch.randn(5, 700) * keep).mask
    offs = layout.tile_offsets_from_mask(mask, 700, tile=256)
    want = torch.stack([keep[:, :0].sum(1), keep[:, :256].sum(1), keep[:, :512].sum(1)], 1)
    assert torch.equal(offs, want.to(torch.int32))


def test_layout_rejects_bad_shapes():
    from sparsecraft.errors import SparsecraftError

    with pytest.raises(SparsecraftError, match="powers of two"):
        layout.from_nm(torch.zeros(2, 6), torch.zeros(2, 2, dtype=torch.uint8), 3, 4, (2, 8))
    with pytest.raises(SparsecraftError, match="mask"):
        layout.from_bitmask(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(0), torch.zeros(3), (2, 8))


def test_cuda_forward_dispatch_policy_on_cpu_tensors():
    """The SparseLinear entry point: kernels at batch 1, dense paths above, None where it must not run."""
    from types import SimpleNamespace

    for fmt in ("nm", "bitmask"):
        obj, ref_w = _make(fmt, 24, 256, torch.float16, seed=7)
        bias = torch.randn(24).half()
        mod = SimpleNamespace(weight_compressed=obj, bias=bias, _cuda_weight=None)
        for batch in (1, 4, 20):
            x = torch.randn(batch, 256).half()
            y = dispatch.cuda_forward(mod, x)
            assert mod._cuda_weight is not None and y.shape == (batch, 24)
            _check(y, x.double() @ ref_w.t() + bias.double(), 4e-3)
        if fmt == "bitmask":  # the sliced layout is the weight; the walk kernel left its workspaces clear
            assert isinstance(mod._cuda_weight, SlicedWeight)
            assert all(ws.abs().max() == 0 for ws in mod._cuda_weight.workspaces.values())
        else:
            assert dispatch.use_kernel(mod._cuda_weight, 4) and dispatch.use_kernel(mod._cuda_weight, 16)
        # a cached dense copy serves every batch above 1 (then never slower than dense)
        assert dispatch.prepare_module(mod, "cpu", keep_dense=True)
        assert torch.allclose(mod._cuda_dense.double(), ref_w)
        x = torch.randn(3, 256).half()
        _check(dispatch.cuda_forward(mod, x), x.double() @ ref_w.t() + bias.double(), 4e-3)
        # autograd needs the module's own dense path
        xg = torch.randn(1, 256, requires_grad=True)
        assert dispatch.cuda_forward(mod, xg) is None
    qd = formats.QuantizedDenseTensor.from_codes(
        torch.randint(-8, 8, (4, 32)), formats.QuantInfo(4, 32, True, torch.ones(4, 1).half()), torch.float16
    )
    assert not dispatch.supports(qd)
    assert dispatch.cuda_forward(SimpleNamespace(weight_compressed=qd, bias=None), torch.randn(1, 32)) is None


def test_custom_op_traces_under_torch_compile_fullgraph():
    """The decode call is one opaque op for torch.compile (checked here with the aot_eager backend)."""
    obj, ref_w = _make("nm", 24, 256, torch.float16, bits=4, g=128, seed=9)
    tw = layout.prepare(obj)
    dense = dispatch.decompress(tw, torch.float16)
    fn = torch.compile(
        lambda a: dispatch.sparse_linear(a, tw) + dispatch.sparse_linear(a.repeat(3, 1), tw, dense=dense)[:1],
        backend="aot_eager",
        fullgraph=True,
    )
    x = torch.randn(1, 256).half()
    _check(fn(x), 2 * (x.double() @ ref_w.t()), 4e-3)
    # bitmask: the sliced kernels' op, which declares its workspace as mutated (batch 1: the walk,
    # batch 12: the tensor-core kernel), and the op that decodes the weight (batch 20)
    obj, ref_w = _make("bitmask", 40, 256, torch.float16, sparsity=0.7, seed=10)
    sw = dispatch.prepare_weight(obj, "cpu")
    x12, x20 = torch.randn(12, 256).half(), torch.randn(20, 256).half()
    for xb in (x12, x20):
        dispatch.sparse_linear(xb, sw)  # the first, eager call makes the batch's workspace

    def f(a, b, c):
        return dispatch.sparse_linear(a, sw), dispatch.sparse_linear(b, sw), dispatch.sparse_linear(c, sw)

    fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    y1, y2 = fn(x, x12, x20), fn(x, x12, x20)
    for y, xb in zip(y1, (x, x12, x20), strict=True):
        _check(y, xb.double() @ ref_w.t(), 4e-3)
    assert all(torch.equal(a, b) for a, b in zip(y1, y2, strict=True))  # workspaces clear after every call


def test_bench_cuda_runner(tmp_path, capsys):
    """`sparsecraft bench --device cuda` refuses cleanly without a GPU; its runner's plumbing works."""
    from argparse import Namespace

    from sparsecraft.cli import main
    from sparsecraft.cli.bench import parse_format
    from sparsecraft.kernels.triton.bench import run_cuda

    if not torch.cuda.is_available():
        assert main(["bench", "random:tiny-llama", "--device", "cuda", "--new-tokens", "2"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    args = Namespace(
        model="random:tiny-llama",
        device="cuda",
        nm="2:4",
        group_size=32,
        magnitude="0.5",
        no_dense=False,
        batch=1,
        prompt_len=4,
        new_tokens=3,
        repeats=1,
        no_fuse=False,
        compile=False,
    )
    res = run_cuda(args, [parse_format("bitmask")], device="cpu")
    rows = res["variants"]
    assert set(rows) == {"dense (torch)", "bitmask"}
    # timings of a 2-layer model on a loaded CPU are noise: check the rows, not the ratio
    assert rows["bitmask"]["tokens_per_s"] > 0 and "speedup_vs_dense" in rows["bitmask"]
    assert rows["bitmask"]["linear_weight_mb"] < rows["dense (torch)"]["linear_weight_mb"]
    # the static-cache decode gives generate's tokens (fp32 on the CPU) and times its steps
    for row in rows.values():
        assert row["graph_tokens_equal_generate"] and row["graph_tokens_per_s"] > 0
    assert "graph_speedup_vs_dense" in rows["bitmask"]


UNIT_CASES = [
    # fmt, out, in, dtype, bits, group, sym  (in % 8 == 0; not a multiple of the tile widths)
    ("nm", 37, 520, torch.float16, 0, 32, True),
    ("nm", 20, 264, torch.bfloat16, 0, 32, True),
    ("nm", 21, 776, torch.float16, 4, 128, True),  # partial last quant group
    ("nm", 19, 264, torch.float16, 4, 32, False),
]


@pytest.mark.parametrize("case", UNIT_CASES, ids=[_id(c + (2, 4)) for c in UNIT_CASES])
def test_unit_kernels_match_dense_reference(case):
    """The 8-column-unit 2:4 kernels (gemv.py): batch 1 (selects and byte permute), FMA rows, tensor-core
    dot rows; K splits (atomics), row and batch tails, and the dispatcher's own choice."""
    fmt, out_f, in_f, dtype, bits, g, sym = case
    obj, ref_w = _make(fmt, out_f, in_f, dtype, bits, g, sym, sparsity=0.7, seed=out_f * in_f)
    tw = layout.prepare(obj)
    assert dispatch.unit_supported(tw, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    gen = torch.Generator().manual_seed(2)
    K = KernelConfig
    for batch, cfg in [
        (1, K(bn=8, bk=256, bb=1, num_warps=4, unit=True)),
        (1, K(bn=4, bk=512, bb=1, num_warps=2, split_k=2, unit=True)),
        (1, K(bn=4, bk=256, bb=1, num_warps=4, unit=True, xrow=True, prmt=True)),
        (3, K(bn=8, bk=256, bb=4, num_warps=4, unit=True)),  # FMA rows, batch tail
        (5, K(bn=4, bk=512, bb=4, num_warps=2, split_k=3, unit=True, xrow=True)),  # two batch tiles
        (17, K(bn=16, bk=256, bb=16, num_warps=4, split_k=2, unit=True, dot=True)),  # tensor-core rows
        (2, None),
        (4, None),
    ]:
        x = torch.randn(batch, in_f, generator=gen).to(dtype)
        if cfg is None:
            cfg = dispatch.default_config(tw, batch, x.device, x.dtype)
            assert cfg.unit
        y = sparse_mm(x, tw, cfg)
        assert y.shape == (batch, out_f) and y.dtype == dtype
        _check(y, x.double() @ ref_w.t(), tol)


def test_unit_kernels_decline_other_layouts():
    obj, _ = _make("nm", 8, 256, torch.float16, n=4, m=8)
    assert not dispatch.unit_supported(layout.prepare(obj))  # 4:8 stays on the tile kernels
    obj, _ = _make("bitmask", 8, 256, torch.float16)
    assert not dispatch.unit_supported(layout.prepare(obj))  # bitmask: the sliced kernels
    obj, _ = _make("nm", 8, 260, torch.float16)
    assert not dispatch.unit_supported(layout.prepare(obj))  # in % 8 != 0
    # float32 inputs on a float16 weight: the unit kernels read x as 16-bit pairs, so the
    # dispatcher takes the per-element kernel, and a forced unit config is refused
    obj, ref_w = _make("nm", 8, 256, torch.float16)
    tw = layout.prepare(obj)
    x = torch.randn(1, 256)
    assert not dispatch.default_config(tw, 1, x.device, x.dtype).unit
    _check(sparse_mm(x, tw), x.double() @ ref_w.t(), 4e-3)
    with pytest.raises(ValueError, match="unit kernels"):
        sparse_mm(x, tw, KernelConfig(bn=8, bk=256, bb=1, num_warps=4, unit=True))


SLICED_CASES = [  # out, in, sparsity, dtype, seg, rows, batch, bb, reg, unroll, values per step, PDL
    (37, 200, 0.7, torch.float16, 64, 8, 1, 1, True, 1, 4, True),  # row and column tails, partial segment
    (24, 512, 0.5, torch.bfloat16, 128, 16, 3, 4, True, 2, 2, False),  # batch tail, unrolled walk
    (20, 640, 0.98, torch.float16, 128, 4, 2, 1, False, 1, 1, True),  # all-zero words: one empty step each
    (9, 128, 0.0, torch.float16, 128, 8, 1, 1, True, 1, 4, False),  # dense
    (16, 320, 0.9, torch.bfloat16, 320, 16, 1, 1, True, 1, 4, False),  # 10 words: loaded in the walk
]


@pytest.mark.parametrize("case", SLICED_CASES,
                         ids=[f"{c[0]}x{c[1]}-{c[2]}-seg{c[4]}-p{c[10]}" for c in SLICED_CASES])
def test_sliced_kernel_matches_dense_reference(case):
    """The sliced slot-major bitmask kernel (sliced.py) through the dispatcher's KernelConfig, with
    an empty row, against the float64 product."""
    out_f, in_f, sparsity, dtype, seg, rows, batch, bb, reg, unroll, per_step, pdl = case
    gen = torch.Generator().manual_seed(out_f * in_f)
    keep = torch.rand(out_f, in_f, generator=gen) >= sparsity
    keep[out_f // 2] = False
    w = (torch.randn(out_f, in_f, generator=gen) * keep).to(dtype)
    tw = layout.prepare(formats.BitmaskTensor.from_dense(w, mask=keep))
    x = torch.randn(batch, in_f, generator=gen).to(dtype)
    ref = x.double() @ w.double().t()
    sw = tw.sliced_view(seg, rows, per_step)
    assert sw.perm.dtype == torch.int16  # the slices' row order
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    if reg:
        y = sparse_mm(x, tw, KernelConfig(rows, 0, bb, 1, sliced=seg, unroll=unroll, per_step=per_step,
                                          pdl=pdl))
    else:
        y = sliced_mm(x, sw, bb, reg=False, pdl=pdl)
    assert y.shape == (batch, out_f) and y.dtype == dtype
    _check(y, ref, tol)
    assert y[:, out_f // 2].abs().max() == 0
    assert torch.equal(decompress(sw), w)  # decoded from the sliced layout: exact
    if rows >= 16:  # the tensor-core kernel (slices of 16 rows or more), two batch tiles
        x = torch.randn(17, in_f, generator=gen).to(dtype)
        _check(sliced_mm(x, sw, 16, 4, dot=True), x.double() @ w.double().t(), tol)


def test_sliced_layout_steps_cover_every_row_with_little_padding():
    """Every row of a slice fits in the slice's steps (a step: up to per_step kept values of one
    32-bit mask word, at least one step per word), rows are a permutation, padding stays small."""
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(512, 1024, generator=gen) >= 0.7
    w = (torch.randn(512, 1024, generator=gen) * keep).half()
    bt = formats.BitmaskTensor.from_dense(w, mask=keep)
    for per_step, max_padding in ((1, 1.03), (4, 1.2)):
        sw = build(bt.mask, bt.values, (512, 1024), seg=128, rows=32, per_step=per_step)
        n_seg, n_slice = sw.steps.shape
        popc = keep.view(512, n_seg, 4, 32).sum(-1)
        need = ((popc + per_step - 1) // per_step).clamp(min=1).sum(-1)  # steps of each row and segment
        for s in range(n_seg):
            lane_rows = sw.perm[s].long().view(n_slice, 32)
            assert torch.equal(lane_rows.flatten().sort().values, torch.arange(512))  # a permutation
            assert (sw.steps[s].unsqueeze(1) >= need[lane_rows, s]).all()
        stored = sw.values.numel()
        assert int(keep.sum()) <= stored <= max_padding * int(keep.sum())  # rows sorted per segment
        assert sw.nbytes() < stored * 2 + 512 * 1024 / 8 + 2 * 512 * n_seg + 8 * n_seg * n_slice + 1


def test_sliced_layout_row_order_is_int32_past_32767_rows():
    """The row order is int16 only while every output row (and the padding index) fits in it."""
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(32769, 64, generator=gen) >= 0.7
    w = (torch.randn(32769, 64, generator=gen) * keep).half()
    sw = layout.prepare(formats.BitmaskTensor.from_dense(w, mask=keep)).sliced_view(64, 512, 4)
    assert sw.perm.dtype == torch.int32 and int(sw.perm.max()) == 32769  # padding lanes point past the rows
    x = torch.randn(2, 64, generator=gen).half()
    _check(sliced_mm(x, sw, 2, 1), x.double() @ w.double().t(), 4e-3)


def test_sliced_layers_add_into_one_buffer_zeroed_once_per_forward():
    """prepare_model gives each sliced layer its columns of one float32 buffer (attach_sums): batch 1
    adds into them without a move-out kernel, and the model's forward pre-hook zeroes the buffer; a
    layer registered twice in the model keeps the per-call workspace."""
    from torch import nn

    from sparsecraft.runtime.linear import SparseLinear

    (oa, wa), (ob, wb) = (_make("bitmask", 32, 128, torch.float16, sparsity=0.7, seed=s) for s in (1, 2))
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.b = nn.Linear(128, 128), SparseLinear(ob, kernels="torch")
            self.shared = nn.ModuleList([a, a])  # a is registered twice

        def forward(self, x):
            return self.b(self.first(x))

    a = SparseLinear(oa, kernels="torch")
    model = Model()
    b = model.b
    assert dispatch.prepare_model(model, "cpu") == 2
    assert a._cuda_sums is None and b._cuda_sums is not None
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(0)).half()
    ref = x.double() @ wb.t()
    _check(dispatch.cuda_forward(b, x), ref, 4e-3)
    _check(dispatch.cuda_forward(b, x), 2 * ref, 4e-3)  # not zeroed between calls: once per forward
    model.first(x.float())  # a forward of a submodule does not zero the model's buffer
    _check(dispatch.cuda_forward(b, x), 3 * ref, 4e-3)
    model(x.float())  # the model's forward does
    _check(dispatch.cuda_forward(b, x), ref, 4e-3)
    _check(dispatch.cuda_forward(a, x), x.double() @ wa.t(), 4e-3)
    assert not a._cuda_weight.workspaces[1].any()  # the per-call workspace, left zeroed


def test_sliced_layout_rejects_bad_input():
    from sparsecraft.errors import SparsecraftError

    keep = torch.ones(4, 128, dtype=torch.bool)
    bt = formats.BitmaskTensor.from_dense(torch.ones(4, 128, dtype=torch.float16), mask=keep)
    with pytest.raises(SparsecraftError, match="multiple of 32"):
        build(bt.mask, bt.values, (4, 128), seg=48)
    with pytest.raises(SparsecraftError, match="per_step"):
        build(bt.mask, bt.values, (4, 128), per_step=3)
    with pytest.raises(SparsecraftError, match="stored"):
        build(bt.mask, bt.values[:-1], (4, 128))
    with pytest.raises(SparsecraftError, match="float16/bfloat16"):
        build(bt.mask, bt.values.float(), (4, 128))


def test_sliced_weight_serves_batches_1_to_16_and_decodes_above():
    """A bitmask layer keeps only the sliced layout (prepare_module): every batch size runs from it
    (1-8 the walk kernel, 9-16 the tensor-core kernel, above: decoded, then a dense product), and
    no row-major tensor stays referenced."""
    import gc
    import weakref
    from types import SimpleNamespace

    obj, ref_w = _make("bitmask", 40, 200, torch.bfloat16, sparsity=0.7, seed=11)
    made = []
    prepare = dispatch.prepare

    def spy(*a):
        made.append(prepare(*a))
        return made[-1]

    mod = SimpleNamespace(weight_compressed=obj, bias=None, _cuda_weight=None)
    try:
        dispatch.prepare = spy
        assert dispatch.prepare_module(mod, "cpu")
    finally:
        dispatch.prepare = prepare
    row_major = weakref.ref(made.pop())
    gc.collect()
    assert row_major() is None  # the TritonWeight (values, mask, row and tile offsets) is gone
    sw = mod._cuda_weight
    assert isinstance(sw, SlicedWeight) and set(vars(mod)) == {"weight_compressed", "bias", "_cuda_weight",
                                                                "_cuda_dense", "_cuda_bias"}
    gen = torch.Generator().manual_seed(3)
    for batch in [*range(1, 17), 33]:
        x = torch.randn(batch, 200, generator=gen).bfloat16()
        _check(dispatch.cuda_forward(mod, x), x.double() @ ref_w.t(), 2e-2)
        assert dispatch.sliced_config(min(batch, 16)).dot == (batch > dispatch.SLICED_WALK_MAX_BATCH)
    assert sorted(sw.workspaces) == list(range(1, 17))  # none for the decoded batch
    assert all(ws.abs().max() == 0 for ws in sw.workspaces.values())
    x = torch.randn(2, 200, generator=gen)  # float32 inputs: decoded to float32, then a dense product
    _check(dispatch.sparse_linear(x, sw), x.double() @ ref_w.t(), 1e-6)


@pytest.mark.parametrize("dtype,bits,g,batch,warps,split,depth,kw", [
    (torch.float16, 0, 32, 1, 2, 1, 1, 1),
    (torch.float16, 0, 32, 5, 4, 2, 3, 1),  # a warp past the last m-tile, K split
    (torch.bfloat16, 0, 32, 12, 1, 3, 2, 1),  # two n-tiles, uneven K split
    (torch.float16, 4, 128, 1, 2, 2, 4, 1),  # prefetch past the split's and the weight's last chunk
    (torch.float16, 4, 256, 16, 4, 1, 2, 1),  # a group spans two chunks
    (torch.float16, 4, 128, 1, 8, 1, 2, 4),  # 4 warps per m-tile, 3 chunks: one warp adds nothing
    (torch.float16, 0, 32, 16, 4, 2, 1, 2),  # warps per m-tile with a grid split (fixup) and x in
    (torch.bfloat16, 0, 32, 7, 4, 1, 3, 4),  # fragment order; one m-tile per program
    (torch.float16, 4, 128, 1, 32, 1, 2, 16),  # 32 warps, 16 per m-tile (two m-tiles, 13 warps idle)
])
def test_mma24_kernel_matches_dense_reference(dtype, bits, g, batch, warps, split, depth, kw):
    """The sparse tensor-core kernel (mma24.py) with its MMA emulated from the lanes' fragments
    (rows rebuilt from registers a0..a3 and the index words of lanes t = 0, 1): this checks the
    fragment packing and the kernel's addressing of weights, indices, x and output."""
    from sparsecraft.kernels.triton import mma24

    obj, ref_w = _make("nm", 48, 384, dtype, bits, g, True, seed=bits + batch)
    tw = layout.prepare(obj)
    assert mma24.supported(tw, dtype)
    x = torch.randn(batch, 384, generator=torch.Generator().manual_seed(batch)).to(dtype)
    cfg = KernelConfig(16 * warps // kw, 0, 16, warps, split_k=split, mma=True, depth=depth, pdl=split > 1,
                       fixup=bits == 4 or kw == 2, xrow=batch in (5, 16), k_warps=kw)  # xrow: fragment order
    y = sparse_mm(x, tw, cfg)
    assert y.shape == (batch, 48) and y.dtype == dtype
    _check(y, x.double() @ ref_w.t(), 2e-2 if dtype == torch.bfloat16 else 3e-3)
    if cfg.fixup and split > 1:  # the last split left the workspace and the counters zeroed
        ws = tw.mma_view().workspaces
        assert not ws["sums"].any() and not any(ws[k][1].any() for k in ws if isinstance(k, int))
        y2 = sparse_mm(x, tw, cfg)
        assert torch.equal(y, y2)


def test_mma24_declines_other_layouts():
    from sparsecraft.errors import SparsecraftError
    from sparsecraft.kernels.triton import mma24

    cases = [("nm", 40, 384, 0, 32, True, 2, 4),  # rows % 16
             ("nm", 48, 320, 0, 32, True, 2, 4),  # columns % 128
             ("nm", 48, 384, 0, 32, True, 4, 8),  # 4:8
             ("nm", 48, 384, 4, 128, False, 2, 4),  # asymmetric codes
             ("nm", 48, 384, 4, 64, True, 2, 4),  # group smaller than a 128-column chunk
             ("bitmask", 48, 384, 0, 32, True, 2, 4)]
    for fmt, o, i, bits, g, sym, n, m in cases:
        obj, _ = _make(fmt, o, i, torch.float16, bits, g, sym, n=n, m=m)
        assert not mma24.supported(layout.prepare(obj))
    obj, _ = _make("nm", 48, 384, torch.float16)
    tw = layout.prepare(obj)
    assert mma24.supported(tw, torch.float16) and not mma24.supported(tw, torch.bfloat16)
    with pytest.raises(SparsecraftError):
        mma24.mma24_mm(torch.zeros(17, 384, dtype=torch.float16), tw.mma_view())


def test_mma24_pack_is_the_documented_fragment_layout():
    """Spot checks of mma24.pack against the PTX fragment description, element by element: the
    16-bit A registers, the int4 code words and scale pairs, and the index words."""
    from sparsecraft.kernels.triton import mma24

    obj, _ = _make("nm", 32, 256, torch.float16, seed=4)
    tw = layout.prepare(obj)
    mw = mma24.pack(tw)
    vals = tw.values.view(torch.int16)  # (32, 128) kept values, 16 per 32-column step
    idx16 = tw.meta.view(torch.int16)  # (32, 16): 8 positions of 16 columns
    frag = mw.frags.view(torch.int16).reshape(2, 8, 32, 4, 2)  # mt, s, lane, register, 2 x 16 bits
    q = layout.prepare(_make("nm", 32, 256, torch.float16, 4, 128, True, seed=4)[0])
    qw = mma24.pack(q)
    codes = torch.stack([q.values.to(torch.int32) & 15, q.values.to(torch.int32) >> 4], -1).reshape(32, 128)
    for mt, s, lane in [(0, 0, 0), (1, 5, 13), (0, 7, 31), (1, 2, 6)]:
        g, t = lane // 4, lane % 4
        c, j = divmod(s, 4)
        word = int(qw.frags[mt, c, lane, j]) & 0xFFFFFFFF
        for half in range(2):
            k = 16 * s + 8 * half + 2 * t  # a0/a1 (half 0) or a2/a3 (half 1): kept values k, k + 1
            want = [vals[16 * mt + g, k], vals[16 * mt + g, k + 1], vals[16 * mt + g + 8, k],
                    vals[16 * mt + g + 8, k + 1]]
            assert frag[mt, s, lane, 2 * half:2 * half + 2].flatten().tolist() == [int(v) for v in want]
            for rh in range(2):  # nibble 4 h + 2 ch + rh holds code + 8 (mod 16)
                for h in range(2):
                    nib = word >> (4 * (4 * h + 2 * half + rh)) & 15
                    assert nib == (int(codes[16 * mt + 8 * rh + g, k + h]) ^ 8)
        if t < 2:
            word = int(mw.meta[mt, c, 2 * g + t, j]) & 0xFFFFFFFF
            lo, hi = (int(idx16[16 * mt + r, 2 * s + t]) & 0xFFFF for r in (g, g + 8))
            assert word == lo | hi << 16
        pair = qw.scales[mt, c].view(torch.float16).reshape(8, 2)[g]  # group c: rows g, g + 8
        assert pair.tolist() == [q.scales[16 * mt + g, c].item(), q.scales[16 * mt + g + 8, c].item()]


def test_mma24_fragment_x_is_the_b_operand_order():
    from sparsecraft.kernels.triton.mma24 import fragment_x

    x = torch.randn(11, 256).half()
    for nt, b in ((1, 3), (2, 11)):
        got = fragment_x(x[:b], nt)  # (K/32 steps, n-tiles, 32 lanes, 4 registers)
        for s, n, lane, r in [(0, 0, 0, 0), (7, nt - 1, 31, 3), (3, 0, 6, 2), (5, nt - 1, 9, 1)]:
            g, t = lane // 4, lane % 4
            row, col = 8 * n + g, 32 * s + 8 * r + 2 * t
            want = x[row, col:col + 2] if row < b else torch.zeros(2, dtype=torch.half)
            assert torch.equal(got[s, n, lane, r].reshape(1).view(torch.half), want)


def test_mma24_int4_dequant_ptx_emulated():
    """The dequantizing lines of the int4 MMA step (mma24._dequant_ptx) through the PTX emulator:
    a code word (nibble 4h + 2ch + rh holds u = code + 8) becomes registers a0..a3 holding the
    signed codes as fp16 pairs, exactly, for random words."""
    import numpy as np
    from ptx_emulator import run

    from sparsecraft.kernels.triton.mma24 import _dequant_ptx

    rng = np.random.default_rng(1)
    body = _dequant_ptx("$1")
    for trial in range(200):
        u = rng.integers(0, 16, 8) if trial else np.arange(8) * 2 + 1
        q = sum(int(v) << (4 * i) for i, v in enumerate(u))
        for j in range(4):  # a_j: ch = j // 2, rh = j % 2; lanes h = 0, 1
            got = run("\n".join(body + [f"mov.b32 $0, a{j};"]), {1: q})
            lo = np.array([got & 0xFFFF], dtype=np.uint16).view(np.float16)[0]
            hi = np.array([got >> 16], dtype=np.uint16).view(np.float16)[0]
            assert (float(lo), float(hi)) == (u[j] - 8.0, u[4 + j] - 8.0), (trial, j, u)


def test_mma24_unpack_inverts_pack():
    from sparsecraft.kernels.triton import mma24

    for dtype, bits, g in [(torch.bfloat16, 0, 32), (torch.float16, 4, 256)]:
        tw = layout.prepare(_make("nm", 48, 512, dtype, bits, g, True, seed=3)[0])
        back = mma24.unpack(mma24.pack(tw))
        assert torch.equal(back.values, tw.values) and torch.equal(back.meta, tw.meta)
        assert back.dtype == tw.dtype and (bits == 0 or torch.equal(back.scales, tw.scales))


def test_cuda_forward_mma24_layout_on_cpu_tensors(monkeypatch):
    """With MMA_TILES set, 2:4 weights are kept in the mma.sp layout alone: up to 16 rows of the
    packed dtype run the tensor-core kernel, other batches and dtypes decode it (also for a cached
    dense copy); int4 weights too."""
    from types import SimpleNamespace

    from sparsecraft.kernels.triton.mma24 import MmaWeight

    tile = dispatch.MmaTile
    tiles = {(0, 1): (tile(2, 2, 1), tile(4, 1, 2)), (0, 16): (tile(1, 1, 2, xfrag=True, pdl=False),) * 2,
             (4, 1): (tile(4, 1, 2, pdl=False),) * 2, (4, 8): (tile(2, 1, 4),) * 2,
             (0, 8): (tile(4, 4, 3),) * 2, (4, 16): (tile(4, 2, 3, xfrag=True),) * 2}
    for key, tile in tiles.items():
        monkeypatch.setitem(dispatch.MMA_TILES, key, tile)
    for bits in (0, 4):
        obj, ref_w = _make("nm", 32, 256, torch.float16, bits, 128, True, seed=8)
        mod = SimpleNamespace(weight_compressed=obj, bias=None, _cuda_weight=None)
        for batch, dtype in ((1, torch.float16), (9, torch.float16), (20, torch.float16), (3, torch.float16),
                             (2, torch.bfloat16)):
            x = torch.randn(batch, 256).to(dtype)
            y = dispatch.cuda_forward(mod, x)
            assert isinstance(mod._cuda_weight, MmaWeight) and y.shape == (batch, 32) and y.dtype == dtype
            _check(y, x.double() @ ref_w.t(), 2e-2 if dtype == torch.bfloat16 else 4e-3)
        # K split as far as the 2 chunks allow: over the grid, or (fp16 tile) over a program's 2 warps
        cfg = dispatch.mma_config(mod._cuda_weight, 1)
        assert (cfg.split_k, cfg.k_warps) == ((1, 2) if bits == 0 else (2, 1))
        assert dispatch.prepare_module(mod, "cpu", keep_dense=True)
        _check(mod._cuda_dense, ref_w, 1e-3)
    # a layer with more than 2 m-tiles per multiprocessor (8 "SMs" off the GPU) takes the wide tile
    wide = MmaWeight((16 * 17, 256), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    assert dispatch.mma_config(wide, 1).num_warps == 4 and dispatch.mma_config(wide, 1).k_warps == 1
