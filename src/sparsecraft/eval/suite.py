"""Several models × perplexity, zero-shot tasks and GSM8K → one result dict and one table.

``run_eval`` is what ``sparsecraft eval MODEL... --tasks ... --gsm8k N`` calls. Everything that
can be checked (task names and files, sources, limits) is checked before the first model loads.
With ``json_path`` the results are written after every finished measurement, and with
``resume=True`` measurements already in that file are not repeated, so a long suite survives
being interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import NAMED
from ..errors import SparsecraftError
from .gsm8k import GSM8KConfig, evaluate_gsm8k
from .tasks import TASKS, evaluate_task, parse_task_list

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # names or NAME=PATH
    limit: int | None = None
    batch_size: int = 16
    ppl: list[str] = field(default_factory=list)  # wikitext2 / ptb / c4val
    seqlen: int = 512
    windows: int | None = 40
    ppl_batch_size: int = 4
    gsm8k_limit: int | None = 0  # generation questions (0: skip, None: all 1,319)
    gsm8k_ppl_limit: int | None = 0  # reference answers for teacher-forced perplexity (0: skip)
    gsm8k_max_new_tokens: int = 256
    dtype: str = "float32"
    device: str = "cpu"

    def validate(self) -> list[tuple[str, Path]]:
        if self.limit is not None and self.limit < 1:
            raise SparsecraftError(f"--limit {self.limit}: must be at least 1")
        if self.batch_size < 1:
            raise SparsecraftError(f"--batch-size {self.batch_size}: must be at least 1")
        for source in self.ppl:
            if source not in NAMED and not Path(source).is_file():
                raise SparsecraftError(
                    f"--ppl {source}: choose from {', '.join(sorted(NAMED))} or give a .txt/.jsonl file"
                )
        GSM8KConfig(limit=self.gsm8k_limit, ppl_limit=self.gsm8k_ppl_limit,
                    max_new_tokens=self.gsm8k_max_new_tokens, batch_size=max(1, min(self.batch_size, 8)))
        parsed = parse_task_list(self.tasks) if self.tasks else []
        if not (parsed or self.ppl or self.gsm8k_limit or self.gsm8k_ppl_limit):
            raise SparsecraftError(
                "nothing to evaluate: give --ppl SOURCE, --tasks NAMES (from "
                f"{', '.join(TASKS)}) or --gsm8k N"
            )
        return parsed


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
    os.replace(tmp, path)


def evaluate_model(model, tokenizer, config: EvalConfig, done: dict | None = None,
                   on_update: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """All measurements of ``config`` on one loaded model; entries already in ``done`` are kept."""
    from .perplexity import perplexity

    parsed = config.validate()
    result = dict(done or {})
    result.setdefault("ppl", {})
    result.setdefault("tasks", {})

    def update():
        if on_update is not None:
            on_update(result)

    for source in config.ppl:
        key = f"{source}@{config.seqlen}x{config.windows}"
        if key in result["ppl"]:
            continue
        t0 = time.perf_counter()
        ppl = perplexity(model, tokenizer, source, seqlen=config.seqlen, max_windows=config.windows,
                         batch_size=config.ppl_batch_size, progress=progress)
        result["ppl"][key] = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 2)}
        log.info("%s perplexity %.3f", source, ppl)
        update()
    for name, path in parsed:
        prev = result["tasks"].get(name)
        if prev is not None and prev.get("limit") == config.limit:
            continue
        metrics = evaluate_task(model, tokenizer, name, path, config.limit, config.batch_size, progress)
        metrics["limit"] = config.limit
        result["tasks"][name] = metrics
        log.info("%s %s", name, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        update()
    if config.gsm8k_limit or config.gsm8k_ppl_limit:
        want = {"limit": config.gsm8k_limit, "ppl_limit": config.gsm8k_ppl_limit}
        prev = result.get("gsm8k")
        if not (prev and all(prev.get(k) == v for k, v in want.items())):
            gcfg = GSM8KConfig(limit=config.gsm8k_limit, ppl_limit=config.gsm8k_ppl_limit,
                               max_new_tokens=config.gsm8k_max_new_tokens,
                               batch_size=max(1, min(config.batch_size, 8)))
            result["gsm8k"] = {**evaluate_gsm8k(model, tokenizer, gcfg, progress=progress), **want}
            update()
    return result


def load_for_eval(source: str, dtype: str = "float32", device: str = "cpu"):
    """A model source (HF dir, .gguf, alias, random:NAME) or a compressed checkpoint, as a dense model."""
    from ..formats import is_compressed_dir, load_compressed
    from ..models import load, parse_dtype

    if is_compressed_dir(source):
        model, tokenizer = load_compressed(source, dense=True)
        return model.to(device=device, dtype=parse_dtype(dtype)), tokenizer
    return load(source, dtype=parse_dtype(dtype), device=device)


def run_eval(models: Sequence[str], tasks: Sequence[str] | str = (), limit: int | None = None,
             batch_size: int = 16, gsm8k_limit: int | None = 0, gsm8k_ppl_limit: int | None = 0,
             ppl: Sequence[str] = (), seqlen: int = 512, windows: int | None = 40, ppl_batch_size: int = 4,
             json_path: str | Path | None = None, resume: bool = False, dtype: str = "float32",
             device: str = "cpu", gsm8k_max_new_tokens: int = 256, progress: bool = True) -> dict:
    """Evaluate each model in turn -> {"config": ..., "models": {model: {ppl, tasks, gsm8k}}}.

    Models are loaded one at a time with ``sparsecraft.models.load`` and freed before the next.
    """
    if not models:
        raise SparsecraftError("no model given; pass a HF directory, a .gguf file or an alias")
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    config = EvalConfig(tasks=list(tasks), limit=limit, batch_size=batch_size, ppl=list(ppl), seqlen=seqlen,
                        windows=windows, ppl_batch_size=ppl_batch_size, gsm8k_limit=gsm8k_limit,
                        gsm8k_ppl_limit=gsm8k_ppl_limit,
                        gsm8k_max_new_tokens=gsm8k_max_new_tokens, dtype=dtype, device=device)
    config.validate()
    json_path = Path(json_path) if json_path else None
    results: dict = {"config": asdict(config), "models": {}}
    if resume and json_path is not None and json_path.is_file():
        results["models"] = json.loads(json_path.read_text(encoding="utf-8")).get("models", {})

    def save():
        if json_path is not None:
            _atomic_write_json(json_path, results)

    for source in models:
        log.info("evaluating %s", source)
        model, tokenizer = load_for_eval(source, dtype, device)

        def on_update(res, source=source):
            results["models"][source] = res
            save()

        results["models"][source] = evaluate_model(model, tokenizer, config, results["models"].get(source),
                                                   on_update, progress)
        save()
        del model
    return results


# ---------------------------------------------------------------------------------------------
# Table


def result_rows(results: dict) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """(model names, [(task, metric, [cell per model])]) from a ``run_eval`` result."""
    models = list(results["models"])
    keys: list[tuple[str, str]] = []

    def add(key):
        if key not in keys:
            keys.append(key)

    for res in results["models"].values():
        for src in res.get("ppl", {}):
            add(("ppl", src))
        for task in res.get("tasks", {}):
            for m in TASKS[task].metrics if task in TASKS else ("acc",):
                add((task, m))
        if "gsm8k" in res:
            for m in ("exact_match", "answer_ppl"):
                if m in res["gsm8k"]:
                    add(("gsm8k", m))
    rows = []
    for task, metric in keys:
        cells = []
        for name in models:
            res = results["models"][name]
            if task == "ppl":
                value = res.get("ppl", {}).get(metric, {}).get("ppl")
                cells.append("" if value is None else _fmt_ppl(value))
                continue
            src = res.get("gsm8k", {}) if task == "gsm8k" else res.get("tasks", {}).get(task, {})
            value = src.get(metric)
            if value is None:
                cells.append("")
            elif metric in ("perplexity", "answer_ppl"):
                cells.append(_fmt_ppl(value))
            else:
                err = src.get(f"{metric}_stderr")
                cells.append(f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err == err and err else ""))
        n = None
        for name in models:
            src = results["models"][name]
            src = src.get("gsm8k", {}) if task == "gsm8k" else src.get("tasks", {}).get(task, {})
            n = n or src.get("n" if metric != "answer_ppl" else "ppl_n")
        label = f"{task} (n={n})" if n else task
        rows.append((label, metric, cells))
    return models, rows


def format_table(results: dict, markdown: bool = True) -> str:
    """One table, models side by side: accuracies in %, ± one standard error; perplexities as is."""
    models, rows = result_rows(results)
    header = ["task", "metric", *[_short(m) for m in models]]
    body = [[t, m, *cells] for t, m, cells in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(models)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *body])


def _fmt_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def _short(source: str) -> str:
    from ..report.collect import model_label

    return model_label(source)


def print_table(results: dict, markdown: bool = False) -> None:
    print(format_table(results, markdown=markdown))


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsecraft.eval.suite MODEL... --tasks ... [--json PATH --resume]``: the suite
    without the ``sparsecraft eval`` command (scripts and benchmarks use it)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m sparsecraft.eval.suite", description=main.__doc__)
    p.add_argument("models", nargs="+")
    p.add_argument("--tasks", default="", help=f"comma-separated: {', '.join(TASKS)}, all, NAME=PATH")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl", default="", help="comma-separated perplexity sources")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--gsm8k", type=int, default=0, help="GSM8K questions to generate for (0: none)")
    p.add_argument("--gsm8k-ppl", type=int, default=0, help="GSM8K answers for perplexity (0: none)")
    p.add_argument("--gsm8k-max-new-tokens", type=int, default=256)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--resume", action="store_true", help="keep the measurements already in --json")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = run_eval(args.models, args.tasks, args.limit, args.batch_size, args.gsm8k, args.gsm8k_ppl,
                       [s for s in args.ppl.split(",") if s], args.seqlen, args.windows,
                       json_path=args.json_path, resume=args.resume,
                       gsm8k_max_new_tokens=args.gsm8k_max_new_tokens)
    except SparsecraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(res, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
