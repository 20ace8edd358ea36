#!/usr/bin/env python
"""Regenerate docs/RESULTS.md from the result files, table by table.

    .venv/bin/python scripts/make_results.py               # render docs/RESULTS.md from the data there is
    .venv/bin/python scripts/make_results.py --run         # also produce missing tables (hours on a CPU)
    .venv/bin/python scripts/make_results.py --run --only eval-dense,oneshot
    .venv/bin/python scripts/make_results.py --list        # tables, their commands, done or not

Every table has the commands that produce its data (under --data, default docs/results/data) and a
renderer that turns the data into markdown. With ``--run`` the tables are produced in order; a
table whose commands finished before is not run again (the state lives in DATA/state.json, and
the benchmarks themselves keep finished rows), so an interrupted regeneration continues with the
table it stopped in. Heavy commands take the machine-wide CPU lock (/tmp/sparsecraft-cpu.lock) so
that timings are not disturbed. ``--redo KEY`` forgets a table's state. docs/RESULTS.md is written
after every table (atomically), with each table's commands, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LOCK = "/tmp/sparsecraft-cpu.lock"
TASKS = "piqa,arc_easy,arc_challenge,boolq,winogrande,lambada_openai"
LM_EVAL = os.environ.get("LM_EVAL", "/tmp/lmeval-venv/bin/lm_eval")


@dataclass
class Table:
    key: str
    title: str
    produce: list[list[str]]  # commands run from the repository root, in order
    render: str  # name of a render function below
    data: list[str] = field(default_factory=list)  # files (relative to --data) the renderer reads
    note: str = ""
    needs: str | None = None  # an executable that must exist, else the table is skipped


def locked(cmd: list[str]) -> list[str]:
    return ["flock", LOCK, *cmd]


def tables(data: Path) -> list[Table]:
    d = str(data)
    return [
        Table(
            "eval-dense",
            "Dense SmolLM2-135M: zero-shot tasks (lm-eval rules), WikiText-2, GSM8K",
            [
                locked(
                    [
                        PY,
                        "-m",
                        "sparsecraft.eval.suite",
                        "smollm2-135m",
                        "--tasks",
                        TASKS,
                        "--limit",
                        "100",
                        "--ppl",
                        "wikitext2",
                        "--gsm8k",
                        "10",
                        "--gsm8k-ppl",
                        "200",
                        "--json",
                        f"{d}/eval_dense.json",
                        "--resume",
                    ]
                )
            ],
            "render_eval",
            ["eval_dense.json"],
            "First 100 examples of each task (LAMBADA: 100 passages); accuracies in %, ± one standard error.",
        ),
        Table(
            "lm-eval-check",
            "Our scores against lm-evaluation-harness on the same examples",
            [
                locked(
                    [
                        PY,
                        "scripts/check_lm_eval.py",
                        "smollm2-135m",
                        "--lm-eval",
                        LM_EVAL,
                        "--limit",
                        "100",
                        "--out",
                        f"{d}/lm_eval_check.json",
                    ]
                )
            ],
            "render_lm_eval",
            ["lm_eval_check.json"],
            "lm-eval runs from its own venv on the saved HF directory with our examples exported as local "
            "tasks (sparsecraft.eval.tasks.export_lm_eval_tasks).",
            needs=LM_EVAL,
        ),
        Table(
            "oneshot",
            "One-shot pruning (WikiText-2 40x512, C4 calibration)",
            [[PY, "benchmarks/oneshot.py", "--out", f"{d}/oneshot.jsonl"]],
            "render_oneshot",
            ["oneshot.jsonl"],
            "benchmarks/oneshot.py takes the CPU lock per row.",
        ),
        Table(
            "dsnot",
            "DSnoT refinement",
            [[PY, "benchmarks/dsnot.py", "--out", f"{d}/dsnot.jsonl", "--baseline", f"{d}/oneshot.jsonl"]],
            "render_dsnot",
            ["dsnot.jsonl"],
        ),
        Table(
            "cpu-kernels",
            "CPU kernels: chain of 30 x (576x1536, 1536x576), speed-up vs torch fp32",
            [locked([PY, "benchmarks/cpu_kernels.py", "--part", "chain",
                     "--jsonl", f"{d}/cpu_runtime_chain.jsonl"])],
            "render_speed",
            ["cpu_runtime_chain.jsonl"],
        ),
        Table(
            "cpu-e2e",
            "CPU decode of SmolLM2-135M at 70%",
            [locked([PY, "benchmarks/cpu_kernels.py", "--part", "e2e",
                     "--jsonl", f"{d}/cpu_runtime_e2e.jsonl"])],
            "render_speed",
            ["cpu_runtime_e2e.jsonl"],
        ),
        Table(
            "recipe",
            "One-command pipeline: recipes/sgpt50-dsnot-ft-int8.yaml",
            [locked([str(Path(PY).parent / "sparsecraft"), "run", "recipes/sgpt50-dsnot-ft-int8.yaml"])],
            "render_recipe",
            ["recipe_summary.json"],
            "Copy runs/sgpt50-dsnot-ft-int8/summary.json to the data folder to render a new run.",
        ),
    ]


# ------------------------------------------------------------------------------------------ renderers


def render_eval(files: list[Path]) -> str:
    from sparsecraft.eval.suite import format_table

    return format_table(json.loads(files[0].read_text()))


def render_lm_eval(files: list[Path]) -> str:
    doc = json.loads(files[0].read_text())
    lines = [
        "| task | n | metric | sparsecraft | lm-eval | difference (points) | max abs Δ log-lik per request |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for task, row in doc["tasks"].items():
        for metric, theirs in row["lm_eval"].items():
            ours = row["ours"].get(metric)
            if ours is None:
                continue
            if metric == "perplexity":
                lines.append(
                    f"| {task} | {row['n']} | {metric} | {ours:.3f} | {theirs:.3f} | "
                    f"{ours - theirs:+.3f} (ppl) | {row['max_abs_ll_diff']:.2e} |"
                )
            else:
                lines.append(
                    f"| {task} | {row['n']} | {metric} | {100 * ours:.2f} | {100 * theirs:.2f} | "
                    f"{100 * (ours - theirs):+.2f} | {row['max_abs_ll_diff']:.2e} |"
                )
    return "\n".join(lines)


def _run_markdown(cmd: list[str]) -> str:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


def render_oneshot(files: list[Path]) -> str:
    return _run_markdown([PY, "benchmarks/oneshot.py", "--out", str(files[0]), "--markdown"])


def render_dsnot(files: list[Path]) -> str:
    return _run_markdown([PY, "benchmarks/dsnot.py", "--out", str(files[0]), "--markdown"])


def render_speed(files: list[Path]) -> str:
    from sparsecraft.report import collect, speed_table

    col = collect([files[0]])
    groups: dict = {}
    for r in col.speed_rows:
        groups.setdefault((r["part"], r["metric"]), []).append(r)
    return "\n\n".join(speed_table(rows) for rows in groups.values())


def render_recipe(files: list[Path]) -> str:
    from sparsecraft.report.build import recipe_table

    summary = json.loads(files[0].read_text())
    total = sum(st.get("seconds") or 0 for st in summary["stages"].values())
    return (
        recipe_table(summary)
        + f"\n\nTotal stage time: {total / 60:.1f} min. Report: `{summary.get('report')}`"
    )


# ------------------------------------------------------------------------------------------ driver


def show(cmd: list[str]) -> str:
    """A command as a reader would type it in the repository root."""
    return shlex.join(cmd).replace(f"{ROOT}/", "")


def data_file(data: Path, name: str) -> Path:
    """Result files live under --data, except run directories (``runs/...``, from the repository root)."""
    return (ROOT / name) if name.startswith("runs/") else (data / name)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
    os.replace(tmp, path)


def machine() -> str:
    import torch

    py, arch = platform.python_version(), platform.machine()
    return f"{arch}, {os.cpu_count()} cores, Python {py}, torch {torch.__version__}"


BEGIN, END = "<!-- make_results: begin -->", "<!-- make_results: end -->"


def build(tabs: list[Table], data: Path, state: dict, out: Path) -> None:
    """Write the tables. If ``out`` holds the BEGIN/END markers only the text between them is
    replaced (the hand-written headlines above stay); otherwise the whole file is written."""
    parts = [
        "Generated by `scripts/make_results.py` from the files in "
        f"`{os.path.relpath(data, ROOT)}`; each table lists the commands that produced its data. "
        "Regenerate with `.venv/bin/python scripts/make_results.py --run` (resumable table by table).",
        "",
    ]
    for t in tabs:
        parts += [f"### {t.title}", ""]
        files = [data_file(data, f) for f in t.data]
        st = state.get(t.key, {})
        if not all(f.is_file() for f in files):
            parts += ["_Not produced yet._ Commands:", "", "```", *[show(c) for c in t.produce], "```", ""]
            continue
        try:
            body = globals()[t.render](files)
        except Exception as e:  # a renderer of another team's format may lag behind; say so
            body = f"_Could not render ({type(e).__name__}: {e})._"
        parts += ["```", *[show(c) for c in t.produce], "```", ""]
        if st.get("finished"):
            parts += [f"Produced {st['finished']} on {st.get('machine', '?')}.", ""]
        if t.note:
            parts += [t.note, ""]
        parts += [body, ""]
    generated = "\n".join(parts).rstrip()
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{generated}\n{END}{rest.split(END, 1)[1]}"
    else:
        text = f"# Results\n\n{BEGIN}\n{generated}\n{END}\n"
    atomic_write(out, text.rstrip() + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "docs" / "results" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--run", action="store_true", help="produce the tables that are not done yet")
    ap.add_argument("--only", default=None, help="comma-separated table keys")
    ap.add_argument("--redo", default=None, help="comma-separated table keys to produce again")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    state_path = data / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    tabs = tables(data)
    keys = {t.key for t in tabs}
    for opt in (args.only, args.redo):
        for k in (opt or "").split(","):
            if k and k not in keys:
                print(f"unknown table {k!r}; tables: {', '.join(sorted(keys))}", file=sys.stderr)
                return 2
    wanted = set(args.only.split(",")) if args.only else keys
    for k in (args.redo or "").split(","):
        state.pop(k, None)
    if args.list:
        for t in tabs:
            print(f"{'done' if state.get(t.key, {}).get('finished') else 'todo'}  {t.key}: {t.title}")
            for c in t.produce:
                print(f"      {show(c)}")
        return 0
    if args.run:
        for t in tabs:
            if t.key not in wanted or state.get(t.key, {}).get("finished"):
                continue
            if t.needs and not Path(t.needs).exists():
                print(f"{t.key}: skipped, {t.needs} not found", flush=True)
                continue
            for cmd in t.produce:
                print(f"{t.key}: {show(cmd)}", flush=True)
                code = subprocess.run(cmd, cwd=ROOT).returncode
                if code:
                    print(f"{t.key}: exit code {code}; rerun to continue from here", file=sys.stderr)
                    build(tabs, data, state, args.out)
                    return code
            state[t.key] = {"finished": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
            atomic_write(state_path, json.dumps(state, indent=1))
            build(tabs, data, state, args.out)
    build(tabs, data, state, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
