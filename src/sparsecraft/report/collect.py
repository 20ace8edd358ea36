"""Read result files of every kind and sort them into what the tables and plots need.

Inputs are the JSON/JSONL files the commands and benchmarks write, or directories (a pruned
model's ``sparsecraft.json``, a recipe run with ``summary.json``). Each document is recognised
by its shape, not by its file name:

- prune/refine report (``sparsecraft.json``, ``prune --json``): ``{"kind", "recipe", "layers": [...]}``
- evaluation (``run_eval`` / ``sparsecraft eval --json``): ``{"models": {name: {ppl, tasks, gsm8k}}}``
- perplexity rows (``benchmarks/oneshot.py``): records with ``ppl`` and ``method``/``sparsity``
- speed rows: ``sparsecraft bench --json`` (``{"batch", "variants": {format: {tokens_per_s}}}``) and
  ``benchmarks/cpu_kernels.py`` records with ``batch``, a ``variant``/``format`` and
  ``tokens_per_s``/``speedup_vs_dense``/``median_ms``
- recipe summary (``sparsecraft run``): ``{"recipe", "stages": {...}}``
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SparsecraftError


@dataclass
class Collection:
    prune_reports: list[tuple[str, dict]] = field(default_factory=list)  # (label, report)
    evals: list[tuple[str, dict]] = field(default_factory=list)  # (source file, run_eval result)
    ppl_rows: list[dict] = field(default_factory=list)  # {label, method, profile, pattern, sparsity, ppl}
    speed_rows: list[dict] = field(default_factory=list)  # {format, batch, value, metric, part}
    recipes: list[tuple[str, dict]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.prune_reports or self.evals or self.ppl_rows or self.speed_rows or self.recipes)


def _read(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SparsecraftError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        return docs
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SparsecraftError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    return doc if isinstance(doc, list) else [doc]


def _label_for(path: Path, report: dict) -> str:
    r = report.get("recipe") or {}
    sparsity = r.get("sparsity")
    if sparsity is None and not r.get("pattern"):
        sparsity = (report.get("summary") or {}).get("sparsity")
    what = r.get("pattern") or (f"{100 * sparsity:.0f}%" if sparsity is not None else "")
    method = r.get("method", report.get("kind", "model"))
    if report.get("kind") == "refine" and method == "dsnot":
        method = "DSnoT refine of"
    prof = "OWL+" if r.get("profile") == "owl" else ""
    refine = "+DSnoT" if r.get("refine") == "dsnot" else ""
    name = f"{prof}{method}{refine} {what}".strip()
    return name if name else path.parent.name


def _prune_meta(model: str, depth: int = 0) -> dict | None:
    """The sparsecraft.json of a model directory; for a later stage's output of a recipe (quantized,
    compressed, fine-tuned) the nearest one upstream, found through the stages' records."""
    p = Path(model)
    if not p.is_dir() or depth > 10:
        return None
    if (p / "sparsecraft.json").is_file():
        try:
            meta = json.loads((p / "sparsecraft.json").read_text())
        except json.JSONDecodeError:
            return None
        if meta.get("kind") == "refine":
            # A refined model: name it after the pruning upstream, marked +DSnoT, with the refined sparsity.
            upstream = _upstream(p)
            base = _prune_meta(upstream, depth + 1) if upstream else None
            if base is not None:
                return {**base, "recipe": {**(base.get("recipe") or {}), "refine": "dsnot"},
                        "summary": meta.get("summary", base.get("summary"))}
        return meta
    upstream = _upstream(p)
    return _prune_meta(upstream, depth + 1) if upstream and upstream != model else None


def _upstream(p: Path) -> str | None:
    """The input of the recipe stage that made the model in ``p`` (from its stage.json)."""
    # The stage record sits in the stage directory: the model's parent, or its grandparent for
    # stages that keep the model in OUT/model (finetune).
    for q in (p.parent, p.parent.parent):
        if (q / "stage.json").is_file():
            try:
                return json.loads((q / "stage.json").read_text()).get("input")
            except json.JSONDecodeError:
                return None
    return None


def _ppl_row_from_meta(label: str, meta: dict | None, ppl: float, source: str) -> dict:
    recipe = (meta or {}).get("recipe") or {}
    summary = (meta or {}).get("summary") or {}
    return {"label": label, "method": recipe.get("method", "dense" if meta is None else "?"),
            "profile": recipe.get("profile", "uniform"), "pattern": recipe.get("pattern"),
            "refine": recipe.get("refine"),
            "sparsity": summary.get("sparsity", 0.0 if meta is None else None),
            "ppl": ppl, "ppl_source": source}


