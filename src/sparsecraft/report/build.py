"""Result files -> ``report.md`` (markdown tables) + PNG figures in one directory."""

from __future__ import annotations

import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from . import plots
from .collect import Collection, collect


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _fmt(x, spec=".4f") -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float) and x != x:
        return "n/a"
    return format(x, spec) if isinstance(x, int | float) else str(x)


def ppl_table(rows: list[dict]) -> str:
    lines = ["| model | method | profile | pattern | sparsity | perplexity | source |",
             "|---|---|---|---|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r.get("sparsity") or 0, plots.series_name(r), r["ppl"])):
        lines.append(f"| {r['label']} | {plots.series_name(r)} | {r.get('profile') or ''} | "
                     f"{r.get('pattern') or ''} | {_fmt(r.get('sparsity'))} | {r['ppl']:.2f} | "
                     f"{r.get('ppl_source', '')} |")
    return "\n".join(lines)


def prune_table(reports: list[tuple[str, dict]]) -> str:
    lines = ["| model | kind | layers | sparsity | mean rel. error | max rel. error | time (s) "
             "| peak host MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, rep in reports:
        s, t, m = rep.get("summary", {}), rep.get("timing", {}), rep.get("memory", {})
        lines.append(f"| {label} | {rep.get('kind', '')} | {s.get('layers', len(rep['layers']))} | "
                     f"{_fmt(s.get('sparsity'))} | {_fmt(s.get('mean_rel_error'))} | "
                     f"{_fmt(s.get('max_rel_error'))} | {_fmt(t.get('total_s'), '.1f')} | "
                     f"{_fmt(m.get('peak_host_mib'), '.0f')} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    batches = sorted({r["batch"] for r in rows})
    metric = rows[0]["metric"]
    cells: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        cells[r["format"]][r["batch"]] = r["value"]
    lines = ["| format | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---:|" * len(batches), ]
    lines[0] = f"| format ({metric}) | " + " | ".join(f"batch {b}" for b in batches) + " |"
    for fmt, vals in cells.items():
        lines.append(f"| {fmt} | " + " | ".join(_fmt(vals.get(b), ".3g") for b in batches) + " |")
    return "\n".join(lines)


def recipe_table(summary: dict) -> str:
    lines = ["| stage | status | seconds | output | key figures |", "|---|---|---:|---|---|"]
    for name, st in summary.get("stages", {}).items():
        figs = st.get("figures") or {}
        figtxt = ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in figs.items())
        lines.append(f"| {name} | {st.get('status', '')} | {_fmt(st.get('seconds'), '.1f')} | "
                     f"{st.get('output') or ''} | {figtxt} |")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
    os.replace(tmp, path)


def build_report(paths: list[str | Path], out_dir: str | Path, title: str = "sparsecraft report") -> dict:
    """Write ``out_dir/report.md`` and the figures; returns {"markdown": path, "figures": [...]}."""
    from ..eval.suite import format_table

    col: Collection = collect(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", "Sources: " + ", ".join(f"`{s}`" for s in col.sources), ""]
    figures: list[Path] = []

    for src, summary in col.recipes:
        md += [f"## Recipe `{summary.get('recipe', src)}`", "", recipe_table(summary), ""]
    if col.ppl_rows:
        md += ["## Perplexity vs sparsity", "", ppl_table(col.ppl_rows), ""]
        sparse = [r for r in col.ppl_rows if r.get("sparsity") not in (None,)]
        if any(r.get("sparsity") for r in sparse):
            fig = plots.ppl_vs_sparsity(sparse, out / "ppl_vs_sparsity.png")
            figures.append(fig)
            md += [f"![perplexity vs sparsity]({fig.name})", ""]
    for src, res in col.evals:
        if any(m.get("tasks") or m.get("gsm8k") or m.get("ppl") for m in res["models"].values()):
            md += [f"## Evaluation (`{src}`)", "", format_table(res), ""]
    if col.prune_reports:
        md += ["## Pruning reports", "", prune_table(col.prune_reports), ""]
        used = set()
        for label, rep in col.prune_reports:
            slug = _slug(label)
            while slug in used:
                slug += "-b"
            used.add(slug)
            fig = plots.per_layer(rep, out / f"layers_{slug}.png", f"{label}: per-layer sparsity and error")
            figures.append(fig)
            md += [f"### {label}", "", f"![per-layer sparsity and reconstruction error]({fig.name})", ""]
    if col.speed_rows:
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in col.speed_rows:
            groups[(r["part"], r["metric"])].append(r)
        md += ["## Speed", ""]
        for (part, metric), rows in groups.items():
            fig = plots.speed_vs_batch(rows, out / f"speed_{_slug(part)}_{_slug(metric)}.png",
                                       f"{part}: {metric.replace('_', ' ')} by format")
            figures.append(fig)
            md += [f"### {part}", "", speed_table(rows), "", f"![speed]({fig.name})", ""]
    md_path = out / "report.md"
    _atomic_text(md_path, "\n".join(md).rstrip() + "\n")
    return {"markdown": str(md_path), "figures": [str(f) for f in figures]}
