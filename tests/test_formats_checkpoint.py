"""Whole-model compressed checkpoints: identical logits, plain-transformers export, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.formats import (
    CompressConfig,
    CompressedLinear,
    decompress,
    describe,
    is_compressed_dir,
    load_compressed,
    save_compressed,
)
from sparsecraft.formats.checkpoint import WEIGHTS_FILE
from sparsecraft.models import load, prunable_linears, weight_matrix


def _sparse_model(source: str, nm: bool, sparsity: float = 0.5):
    model, tok = load(source, seed=0)
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        out_f, in_f = w.shape
        if nm:
            g = w.abs().view(out_f, in_f // 4, 4)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True)
            w.mul_(keep.view(out_f, in_f))
        else:
            k = int(in_f * sparsity)
            idx = w.abs().argsort(1)[:, :k]
            w.scatter_(1, idx, 0.0)
    return model, tok


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", ["random:tiny-llama", "random:tiny-gpt2"])
@pytest.mark.parametrize("fmt", ["bitmask", "nm", "auto"])
def test_save_load_gives_identical_logits(tmp_path, source, fmt):
    model, tok = _sparse_model(source, nm=True)
    ref = model(IDS).logits
    out = save_compressed(model, tok, tmp_path / "ck", CompressConfig(format=fmt))
    assert is_compressed_dir(out) and not (out / "model.safetensors").exists()
    dense_model, tok2 = load_compressed(out)
    assert torch.equal(dense_model(IDS).logits, ref)
    assert tok2 is not None and tok2.encode("abc") == tok.encode("abc")
    compressed, _ = load_compressed(out, dense=False)
    n_compressed = sum(isinstance(m, CompressedLinear) for m in compressed.modules())
    assert n_compressed == len(prunable_linears(model))
    torch.testing.assert_close(compressed(IDS).logits, ref, rtol=0, atol=1e-5)


def test_config_uses_compressed_tensors_field_names(tmp_path):
    model, tok = _sparse_model("random:tiny-llama", nm=True)
    out = save_compressed(model, tok, tmp_path / "ck", CompressConfig(format="nm"))
    cc = json.loads((out / "config.json").read_text())["compression_config"]
    sc = cc["sparsity_config"]
    assert cc["format"] == "nm" and sc["sparsity_structure"] == "2:4"
    assert set(sc) >= {"format", "targets", "ignore", "sparsity_structure"}
    assert len(sc["targets"]) == len(prunable_linears(model)) and sc["ignore"] == ["lm_head"]
    assert sc["global_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("source", ["random:tiny-llama", "random:tiny-gpt2"])
def test_decompress_loads_in_plain_transformers(tmp_path, source):
    from transformers import AutoModelForCausalLM

    model, tok = _sparse_model(source, nm=False, sparsity=0.7)
    ref = model(IDS).logits
    ck = save_compressed(model, tok, tmp_path / "ck", CompressConfig(format="bitmask"))
    plain = decompress(ck, tmp_path / "plain")
    assert "compression_config" not in json.loads((plain / "config.json").read_text())
    m2 = AutoModelForCausalLM.from_pretrained(plain)
    assert torch.equal(m2(IDS).logits, ref)


def test_float16_cast_and_describe_bits(tmp_path):
    model, tok = _sparse_model("random:tiny-llama", nm=False, sparsity=0.5)
    out = save_compressed(model, tok, tmp_path / "ck", CompressConfig(format="bitmask", dtype=torch.float16))
    d = describe(out)
    for name, row in d["layers"].items():
        o, i = row["shape"]
        kept = o * (i - int(i * 0.5))
        want_bytes = o * -(-i // 8) + kept * 2 + (o + 1) * 8
        assert row["bytes"] == want_bytes, name
        assert row["bits_per_weight"] == pytest.approx(8 * want_bytes / (o * i))
        assert row["dtype"] == "float16" and row["sparsity"] == pytest.approx(0.5)
    assert d["bytes_on_disk"] == (out / WEIGHTS_FILE).stat().st_size
    m2, _ = load_compressed(out)
    assert next(m2.parameters()).dtype == torch.float16
    plain = describe(model)
    assert plain["total"]["bits_per_weight"] == 32.0


def test_nm_refuses_unstructured_model_and_leaves_no_partial_output(tmp_path):
    model, tok = _sparse_model("random:tiny-llama", nm=False, sparsity=0.5)
    target = tmp_path / "ck"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(SparsecraftError, match="not 2:4"):
        save_compressed(model, tok, target, CompressConfig(format="nm"))
    assert (target / "keep.txt").read_text() == "old"  # the old directory is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    model, tok = _sparse_model("random:tiny-llama", nm=True)
    out = save_compressed(model, tok, tmp_path / "ck", CompressConfig(format="bitmask"))
    f = out / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SparsecraftError, match="checksum mismatch"):
        load_compressed(out)
    f.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(SparsecraftError, match="corrupt or truncated"):
        load_compressed(out, verify=False)
    (out / "config.json").write_text("{not json")
    with pytest.raises(SparsecraftError, match="not valid JSON"):
        load_compressed(out)


def test_plain_directory_is_not_mistaken_for_compressed(tmp_path):
    from sparsecraft.models import save

    model, tok = load("random:tiny-llama")
    plain = save(model, tok, tmp_path / "plain")
    with pytest.raises(SparsecraftError, match="plain model directory"):
        load_compressed(plain)
