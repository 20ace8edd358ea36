"""`sparsecraft prune` / `sparsecraft refine` end to end on a tiny random model."""

import json

import pytest
import torch

from sparsecraft.cli import main
from sparsecraft.models import prunable_linears, weight_matrix
from sparsecraft.prune.masks import nm_valid

TEXT = " ".join(f"The {i}th sentence of a small calibration text about sparse models." for i in range(60))


@pytest.fixture(autouse=True)
def _small_calibration_text(tmp_path, monkeypatch):
    """A short .txt calibration source: tokenizing the bundled C4 slice takes seconds per call."""
    (tmp_path / "calib.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)


COMMON = ["--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--no-progress"]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_prune_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sparse"
    rc = main(
        [
            "prune",
            "random:tiny-llama",
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.5",
            *COMMON,
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "sparsity 0.5000" in printed
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta == json.loads((tmp_path / "r.json").read_text())
    assert meta["recipe"]["method"] == "sparsegpt" and meta["calibration"]["nsamples"] == 4
    assert meta["calibration"]["source"] == "calib.txt"
    assert {"forward_s", "statistics_s", "solve_s"} <= set(meta["timing"])
    assert meta["memory"]["peak_host_mib"] > 0
    assert all(abs(r["sparsity"] - 0.5) < 1e-3 and r["rel_error"] >= 0 for r in meta["layers"])
    model = _load(out)  # plain transformers loads it
    for layer in prunable_linears(model).values():
        assert abs(float((weight_matrix(layer) == 0).float().mean()) - 0.5) < 1e-3
    assert not (tmp_path / "sparse.checkpoint").exists()


def test_prune_cli_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(
        ["prune", "random:tiny-llama", "--method", "wanda", "--sparsity", "0.5", *COMMON, "--out", str(out)]
    )
    assert rc == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    rc = main(
        [
            "prune",
            "random:tiny-llama",
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            *COMMON,
            "--out",
            str(out),
            "--overwrite",
        ]
    )
    assert rc == 0 and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--sparsity", "1.2"], "sparsity 1.2"),
        (["--pattern", "4:4"], "pattern 4:4"),
        (["--pattern", "2:3"], "not divisible by M=3"),
        (["--sparsity", "0.5", "--nsamples", "100000"], "shorter than nsamples"),
    ],
)
def test_prune_cli_bad_input_writes_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "o"
    cli = ["prune", "random:tiny-llama", "--method", "wanda", *COMMON, *args, "--out", str(out)]
    rc = main(cli)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not out.exists()


def test_refine_cli_keeps_sparsity_and_pattern(tmp_path):
    sparse = tmp_path / "sparse"
    assert (
        main(
            [
                "prune",
                "random:tiny-llama",
                "--method",
                "wanda",
                "--pattern",
                "2:4",
                *COMMON,
                "--out",
                str(sparse),
            ]
        )
        == 0
    )
    out = tmp_path / "refined"
    assert (
        main(
            [
                "refine",
                str(sparse),
                "--dense",
                "random:tiny-llama",
                "--method",
                "dsnot",
                *COMMON,
                "--dsnot-threshold",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    before, after = _load(sparse), _load(out)
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta["kind"] == "refine" and meta["recipe"]["pattern"] == "2:4"
    changed = 0
    b_layers, a_layers = prunable_linears(before), prunable_linears(after)
    for name, layer in a_layers.items():
        w, w0 = weight_matrix(layer), weight_matrix(b_layers[name])
        assert nm_valid(w, 2, 4)
        assert torch.equal((w != 0).sum(1), (w0 != 0).sum(1))
        changed += int(((w != 0) != (w0 != 0)).sum())
    assert changed > 0  # DSnoT swapped something


def test_prune_cli_with_dsnot_refinement(tmp_path):
    out = tmp_path / "pd"
    assert (
        main(
            [
                "prune",
                "random:tiny-llama",
                "--method",
                "wanda",
                "--sparsity",
                "0.6",
                "--refine",
                "dsnot",
                "--dsnot-threshold",
                "0",
                *COMMON,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta["recipe"]["refine"] == "dsnot"
    assert sum(r.get("dsnot_swaps", 0) for r in meta["layers"]) > 0
    assert all(abs(r["sparsity"] - 0.6) < 2e-2 for r in meta["layers"])
