"""The sequential engine on tiny models of every supported family, sharing, resume, OWL."""

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.models import build_random, prunable_linears, weight_matrix
from sparsecraft.prune import EngineOptions, PruneConfig, SolveResult, prune, run_sequential
from sparsecraft.prune.masks import nm_valid, prune_count

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gemma2", "tiny-phi3", "tiny-opt", "tiny-gpt2", "tiny-gpt-neox"]


def _calib(n=4, seqlen=48, seed=0):
    return torch.randint(3, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _model(name):
    model, tok = build_random(name)
    return model.eval(), tok


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_prunes_every_architecture(arch):
    model, tok = _model(arch)
    ids = _calib()
    before = model(ids).logits
    cfg = PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2, blocksize=16)
    report = prune(model, tok, cfg, ids, progress=False)
    layers = prunable_linears(model)
    assert len(report["layers"]) == len(layers) > 0
    for name, layer in layers.items():
        w = weight_matrix(layer)
        assert abs(float((w == 0).float().mean()) - 0.5) < 1e-3, name
    rec = report["layers"][0]
    assert 0 < rec["rel_error"] < 1 and rec["error_measure"] == "exact"
    after = model(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    t = report["timing"]
    assert t["forward_s"] > 0 and t["solve_s"] > 0 and t["statistics_s"] > 0


def test_wanda_row_sparsity_and_nm_on_conv1d():
    model, tok = _model("tiny-gpt2")  # Conv1D layers: weight stored (in, out)
    prune(model, tok, PruneConfig(method="wanda", pattern="2:4", batch_size=2), _calib(), progress=False)
    for layer in prunable_linears(model).values():
        assert nm_valid(weight_matrix(layer), 2, 4)
    model, tok = _model("tiny-llama")
    prune(model, tok, PruneConfig(method="wanda", sparsity=0.6, batch_size=2), _calib(), progress=False)
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        assert ((w == 0).sum(1) == prune_count(w.shape[1], 0.6)).all()


class _Recorder:
    """A solver that leaves weights alone and records which layers got which stats object."""

    needs_hessian = False

    def __init__(self):
        self.stats = {}

    def solve(self, name, layer, weight, stats):
        self.stats[name] = stats
        return weight


def test_layers_with_the_same_input_share_statistics():
    model, _ = _model("tiny-llama")
    rec = _Recorder()
    run_sequential(model, _calib(), rec, EngineOptions(batch_size=2, progress=False))
    s = rec.stats
    p = "model.layers.0."
    assert s[p + "self_attn.q_proj"] is s[p + "self_attn.k_proj"] is s[p + "self_attn.v_proj"]
    assert s[p + "mlp.gate_proj"] is s[p + "mlp.up_proj"]
    assert s[p + "self_attn.o_proj"] is not s[p + "self_attn.q_proj"]
    assert s[p + "mlp.down_proj"] is not s[p + "mlp.gate_proj"]
    assert s[p + "mlp.down_proj"].count == 4 * 48  # every calibration token, counted once


def test_statistics_equal_the_layer_inputs():
    """LayerStats of block 0's q_proj equal statistics of the actual q_proj input."""
    model, _ = _model("tiny-llama")
    ids = _calib()
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    model(ids)
    h.remove()
    x = torch.cat(seen).double()
    rec = _Recorder()
    run_sequential(model, ids, rec, EngineOptions(batch_size=2, progress=False))
    st = rec.stats["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(st.sqnorm.double(), (x**2).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.mean.double(), x.mean(0), rtol=1e-4, atol=1e-5)


def test_true_sequential_sees_pruned_earlier_groups():
    ids = _calib()
    outs = {}
    for ts in (False, True):
        model, tok = _model("tiny-llama")
        cfg = PruneConfig(method="wanda", sparsity=0.5, batch_size=2, true_sequential=ts)
        prune(model, tok, cfg, ids, progress=False)
        outs[ts] = {n: weight_matrix(la).clone() for n, la in prunable_linears(model).items()}
    first = "model.layers.0.self_attn.q_proj"
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(outs[False][first], outs[True][first])  # same inputs for the first group
    assert not torch.equal(outs[False][down], outs[True][down])  # later groups see pruned inputs


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    ids = _calib()
    cfg = PruneConfig(method="sparsegpt", sparsity=0.6, batch_size=2, blocksize=16)
    ref_model, tok = _model("tiny-llama")
    prune(ref_model, tok, cfg, ids, progress=False)
    ref = {n: weight_matrix(la).clone() for n, la in prunable_linears(ref_model).items()}

    model, tok = _model("tiny-llama")
    import sparsecraft.prune.sparsegpt as sg

    original = sg.sparsegpt_prune

    def crash_in_block_1(weight, hessian, *a, name="", **k):
        if ".layers.1." in name:
            raise _Crash
        return original(weight, hessian, *a, name=name, **k)

    sg.sparsegpt_prune = crash_in_block_1
    try:
        with pytest.raises(_Crash):
            prune(model, tok, cfg, ids, checkpoint_dir=tmp_path / "ck", progress=False)
    finally:
        sg.sparsegpt_prune = original
    # a fresh process would reload the dense model: do the same
    model, tok = _model("tiny-llama")
    report = prune(model, tok, cfg, ids, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert report["resumed_from_block"] == 1
    assert len(report["layers"]) == len(ref)
    for n, la in prunable_linears(model).items():
        assert torch.equal(weight_matrix(la), ref[n]), n


def test_resume_with_another_recipe_is_refused(tmp_path):
    ids = _calib()
    model, tok = _model("tiny-llama")
    prune(
        model,
        tok,
        PruneConfig(method="wanda", sparsity=0.5, batch_size=2),
        ids,
        checkpoint_dir=tmp_path / "ck",
        progress=False,
    )
    model, tok = _model("tiny-llama")
    with pytest.raises(SparsecraftError, match="different recipe"):
        prune(
            model,
            tok,
            PruneConfig(method="wanda", sparsity=0.6, batch_size=2),
            ids,
            checkpoint_dir=tmp_path / "ck",
            resume=True,
            progress=False,
        )


def test_owl_profile_mean_is_exact_and_spread_bounded():
    model, tok = _model("tiny-llama")
    report = prune(
        model,
        tok,
        PruneConfig(method="wanda", sparsity=0.7, profile="owl", owl_lambda=0.08, batch_size=2),
        _calib(),
        progress=False,
    )
    sp = report["owl"]["block_sparsity"]
    assert sum(sp) / len(sp) == pytest.approx(0.7, abs=1e-12)
    assert max(sp) - min(sp) == pytest.approx(0.16, abs=1e-9)
    ratios = report["owl"]["outlier_ratios"]
    assert sp[ratios.index(max(ratios))] == min(sp)  # most outliers, least pruned


def test_nan_weights_are_reported():
    model, tok = _model("tiny-llama")
    weight_matrix(model.model.layers[1].mlp.up_proj)[0, 0] = float("nan")
    with pytest.raises(SparsecraftError, match="NaN"):
        prune(model, tok, PruneConfig(method="wanda", sparsity=0.5, batch_size=2), _calib(), progress=False)


def test_nm_on_indivisible_layer_is_refused_up_front():
    model, tok = _model("tiny-llama")
    before = {n: weight_matrix(la).clone() for n, la in prunable_linears(model).items()}
    with pytest.raises(SparsecraftError, match="not divisible by M=3"):
        prune(model, tok, PruneConfig(method="wanda", pattern="2:3", batch_size=2), _calib(), progress=False)
    for n, la in prunable_linears(model).items():
        assert torch.equal(weight_matrix(la), before[n])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="sgpt", sparsity=0.5), "method 'sgpt'"),
        (dict(method="wanda"), "exactly one of sparsity"),
        (dict(method="wanda", sparsity=0.5, pattern="2:4"), "exactly one of sparsity"),
        (dict(method="wanda", sparsity=1.0), r"must be in \[0, 1\)"),
        (dict(method="wanda", pattern="4:2"), "1 <= N < M"),
        (dict(method="wanda", pattern="2:4", profile="owl"), "profile owl"),
        (dict(method="wanda", sparsity=0.5, refine="sparse"), "refine"),
        (dict(method="wanda", sparsity=0.5, calib_dtype="int8"), "calib_dtype"),
    ],
)
def test_config_validation_messages(kwargs, match):
    with pytest.raises(SparsecraftError, match=match):
        PruneConfig(**kwargs)


def test_custom_solver_protocol_and_bf16_fast_mode():
    """Any object with needs_hessian/solve plugs in (the GPTQ path); bf16 forwards keep fp32 masters."""
    model, _ = _model("tiny-llama")

    class Halve:
        needs_hessian = True

        def solve(self, name, layer, weight, stats):
            assert stats.hessian is not None and weight.dtype == torch.float32
            return SolveResult(weight * 0.5, info={"seen": stats.count})

    before = weight_matrix(model.model.layers[1].mlp.down_proj).clone()
    rep = run_sequential(
        model,
        _calib(),
        Halve(),
        EngineOptions(batch_size=2, forward_dtype=torch.bfloat16, bf16_hessian=True, progress=False),
    )
    after = weight_matrix(model.model.layers[1].mlp.down_proj)
    assert after.dtype == torch.float32
    torch.testing.assert_close(after, before * 0.5)
    assert rep.forward_dtype == "bfloat16" and rep.layers[0].info["seen"] == 4 * 48
    assert rep.layers[0].rel_error == pytest.approx(0.5, rel=1e-3)
