import json

from sparsecraft.cli import main
from sparsecraft.models import load, prunable_linears, save, weight_matrix


def test_eval_cli_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "random:tiny-llama", "random:tiny-gpt2", "--seqlen", "64", "--windows", "2",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"random:tiny-llama", "random:tiny-gpt2"}
    assert data["models"]["random:tiny-llama"]["ppl"]["wikitext2@64x2"]["ppl"] > 1
    assert "random:tiny-gpt2" in capsys.readouterr().out


def test_inspect_reports_sparsity_and_nm(tmp_path):
    model, tok = load("random:tiny-llama")
    layer = prunable_linears(model)["model.layers.0.mlp.up_proj"]
    w = weight_matrix(layer)
    w.view(w.shape[0], -1, 4)[:, :, :2] = 0  # 2:4 (and 4:8) valid, 50% sparse
    save(model, tok, tmp_path / "m")
    report = tmp_path / "i.json"
    assert main(["inspect", str(tmp_path / "m"), "--json", str(report)]) == 0
    rows = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    assert len(rows) == 14
    assert rows["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5
    assert rows["model.layers.0.mlp.up_proj"]["2:4"] and rows["model.layers.0.mlp.up_proj"]["4:8"]
    assert not rows["model.layers.0.mlp.down_proj"]["2:4"]


def test_bad_input_one_line_error(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory" in err[0] and "Traceback" not in err[0]
    assert main(["eval", "random:tiny-llama", "--ppl", "wikitext2", "--seqlen", "100000"]) == 2
    assert "above the model's context" in capsys.readouterr().err


def test_load_and_inspect_compressed_checkpoint(tmp_path, capsys):
    import torch

    model, tok = load("random:tiny-llama")
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        w[w.abs() < w.abs().median()] = 0
    save(model, tok, tmp_path / "sparse")
    out = str(tmp_path / "c")
    assert main(["compress", str(tmp_path / "sparse"), "--format", "bitmask", "--out", out]) == 0
    again, _ = load(str(tmp_path / "c"))  # a compressed directory loads as a dense model
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    report = tmp_path / "i.json"
    assert main(["inspect", str(tmp_path / "c"), "--quiet", "--json", str(report)]) == 0
    storage = json.loads(report.read_text())["storage"]
    assert storage["bytes_on_disk"] < storage["dense_bytes"]
    assert "bits per weight" in capsys.readouterr().out