def model_label(model: str) -> str:
    """Short name of a model source: a recipe stage's output is named by its stage directory."""
    p = Path(model)
    if p.name == "model" and p.parent.name:
        return p.parent.name
    return p.name if os.sep in model and p.name else model


def _speed_rows(doc: dict) -> list[dict]:
    if "batch" not in doc:
        return []
    if isinstance(doc.get("variants"), dict):  # `sparsecraft bench --json`: one batch, several formats
        return [{"format": name, "batch": int(doc["batch"]), "value": float(v["tokens_per_s"]),
                 "metric": "tokens_per_s", "part": f"bench {doc.get('device', '')}".strip()}
                for name, v in doc["variants"].items() if isinstance(v.get("tokens_per_s"), int | float)]
    fmt = doc.get("format") or doc.get("variant")
    for metric in ("tokens_per_s", "speedup_vs_dense", "median_ms"):
        if isinstance(doc.get(metric), int | float):
            return [{"format": str(fmt), "batch": int(doc["batch"]), "value": float(doc[metric]),
                     "metric": metric, "part": doc.get("part", "bench")}]
    return []


def _classify(doc, path: Path, col: Collection) -> None:
    if not isinstance(doc, dict):
        return
    if isinstance(doc.get("layers"), list) and doc["layers"] and "sparsity" in doc["layers"][0]:
        col.prune_reports.append((_label_for(path, doc), doc))
        return
    if isinstance(doc.get("models"), dict):
        col.evals.append((str(path), doc))
        for model, res in doc["models"].items():
            for key, entry in (res.get("ppl") or {}).items():
                meta = _prune_meta(model)
                label = model_label(model)
                if meta:
                    label = f"{_label_for(Path(model) / 'x', meta)} ({label})"
                col.ppl_rows.append(_ppl_row_from_meta(label, meta, entry["ppl"], key))
        return
    if "stages" in doc and "recipe" in doc:
        col.recipes.append((str(path), doc))
        return
    if isinstance(doc.get("ppl"), int | float) and ("method" in doc or "sparsity" in doc or doc.get("key")):
        recipe = doc.get("recipe") or {}
        method = doc.get("method") or ("dense" if doc.get("key") == "dense" else recipe.get("method"))
        col.ppl_rows.append({
            "label": doc.get("key") or method, "method": method or "dense",
            "profile": doc.get("profile") or recipe.get("profile") or "uniform",
            "pattern": recipe.get("pattern"), "refine": recipe.get("refine"),
            "sparsity": doc.get("sparsity", 0.0 if method in (None, "dense") else None),
            "ppl": float(doc["ppl"]), "ppl_source": "wikitext2", "nsamples": doc.get("nsamples"),
            "mode": doc.get("mode")})
        return
    col.speed_rows.extend(_speed_rows(doc))


def collect(paths: list[str | Path]) -> Collection:
    """Read every file (directories: their sparsecraft.json, summary.json and *.json/*.jsonl)."""
    if not paths:
        raise SparsecraftError("no result files given; pass JSON/JSONL files or result directories")
    col = Collection()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".json", ".jsonl") and q.is_file()
                           and ".checkpoint" not in str(q) and q.name not in _NOT_RESULTS)
            if not found:
                raise SparsecraftError(f"{p}: a directory without result files (*.json, *.jsonl)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise SparsecraftError(f"{p}: no such file or directory; pass result JSON/JSONL files")
    for f in files:
        for doc in _read(f):
            _classify(doc, f, col)
        col.sources.append(str(f))
    if col.empty():
        raise SparsecraftError(
            f"none of {', '.join(map(str, paths))} holds a result this report knows (prune reports, "
            "eval results, perplexity rows, speed rows, recipe summaries)"
        )
    _dedupe_ppl(col)
    return col


# Files inside model directories that are not results.
_NOT_RESULTS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "compression_config.json", "model.safetensors.index.json",
                "vocab.json", "added_tokens.json", "owl.json", "state.json"}


def _dedupe_ppl(col: Collection) -> None:
    seen, out = set(), []
    for r in col.ppl_rows:
        key = (r["label"], r.get("ppl_source"), round(r["ppl"], 6))
        if key not in seen and r["ppl"] is not None and math.isfinite(r["ppl"]):
            seen.add(key)
            out.append(r)
    col.ppl_rows = out
