"""Matplotlib figures (PNG, Agg backend: no display needed). Each function writes one file."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_KIND_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def series_name(row: dict) -> str:
    name = row.get("method") or "?"
    if row.get("profile") == "owl":
        name = f"OWL+{name}"
    if row.get("refine") == "dsnot":
        name += "+DSnoT"
    return name


def ppl_vs_sparsity(rows: list[dict], path: Path, title: str = "WikiText-2 perplexity vs sparsity") -> Path:
    """One line per method (unstructured), N:M patterns as separate markers, dense as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [r["ppl"] for r in rows if r.get("method") in ("dense", None) or r.get("sparsity") in (0, 0.0)]
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    nm: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("method") in ("dense", None) or r.get("sparsity") is None:
            continue
        if r.get("pattern"):
            nm[f"{series_name(r)} {r['pattern']}"].append((r["sparsity"], r["ppl"]))
        else:
            lines[series_name(r)].append((r["sparsity"], r["ppl"]))
    # One colour per method family, shared by its line and its N:M markers.
    families = sorted({n for n in lines} | {n.rsplit(" ", 1)[0] for n in nm})
    color = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([100 * s for s, _ in pts], [p for _, p in pts], marker="o", label=name, color=color[name])
    shapes = {}
    for name, pts in sorted(nm.items()):
        pattern = name.rsplit(" ", 1)[1]
        marker = shapes.setdefault(pattern, "s^vD<>pP*X"[len(shapes) % 10])
        ax.scatter([100 * s for s, _ in pts], [p for _, p in pts], marker=marker, s=60, label=name,
                   color=color[name.rsplit(" ", 1)[0]], edgecolors="k", zorder=3)
    if dense:
        ax.axhline(min(dense), color="k", linestyle="--", linewidth=1, label=f"dense ({min(dense):.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)


def _layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def per_layer(report: dict, path: Path, title: str) -> Path:
    """Two panels over the layers in model order: sparsity (with OWL's per-block targets) and the
    relative reconstruction error ||WX - ŴX|| / ||WX||, coloured by layer kind."""
    layers = report["layers"]
    kinds = sorted({_layer_kind(r["name"]) for r in layers},
                   key=lambda k: _KIND_ORDER.index(k) if k in _KIND_ORDER else 99)
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    xs = list(range(len(layers)))
    for kind in kinds:
        idx = [i for i, r in enumerate(layers) if _layer_kind(r["name"]) == kind]
        a1.scatter(idx, [100 * layers[i]["sparsity"] for i in idx], s=10, color=colors[kind], label=kind)
        errs = [(i, layers[i].get("rel_error")) for i in idx]
        errs = [(i, e) for i, e in errs if e is not None and e == e]
        if errs:
            a2.scatter([i for i, _ in errs], [e for _, e in errs], s=10, color=colors[kind])
    owl = (report.get("owl") or {}).get("block_sparsity")
    if owl:
        # Step line of the per-block OWL targets, drawn across each block's layers.
        blocks = [_block_of(r["name"]) for r in layers]
        ys = [100 * owl[b] if b is not None and b < len(owl) else float("nan") for b in blocks]
        a1.plot(xs, ys, color="k", linewidth=1, drawstyle="steps-mid", label="OWL block target")
    a1.set_ylabel("sparsity (%)")
    a1.set_title(title)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    a2.set_ylabel("relative reconstruction error")
    a2.set_xlabel("layer (model order)")
    if any(r.get("rel_error") for r in layers):
        a2.set_yscale("log")
    a2.grid(True, which="both", alpha=0.3)
    # Block boundaries as light ticks on the x axis.
    blocks = [_block_of(r["name"]) for r in layers]
    starts = [i for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    if 1 < len(starts) <= 64:
        step = max(1, len(starts) // 15)
        a2.set_xticks(starts[::step], [str(blocks[i]) for i in starts[::step]])
        a2.set_xlabel("decoder block (layers in model order)")
    return _save(fig, path)


def speed_vs_batch(rows: list[dict], path: Path, title: str) -> Path:
    """Lines per format over the batch sizes; bars when every row has the same batch."""
    metric = rows[0]["metric"]
    ylabel = {"tokens_per_s": "tokens / s", "speedup_vs_dense": "speed-up vs dense",
              "median_ms": "time (ms, lower is better)"}[metric]
    by_fmt: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        by_fmt[r["format"]].append((r["batch"], r["value"]))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if len(batches) == 1:
        names = list(by_fmt)
        vals = [by_fmt[n][0][1] for n in names]
        ax.barh(range(len(names)), vals, color=[plt.cm.tab10(i % 10) for i in range(len(names))])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{ylabel} (batch {batches[0]})")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    else:
        for name, pts in by_fmt.items():
            pts.sort()
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel(ylabel)
        if metric == "speedup_vs_dense":
            ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
