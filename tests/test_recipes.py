"""Recipes: validation errors name the line and the allowed values; runs skip finished stages."""

from __future__ import annotations

import json
import textwrap

import pytest

from sparsecraft.cli import main
from sparsecraft.errors import SparsecraftError
from sparsecraft.recipes import load_recipe, run_recipe


def write(tmp_path, body: str, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


GOOD = """
name: t
model: random:tiny-llama
out: {out}
stages:
  - prune:
      method: wanda
      sparsity: 0.5
      nsamples: 2
      seqlen: 16
      calib: {text}
  - quantize: {{bits: 8, group_size: 32}}
  - eval:
      ppl: [{text}]
      seqlen: 16
      windows: 1
      tasks: piqa
      limit: {limit}
"""


@pytest.mark.parametrize("body, fragment, line", [
    ("model: m\nstages:\n  - prune: {method: wanda, sparsity: 0.5}\n  - polish: {x: 1}\n",
     "unknown stage 'polish'; allowed: prune, refine, finetune, quantize, compress, eval, bench", 4),
    ("model: m\nstages:\n  - prune:\n      method: wanda\n      sparsty: 0.5\n",
     "stage prune: unknown field 'sparsty'; allowed:", 5),
    ("model: m\nstages:\n  - prune:\n      method: lasso\n      sparsity: 0.5\n",
     "stage prune: argument --method: invalid choice: 'lasso'", 3),
    ("model: m\nstages:\n  - prune:\n      method: wanda\n      sparsity: 1.5\n",
     "stage prune: sparsity 1.5", 3),
    ("model: m\nstages:\n  - quantize: {bits: 8}\n  - prune: {method: wanda, sparsity: 0.5}\n",
     "stage prune comes after quantize", 4),
    ("model: m\nstages:\n  - eval:\n      tasks: [piqa, pika]\n",
     "stage eval: unknown task 'pika'; choose from piqa", 3),
    ("model: m\nstages:\n  - eval:\n      limits: 5\n",
     "stage eval: unknown field 'limits'; allowed: tasks, limit", 4),
    ("model: m\nstages:\n  - prune: {method: wanda, sparsity: 0.5, out: /tmp/x}\n",
     "field 'out' is set by the recipe runner", 3),
    ("model: m\nstagez: []\n", "unknown key 'stagez'; allowed: name, model, out, stages", 2),
    ("stages:\n  - eval: {tasks: piqa}\n", "missing key 'model'", 1),
    ("model: m\nstages:\n  - prune: [1, 2]\n", "fields must be a mapping", 3),
    ("model: m\nstages:\n  - quantize: {bits: 8, asym: maybe}\n", "is a switch; write true or false", 3),
])
def test_validation_errors_name_line_and_allowed_values(tmp_path, body, fragment, line):
    path = write(tmp_path, body)
    with pytest.raises(SparsecraftError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert fragment in msg, msg


def test_check_only_and_cli_error_exit(tmp_path, capsys):
    path = write(tmp_path, GOOD.format(out=tmp_path / "out", limit=2, text="c4"))
    assert main(["run", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "01-prune: method=wanda" in out and "03-eval" in out
    assert not (tmp_path / "out").exists()  # checking runs nothing
    bad = write(tmp_path, "model: m\nstages:\n  - nope: {}\n", "bad.yaml")
    assert main(["run", str(bad)]) == 2
    assert "bad.yaml:3: unknown stage 'nope'" in capsys.readouterr().err


def test_run_skips_finished_stages_and_reruns_changed_ones(tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "text.txt"  # a small text keeps tokenizing out of the test's time
    text.write_text(" ".join(f"word{i % 97} and more words, number {i}." for i in range(400)))
    path = write(tmp_path, GOOD.format(out=out, limit=2, text=text))
    s1 = run_recipe(path)
    assert [st["status"] for st in s1["stages"].values()] == ["done"] * 3
    assert (out / "01-prune" / "model" / "sparsecraft.json").is_file()
    assert s1["stages"]["01-prune"]["figures"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    ev = json.loads((out / "03-eval" / "result.json").read_text())
    [res] = ev["models"].values()
    assert res["tasks"]["piqa"]["n"] == 2 and f"{text}@16x1" in res["ppl"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["report"] and (out / "report" / "report.md").is_file()
    assert any(p.name.startswith("layers_") for p in (out / "report").glob("*.png"))
    mtime = (out / "01-prune" / "model" / "model.safetensors").stat().st_mtime
    # Same recipe again: nothing reruns.
    s2 = run_recipe(path)
    assert [st["status"] for st in s2["stages"].values()] == ["skipped (done before)"] * 3
    assert (out / "01-prune" / "model" / "model.safetensors").stat().st_mtime == mtime
    # A changed eval field reruns only the eval stage.
    path = write(tmp_path, GOOD.format(out=out, limit=3, text=text))
    s3 = run_recipe(path)
    assert [st["status"] for st in s3["stages"].values()] == ["skipped (done before)"] * 2 + ["done"]
    ev = json.loads((out / "03-eval" / "result.json").read_text())
    assert next(iter(ev["models"].values()))["tasks"]["piqa"]["n"] == 3
    ppl_before = next(iter(ev["models"].values()))["ppl"][f"{text}@16x1"]["ppl"]
    # A changed prune stage reruns everything after it, and the eval measures the new model.
    changed = GOOD.format(out=out, limit=3, text=text).replace("sparsity: 0.5", "sparsity: 0.75")
    path = write(tmp_path, changed)
    s4 = run_recipe(path)
    assert [st["status"] for st in s4["stages"].values()] == ["done"] * 3
    assert s4["stages"]["01-prune"]["figures"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    ev = json.loads((out / "03-eval" / "result.json").read_text())
    assert next(iter(ev["models"].values()))["ppl"][f"{text}@16x1"]["ppl"] != ppl_before
