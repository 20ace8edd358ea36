"""Whole-model quantization through the engine, compressed storage and the CLI commands."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecraft.cli import main
from sparsecraft.formats import CompressConfig, load_compressed, save_compressed
from sparsecraft.models import load, prunable_linears, save, weight_matrix
from sparsecraft.quant import QuantConfig, quantize_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _pruned(source="random:tiny-llama", nm=True):
    model, tok = load(source, seed=0)
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        o, i = w.shape
        if nm:
            g = w.abs().view(o, i // 4, 4)
            w.mul_(torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True).view(o, i))
        else:
            w.mul_(torch.rand(o, i, generator=torch.Generator().manual_seed(o * i)) > 0.6)
    return model, tok


@pytest.mark.parametrize(
    "method,bits,sym,source",
    [
        ("rtn", 4, True, "random:tiny-llama"),
        ("gptq", 4, False, "random:tiny-llama"),
        ("gptq", 8, True, "random:tiny-gpt2"),
    ],
)
def test_quantized_model_keeps_zeros_and_round_trips(tmp_path, method, bits, sym, source):
    from sparsecraft.prune.engine import EngineOptions

    model, tok = _pruned(source)
    zeros = {n: weight_matrix(m) == 0 for n, m in prunable_linears(model).items()}
    results, report = quantize_model(
        model,
        tok,
        QuantConfig(bits=bits, group_size=32, symmetric=sym, method=method),
        calibration=CALIB,
        options=EngineOptions(device="cpu", progress=False),
    )
    for name, layer in prunable_linears(model).items():
        assert (weight_matrix(layer)[zeros[name]] == 0).all(), name
        assert torch.equal(results[name].mask, ~zeros[name])
    assert report["sparsity_after"] >= report["sparsity_before"] == pytest.approx(0.5)
    logits = model(IDS).logits
    for fmt in ("auto", "bitmask"):
        out = save_compressed(model, tok, tmp_path / fmt, CompressConfig(format=fmt), quantized=results)
        assert torch.equal(load_compressed(out)[0](IDS).logits, logits)
    cc = json.loads((tmp_path / "auto" / "config.json").read_text())["compression_config"]
    weights = cc["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights == {
        "num_bits": bits,
        "group_size": 32,
        "symmetric": sym,
        "type": "int",
        "strategy": "group",
    }
    assert cc["format"] == "nm"  # 2:4 int codes are smallest as packed N:M


def test_cli_quantize_compress_decompress(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model, tok = _pruned(nm=False)
    src = save(model, tok, tmp_path / "sparse")
    q = tmp_path / "q8"
    assert (
        main(
            [
                "quantize",
                str(src),
                "--bits",
                "8",
                "--group-size",
                "32",
                "--asym",
                "--out",
                str(q),
                "--json",
                str(tmp_path / "q.json"),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "q.json").read_text())
    assert rep["size"]["total"]["bits_per_weight"] < 8 * (1 - 0.6) + 1 + 2  # bitmask codes + scales
    qmodel, _ = load_compressed(q)
    ref = qmodel(IDS).logits
    assert main(["compress", str(q), "--format", "dense", "--out", str(tmp_path / "qd")]) == 0
    assert main(["decompress", str(tmp_path / "qd"), "--out", str(tmp_path / "plain")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(plain(IDS).logits, ref)
    # bad input: a clear one-line error and exit code 2, nothing written
    capsys.readouterr()
    assert main(["compress", str(src), "--format", "nm", "--out", str(tmp_path / "bad")]) == 2
    assert "not 2:4" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["decompress", str(src), "--out", str(tmp_path / "bad")]) == 2
    assert "not a compressed checkpoint" in capsys.readouterr().err
