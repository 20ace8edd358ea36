"""Activation-aware scaling (quant.awq): folds keep the function, zeros stay zeros, the search is
the brute-force argmin, and scaling helps RTN on an outlier input channel."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecraft.cli import main
from sparsecraft.errors import SparsecraftError
from sparsecraft.models import decoder_blocks, prunable_linears, weight_matrix
from sparsecraft.prune.engine import EngineOptions
from sparsecraft.quant import QuantConfig, quantize_model
from sparsecraft.quant.awq import (
    apply_fold,
    awq_scale,
    awq_scale_model,
    plan_folds,
    rtn_quantizer,
    scale_columns,
    scale_rows,
    search_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
OPTS = dict(device="cpu", progress=False)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _close(a, b, tol=1e-4):
    return float((a - b).abs().max() / b.abs().max()) < tol


def _prune(model, keep=0.5):
    gen = torch.Generator().manual_seed(3)
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        w.mul_(torch.rand(w.shape, generator=gen) < keep)


def test_folds_of_a_llama_block_keep_the_logits(tiny):
    model, _ = tiny("tiny-llama")
    ref = _logits(model)
    folds, skipped = plan_folds(model, CALIB[:1, :16])
    kinds = {f.consumers: (f.kind, f.source) for f in folds}
    assert kinds[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")] == ("norm", "input_layernorm")
    assert kinds[("mlp.gate_proj", "mlp.up_proj")] == ("norm", "post_attention_layernorm")
    assert kinds[("mlp.down_proj",)] == ("rows", "mlp.up_proj")  # not gate_proj: SiLU is not homogeneous
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert any(s.startswith("self_attn.o_proj") for s in skipped)  # GQA: v_proj is narrower than o's input
    gen = torch.Generator().manual_seed(0)
    _, blocks = decoder_blocks(model)
    for block in blocks:  # strong random scales on every fold of every block
        for f in folds:
            width = weight_matrix(block.get_submodule(f.consumers[0])).shape[1]
            apply_fold(block, f, 4.0 ** (torch.rand(width, generator=gen) * 2 - 1))
    assert _close(_logits(model), ref)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma", "tiny-opt"])
def test_awq_model_is_function_preserving_and_keeps_zeros(tiny, arch):
    model, _ = tiny(arch)
    _prune(model)
    zeros = {n: weight_matrix(m) == 0 for n, m in prunable_linears(model).items()}
    ref = _logits(model)
    cfg = QuantConfig(bits=4, group_size=16, awq=True)
    report = awq_scale_model(model, CALIB, cfg, EngineOptions(**OPTS))
    assert _close(_logits(model), ref)
    for n, m in prunable_linears(model).items():
        assert torch.equal(weight_matrix(m) == 0, zeros[n]), n
    assert report["groups_scaled"] == len(report["groups"]) > 0
    assert all(r["error_ratio"] <= 1.0 + 1e-6 for r in report["groups"])  # α = 0 is on the grid
    if arch == "tiny-gemma":  # its norm applies (1 + w): the probe refuses the norm folds
        assert not any("layernorm" in f for f in report["folds"])


def test_scaling_keeps_zeros_and_rows_fold_bias():
    w = torch.randn(6, 10) * (torch.rand(6, 10) > 0.5)
    s = torch.rand(10) + 0.1
    assert torch.equal(scale_columns(w, s) == 0, w == 0)
    b = torch.randn(6)
    w2, b2 = scale_rows(w, b, s[:6])
    assert torch.allclose(w2 * s[:6, None], w) and torch.allclose(b2 * s[:6], b)
    a = torch.rand(10) + 1e-3
    s = awq_scale(a, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(awq_scale(a, 0.0), torch.ones(10))  # α = 0: no scaling


def _outlier_layer(seed=0, rows=8, cols=64, tokens=256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen)
    x[:, 3] *= 40.0  # one salient input channel
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) > 0.5)
    return w, x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_is_the_brute_force_argmin(seed):
    w, x = _outlier_layer(seed)
    x[:, 10] *= 0.1 + seed  # make each seed's statistic different
    cfg = QuantConfig(bits=4, group_size=16, symmetric=seed % 2 == 0)
    q = rtn_quantizer(cfg, "test")
    found = search_scale([w], x.t() @ x, x.abs().mean(0), q, grid=10)
    errs = []
    for k in range(10):  # the definition, on the tokens themselves
        s = x.abs().mean(0) ** (k / 10)
        s = s / torch.sqrt(s.max() * s.min())
        wq = q(w * s) / s
        errs.append(float(((x @ w.t() - x @ wq.t()) ** 2).sum()))
    assert found.alpha == pytest.approx(errs.index(min(errs)) / 10)
    assert found.error == pytest.approx(min(errs), rel=1e-3)


def test_awq_lowers_rtn_int4_error_on_an_outlier_channel():
    w, x = _outlier_layer()
    cfg = QuantConfig(bits=4, group_size=32, symmetric=False)
    q = rtn_quantizer(cfg, "test")
    plain = float(((x @ w.t() - x @ q(w).t()) ** 2).sum())
    found = search_scale([w], x.t() @ x, x.abs().mean(0), q)
    s = found.scale
    scaled = float(((x @ w.t() - (x / s) @ q(w * s).t()) ** 2).sum())
    assert found.alpha > 0 and scaled < 0.7 * plain


def test_quantize_model_and_cli_with_awq(tiny, tmp_path):
    model, tok = tiny("tiny-llama")
    _prune(model)
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in prunable_linears(model).values())
    cfg = QuantConfig(bits=4, group_size=16, method="rtn", awq=True, nsamples=4, seqlen=32)
    _, report = quantize_model(model, tok, cfg, calibration=CALIB, options=EngineOptions(**OPTS))
    assert report["quantization"]["awq"] is True and report["awq"]["groups_scaled"] > 0
    assert report["sparsity_before"] * report["weights"] == zeros
    out = tmp_path / "q"
    rc = main(["quantize", "random:tiny-llama", "--bits", "4", "--group-size", "16", "--awq", "--asym",
               "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(out),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["quantization"]["awq"] is True and rep["awq"]["folds"]


def test_config_validation():
    with pytest.raises(SparsecraftError, match="awq_grid"):
        QuantConfig(awq=True, awq_grid=1)
    assert "awq_grid" not in QuantConfig().meta() and QuantConfig(awq=True).meta()["awq_grid"] == 20

