"""SparseLinear / convert: the sparse runtime must compute what the dense-with-zeros model computes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.formats import BitmaskTensor, NMTensor
from sparsecraft.models import load
from sparsecraft.models.discovery import prunable_linears, set_weight_matrix, weight_matrix
from sparsecraft.prune.masks import layer_mask, nm_mask
from sparsecraft.runtime import (
    DenseKernelLinear,
    SparseLinear,
    convert,
    greedy_identity,
    sparse_layers,
    weight_bytes,
)


def _pruned(name: str, sparsity: float = 0.6, nm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model, _ = load(f"random:{name}")
    model.eval()
    with torch.no_grad():
        for layer in prunable_linears(model).values():
            w = weight_matrix(layer)
            keep = nm_mask(w.abs(), 2, 4) if nm else layer_mask(w.abs(), sparsity)
            set_weight_matrix(layer, w * keep)
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
@pytest.mark.parametrize("fmt", ["bitmask", "nm"])
def test_converted_model_matches_dense_with_zeros(name, fmt):
    dense = _pruned(name, nm=fmt == "nm")
    sparse = convert(copy.deepcopy(dense), format=fmt)
    layers = sparse_layers(sparse)
    assert len(layers) == len(prunable_linears(dense)) > 0
    assert all(layer.uses_cpu_kernel for layer in layers.values())
    a, b = _logits(dense, IDS), _logits(sparse, IDS)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # single-token decode steps with KV cache, greedy: identical tokens
    ident = greedy_identity(dense, sparse, IDS[:1, :5], new_tokens=12)
    assert ident["identical"], ident


def test_quantized_values_match_dequantized_dense():
    dense = _pruned("tiny-llama", 0.7)
    sparse = convert(copy.deepcopy(dense), format="bitmask", bits=8, group_size=32)
    ref = copy.deepcopy(dense)
    with torch.no_grad():  # the dense model holding exactly the dequantized weights
        for name, layer in prunable_linears(ref).items():
            set_weight_matrix(layer, sparse.get_submodule(name).dense_weight())
    a, b = _logits(ref, IDS), _logits(sparse, IDS)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # zeros stay zeros through quantization
    for name, layer in prunable_linears(dense).items():
        assert torch.equal(sparse.get_submodule(name).dense_weight() != 0, weight_matrix(layer) != 0)


def test_int8_lm_head_and_weight_bytes():
    dense = _pruned("tiny-llama", 0.7)
    sparse = convert(copy.deepcopy(dense), format="bitmask", bits=8, lm_head_int8=True)
    head = sparse.get_output_embeddings()
    assert isinstance(head, SparseLinear) and head.weight_compressed.quant.bits == 8
    a, b = _logits(dense, IDS), _logits(sparse, IDS)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert weight_bytes(sparse)["linear_bytes"] < weight_bytes(dense)["linear_bytes"] / 3


def test_lm_head_runs_on_the_dense_kernel_and_stays_tied():
    dense = _pruned("tiny-llama", 0.7)
    sparse = convert(copy.deepcopy(dense), format="bitmask")
    head = sparse.get_output_embeddings()
    assert isinstance(head, DenseKernelLinear) and isinstance(head, nn.Linear)
    if dense.config.tie_word_embeddings:
        assert head.weight is sparse.get_input_embeddings().weight
    a, b = _logits(dense, IDS), _logits(sparse, IDS)  # 22 rows: torch; one row below: the kernel
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    x = torch.randn(3, head.in_features)
    with torch.inference_mode():
        assert torch.allclose(head(x), x @ head.weight.T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # re-bound when the Parameter's storage changes (re-tied, reloaded)
        head.weight.data = head.weight.data * 2
        assert torch.allclose(head(x), x @ head.weight.T, rtol=1e-5, atol=1e-5)
    off = convert(copy.deepcopy(dense), format="bitmask", lm_head_kernel=False)
    assert type(off.get_output_embeddings()) is nn.Linear


def test_dense_fallback_for_large_batches_and_gradients():
    w = torch.randn(24, 40)
    w[w.abs() < 0.8] = 0
    bias = torch.randn(24)
    layer = SparseLinear(BitmaskTensor.from_dense(w), bias, max_kernel_batch=4)
    x = torch.randn(3, 5, 40)  # 15 rows > 4: dense path
    ref = x @ w.T + bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(layer(x[:1, :3]), ref[:1, :3], atol=1e-5)  # kernel path
    xg = x.clone().requires_grad_(True)
    layer.max_kernel_batch = 64
    layer(xg).sum().backward()  # gradient flows through the dense path
    assert torch.allclose(xg.grad, w.sum(0).expand_as(x), atol=1e-5)
    # non-contiguous and bf16 inputs take the general path, same numbers
    xt = torch.randn(40, 2).T
    assert torch.allclose(layer(xt), xt @ w.T + bias, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_refuses_bad_and_mismatched_inputs():
    w = torch.randn(8, 16)
    w[w.abs() < 1] = 0
    ct = BitmaskTensor.from_dense(w)
    with pytest.raises(SparsecraftError, match="compressed tensor"):
        SparseLinear(w)
    broken = BitmaskTensor(ct.shape, ct.dtype, ct.mask, ct.values[:-1].clone(), ct.row_offsets)
    with pytest.raises(SparsecraftError, match="do not match|row_offsets"):
        SparseLinear(broken)
    layer = SparseLinear(ct)
    with pytest.raises(SparsecraftError, match="features"):
        layer(torch.randn(2, 17))
    with pytest.raises(SparsecraftError, match="bias"):
        SparseLinear(ct, torch.zeros(9))
    model = _pruned("tiny-llama", 0.5)  # unstructured: not 2:4
    with pytest.raises(SparsecraftError, match="not 2:4"):
        convert(copy.deepcopy(model), format="nm")
    with pytest.raises(SparsecraftError, match="format"):
        convert(copy.deepcopy(model), format="csr")
    with pytest.raises(SparsecraftError, match="bits"):
        convert(copy.deepcopy(model), bits=3)
    with pytest.raises(SparsecraftError, match="group_size"):
        convert(copy.deepcopy(model), bits=8, group_size=100)


def test_convert_wraps_compressed_linear_and_keeps_dtype_choice():
    from sparsecraft.formats.checkpoint import CompressedLinear

    dense = _pruned("tiny-llama", 0.5, nm=True)
    name, layer = next(iter(prunable_linears(dense).items()))
    holder = copy.deepcopy(dense)
    parent, _, child = name.rpartition(".")
    setattr(
        holder.get_submodule(parent), child, CompressedLinear(NMTensor.from_dense(weight_matrix(layer)), None)
    )
    out = convert(holder, format="bitmask", dtype=torch.bfloat16)
    assert isinstance(out.get_submodule(name).weight_compressed, NMTensor)  # kept as stored
    others = [m for n, m in sparse_layers(out).items() if n != name]
    assert others and all(m.weight_compressed.values.dtype == torch.bfloat16 for m in others)


@pytest.mark.parametrize(
    "kw",
    [
        {"format": "bitmask"},
        {"format": "bitmask", "bits": 8, "group_size": 64},
        {"format": "bitmask", "bits": 4, "group_size": 32, "symmetric": False},
        {"format": "nm", "bits": 8, "group_size": 32},
    ],
)
def test_fused_siblings_are_bit_identical_and_share_storage(kw):
    dense = _pruned("tiny-qwen2", nm=kw["format"] == "nm")  # qwen2: q/k/v carry biases
    plain = convert(copy.deepcopy(dense), fuse=False, **kw)
    fused = convert(copy.deepcopy(dense), **kw)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.q_proj._group is attn.v_proj._group is not None
    assert mlp.gate_proj._group is mlp.up_proj._group is not None and mlp.down_proj._group is None
    assert plain.model.layers[0].self_attn.q_proj._group is None
    # the members' weights are views of the stacked weight: nothing copied
    g = attn.k_proj._group
    stacked_ptr = g.kernel.keep[1].untyped_storage().data_ptr()
    assert attn.k_proj.weight_compressed.values.untyped_storage().data_ptr() == stacked_ptr
    assert torch.equal(_logits(plain, IDS), _logits(fused, IDS))  # prefill: 22 rows
    assert torch.equal(_logits(plain, IDS[:1, :1]), _logits(fused, IDS[:1, :1]))  # one row
    ident = greedy_identity(plain, fused, IDS[:1, :5], new_tokens=8)
    assert ident["identical"], ident
    for name in ("q_proj", "k_proj", "v_proj"):  # a member's weight decompresses to its own rows
        a = plain.model.layers[1].self_attn.get_submodule(name).dense_weight()
        assert torch.equal(a, fused.model.layers[1].self_attn.get_submodule(name).dense_weight())


def test_fused_member_on_another_input_computes_its_own_output():
    dense = _pruned("tiny-llama")
    fused = convert(copy.deepcopy(dense), format="bitmask")
    attn = fused.model.layers[0].self_attn
    ref = dense.model.layers[0].self_attn
    x, z = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)
    with torch.inference_mode():
        q = attn.q_proj(x)  # computes q, k and v of x
        k_z = attn.k_proj(z)  # not x: computed for z (the group now holds z's q and v)
        v_x = attn.v_proj(x)  # x again: computed afresh, not z's cached v
        k_x = attn.k_proj(x)  # x's cached k, from the call just before
        for got, layer, inp in ((q, "q_proj", x), (k_z, "k_proj", z), (v_x, "v_proj", x), (k_x, "k_proj", x)):
            want = ref.get_submodule(layer)(inp)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), layer


def test_fused_groups_without_cpu_kernels_and_of_dense_linears():
    """Layers without a CPU kernel (as on a GPU) share a stacked SparseLinear, the only one whose
    device layout is prepared; plain nn.Linear siblings (a dense baseline) share a stacked nn.Linear
    whose rows their weights view. Outputs match the unfused layers'."""
    from sparsecraft.kernels.triton.dispatch import prepare_model
    from sparsecraft.runtime.fuse import fuse, fuse_siblings

    dense = _pruned("tiny-qwen2")  # q/k/v carry biases
    ref = copy.deepcopy(dense)
    attn, ref_attn = dense.model.layers[0].self_attn, ref.model.layers[0].self_attn
    names = ("q_proj", "k_proj", "v_proj")
    holder = nn.Module()
    for n in names:
        lin = getattr(attn, n)
        weight = BitmaskTensor.from_dense(lin.weight.detach())
        holder.add_module(n, SparseLinear(weight, lin.bias, kernels="torch"))
    layers = [getattr(holder, n) for n in names]
    assert fuse(layers) and layers[0]._group.module is not None and not layers[0].uses_cpu_kernel
    x = torch.randn(2, 3, attn.q_proj.in_features)
    with torch.inference_mode():
        for n, layer in zip(names, layers):
            torch.testing.assert_close(layer(x), getattr(ref_attn, n)(x), rtol=1e-5, atol=1e-5)
    assert prepare_model(holder, "cpu") == 3  # the group's stacked layer: one layout for three
    assert layers[0]._group.module._cuda_weight is not None and all(m._cuda_weight is None for m in layers)

    assert fuse_siblings(dense, dense=True) == 2 * len(dense.model.layers)
    group = attn.q_proj._group
    assert attn.v_proj._group is group and isinstance(attn.k_proj, nn.Linear)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == group.module.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(_logits(dense, IDS), _logits(ref, IDS), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(dense, IDS[:1, :1]), _logits(ref, IDS[:1, :1]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_sparse_runtime_is_token_identical():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cpu_kernels import prune_in_place

    model, tok = load("smollm2-135m")
    prune_in_place(model, 0.7)
    sparse = convert(copy.deepcopy(model), format="bitmask")
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    ident = greedy_identity(model, sparse, prompt, new_tokens=64)
    assert ident["identical"], ident


def test_module_tree_is_plain_torch():
    model = convert(_pruned("tiny-llama", 0.5), format="bitmask")
    assert isinstance(model, nn.Module)
    assert "SparseLinear(in=" in repr(model)


def test_bench_cli_reports_every_variant(tmp_path):
    import json

    from sparsecraft.cli import main

    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "random:tiny-llama",
            "--magnitude",
            "2:4",
            "--prompt-len",
            "4",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--formats",
            "bitmask",
            "nm-int8+head8",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["variants"]) == ["dense (torch)", "bitmask", "nm-int8+head8"]
    for row in res["variants"].values():
        assert row["tokens_per_s"] > 0 and row["linear_weight_mb"] > 0
        assert "mlp.down_proj" in row["layers"] and row["layers"]["mlp.down_proj"]["bound_us"] >= 0
    dense, q = res["variants"]["dense (torch)"], res["variants"]["nm-int8+head8"]
    assert q["linear_weight_mb"] < dense["linear_weight_mb"] / 2
    assert res["stream_read_gbs"] > 0
    assert main(["bench", "random:tiny-llama", "--formats", "csr"]) == 2
    assert main(["bench", "random:tiny-llama", "--device", "tpu"]) == 2
