"""Real SmolLM2-135M layers: partial last group (576 = 4*128 + 64) and exact bit counts."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.formats import BitmaskTensor, NMTensor
from sparsecraft.quant import rtn_quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layers():
    from sparsecraft.models import load, prunable_linears, weight_matrix

    model, _ = load("smollm2-135m")
    lin = prunable_linears(model)
    return {
        k: weight_matrix(lin[f"model.layers.3.{k}"]).clone() for k in ("self_attn.k_proj", "mlp.down_proj")
    }


def _two_four(w):
    o, i = w.shape
    g = w.abs().view(o, i // 4, 4)
    return w * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True).view(o, i)


def test_smollm2_nm_int4_partial_group_and_bits(layers):
    for name, w in layers.items():
        w = _two_four(w)
        o, i = w.shape
        t16 = NMTensor.from_dense(w.half(), 2, 4)
        assert 8 * t16.nbytes() / w.numel() == 9.0  # 8 bits of value + 1 bit of index per weight
        assert torch.equal(t16.to_dense(), w.half())
        qw = rtn_quantize(w, None, 4, 128, True)
        groups = -(-i // 128)
        assert qw.info.scales.shape == (o, groups)  # k_proj: 576 inputs -> 5 groups, the last of 64
        t4 = NMTensor.from_codes(qw.codes, qw.mask, qw.info, torch.float32, 2, 4)
        assert torch.equal(t4.to_dense(), qw.dequantize())
        assert 8 * t4.nbytes() / w.numel() == pytest.approx(3 + 16 * groups / i), name
        b = BitmaskTensor.from_codes(qw.codes, qw.mask, qw.info, torch.float32)
        assert torch.equal(b.to_dense(), qw.dequantize())
