"""`report`: synthetic result files of every kind -> report.md and PNGs; bad input errors."""

from __future__ import annotations

import json
import math

import pytest

from sparsecraft.cli import main
from sparsecraft.errors import SparsecraftError
from sparsecraft.report import build_report, collect

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prune_report(method="sparsegpt", sparsity=0.7, owl=True, blocks=6):
    block_sp = [sparsity + 0.08 * math.sin(b) for b in range(blocks)] if owl else None
    layers = []
    for b in range(blocks):
        for k in KINDS:
            s = block_sp[b] if owl else sparsity
            part = "mlp" if k in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            layers.append({"name": f"model.layers.{b}.{part}.{k}", "shape": [64, 64], "sparsity": s,
                           "target": s, "rel_error": 0.01 * (b + 1) * (1 + s)})
    return {"kind": "prune", "model": "smollm2-135m",
            "recipe": {"method": method, "sparsity": sparsity, "pattern": None,
                       "profile": "owl" if owl else "uniform", "refine": None},
            "summary": {"layers": len(layers), "sparsity": sparsity, "mean_rel_error": 0.05,
                        "max_rel_error": 0.1},
            "owl": {"block_sparsity": block_sp} if owl else None,
            "timing": {"total_s": 12.5}, "memory": {"peak_host_mib": 900}, "layers": layers}


def write_inputs(tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "sparsecraft.json").write_text(json.dumps(prune_report()))
    (tmp_path / "pruned" / "config.json").write_text("{}")  # a model file, not a result: ignored
    rows = [{"key": "dense", "method": None, "ppl": 29.19}]
    for method, base in (("magnitude", 80.0), ("wanda", 40.0), ("sparsegpt", 35.0)):
        for sp in (0.5, 0.6, 0.7):
            rows.append({"key": f"{method}-{int(sp * 100)}", "method": method, "profile": "uniform",
                         "sparsity": sp, "ppl": base * (1 + 10 * (sp - 0.5)) ** 2,
                         "recipe": {"method": method, "pattern": None}})
        rows.append({"key": f"{method}-2:4", "method": method, "profile": "uniform", "sparsity": 0.5,
                     "ppl": base * 3, "recipe": {"method": method, "pattern": "2:4"}})
    (tmp_path / "oneshot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    speed = [{"part": "chain", "batch": b, "variant": v, "speedup_vs_dense": s * (1 - b / 40)}
             for b in (1, 4, 16) for v, s in (("dense fp32 (torch)", 1.0), ("bitmask 70%", 2.4),
                                                ("bitmask 50%", 1.5))]
    speed += [{"part": "e2e", "batch": 1, "variant": v, "tokens_per_s": t}
              for v, t in (("dense", 20.0), ("bitmask 70% fp32", 35.0), ("bitmask 70% int8", 60.0))]
    speed.append({"part": "e2e-identity", "new_tokens": 64, "identical": True})  # not a speed row
    (tmp_path / "speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in speed))
    for batch in (1, 4):  # `sparsecraft bench --json` files, one per batch
        bench = {"model": "m", "device": "cpu", "batch": batch,
                 "variants": {"dense": {"tokens_per_s": 20.0 * batch},
                              "bitmask": {"tokens_per_s": 30.0 * batch, "speedup_vs_dense": 1.5}}}
        (tmp_path / f"bench{batch}.json").write_text(json.dumps(bench))
    ev = {"config": {}, "models": {str(tmp_path / "pruned"): {
        "ppl": {"wikitext2@512x40": {"ppl": 51.0}},
        "tasks": {"piqa": {"n": 10, "acc": 0.6, "acc_stderr": 0.1, "acc_norm": 0.55,
                           "acc_norm_stderr": 0.1}}}}}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    return [tmp_path / "pruned", tmp_path / "oneshot.jsonl", tmp_path / "speed.jsonl", tmp_path / "eval.json",
            tmp_path / "bench1.json", tmp_path / "bench4.json"]


def test_report_builds_tables_and_figures(tmp_path):
    inputs = write_inputs(tmp_path)
    col = collect(inputs)
    assert len(col.prune_reports) == 1 and len(col.evals) == 1
    assert {r["format"] for r in col.speed_rows} >= {"bitmask 70%", "bitmask 70% int8"}
    # The eval of a pruned directory gets its method and sparsity from the directory's sparsecraft.json.
    linked = [r for r in col.ppl_rows if r["ppl"] == 51.0]
    assert linked and linked[0]["method"] == "sparsegpt" and linked[0]["sparsity"] == 0.7
    res = build_report(inputs, tmp_path / "out")
    names = sorted(p.rsplit("/", 1)[-1] for p in res["figures"])
    assert "ppl_vs_sparsity.png" in names
    assert any(n.startswith("layers_") for n in names)
    assert "speed_chain_speedup-vs-dense.png" in names and "speed_e2e_tokens-per-s.png" in names
    assert "speed_bench-cpu_tokens-per-s.png" in names
    bench = [r for r in col.speed_rows if r["part"] == "bench cpu"]
    assert sorted((r["format"], r["batch"], r["value"]) for r in bench)[0] == ("bitmask", 1, 30.0)
    for f in res["figures"]:
        data = open(f, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| OWL+sparsegpt 70% | prune | 42 |" in md
    assert "| piqa (n=10) | acc | 60.0 ± 10.0 |" in md
    assert "29.19" in md and "batch 16" in md
    for f in names:
        assert f"]({f})" in md


def test_report_cli_and_errors(tmp_path, capsys):
    inputs = write_inputs(tmp_path)
    assert main(["report", str(inputs[1]), "--out", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "ppl_vs_sparsity.png").is_file()
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SparsecraftError, match="no such file"):
        collect([tmp_path / "missing.json"])
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SparsecraftError, match="holds no result|none of"):
        collect([tmp_path / "other.json"])
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(SparsecraftError, match="broken.jsonl:2"):
        collect([tmp_path / "broken.jsonl"])
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3")]) == 2
