"""Sparse fine-tuning benchmarks: recovery of a pruned model, and training throughput.

recovery: one variant per process (so peak host memory is that variant's), rows appended to a
JSON-lines file as soon as they are measured:

    python benchmarks/finetune.py recovery --sparse DIR --teacher smollm2-135m --variant sh+kd+ce \
        --tokens 60000 --results docs/results/finetune_rows.jsonl

The first call also measures the dense and the unpruned-student ("before") WikiText-2
perplexities (40 windows of 512), once per results file.

speed: training tokens/s of a (random) model with SquareHead+KD from a dense copy:

    python benchmarks/finetune.py speed --model random:llama-1b --batch-size 4 --seqlen 2048 --steps 8
    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP benchmarks/finetune.py speed ...   # 2 GPUs

table: the markdown table of a results file:

    python benchmarks/finetune.py table --results docs/results/finetune_rows.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "sh+kd+ce": "ce=1,kd=1,squarehead=1",
    "sh+ce": "ce=1,squarehead=1",
    "kd+ce": "ce=1,kd=1",
    "ce": "ce=1",
}


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU threads, torch {torch.__version__}"


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stamp() -> dict:
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
            "command": _command()}


def probe(args) -> None:
    """Seconds per optimizer step of the full-loss run, per precision (first step excluded)."""
    from sparsecraft.finetune import FinetuneConfig, finetune, text_windows
    from sparsecraft.models import load

    teacher, tok = load(args.teacher)
    data = text_windows(tok, "c4", args.seqlen, max_windows=64)
    for precision in args.precisions.split(","):
        student, _ = load(args.sparse)
        config = FinetuneConfig(steps=args.steps, lr=1e-5, batch_size=args.batch_size,
                                grad_accum=args.grad_accum, loss_weights=VARIANTS[args.variant],
                                precision=precision)
        report = finetune(student, teacher, data, config, progress=False)
        secs = [h["seconds"] for h in report["history"][1:]]
        _append(Path(args.results), {
            "kind": "probe", "variant": args.variant, "precision": precision, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "seqlen": args.seqlen, "seconds_per_step": sum(secs) / len(secs),
            "losses": [h["loss"] for h in report["history"]], **_stamp()})


def _steps_for(args, rows: list[dict]) -> tuple[int, str]:
    """(steps, precision): from --tokens, from --minutes and the fastest probe, or matching a variant."""
    if args.match:
        ref = next(r for r in reversed(rows) if r["kind"] == "finetune" and r["variant"] == args.match)
        return ref["steps"], ref["precision_arg"]
    if args.minutes:
        probes = [r for r in rows if r["kind"] == "probe" and r["batch_size"] == args.batch_size
                  and r["grad_accum"] == args.grad_accum and r["seqlen"] == args.seqlen]
        if not probes:
            raise SystemExit("--minutes needs a probe row for this batch shape (run the probe mode first)")
        best = min(probes, key=lambda r: r["seconds_per_step"])
        return max(1, int(args.minutes * 60 / best["seconds_per_step"])), best["precision"]
    return max(1, args.tokens // (args.batch_size * args.grad_accum * args.seqlen)), args.precision


def recovery(args) -> None:
    from sparsecraft.eval import perplexity
    from sparsecraft.finetune import FinetuneConfig, finetune, text_windows, validation_windows
    from sparsecraft.models import load

    torch.set_num_threads(args.threads or torch.get_num_threads())
    results = Path(args.results)
    have = {r["kind"] for r in _rows(results)}
    ppl = dict(seqlen=512, max_windows=40, batch_size=4, progress=False)
    if "dense" not in have:
        dense, tok = load(args.teacher)
        t0 = time.perf_counter()
        _append(results, {"kind": "dense", "model": args.teacher,
                          "wikitext2_ppl": perplexity(dense, tok, **ppl),
                          "seconds": time.perf_counter() - t0, **_stamp()})
        del dense
    if "before" not in have:
        sparse, tok = load(args.sparse)
        _append(results, {"kind": "before", "model": args.sparse,
                          "wikitext2_ppl": perplexity(sparse, tok, **ppl), **_stamp()})
        del sparse

    weights = VARIANTS.get(args.variant, args.variant)
    steps, precision = _steps_for(args, _rows(results))
    student, tok = load(args.sparse)
    config = FinetuneConfig(
        steps=steps, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup,
        schedule=args.schedule, loss_weights=weights, precision=precision,
        kd_temperature=args.kd_temperature, seed=args.seed, max_grad_norm=args.max_grad_norm,
    )
    teacher = load(args.teacher)[0] if config.loss_weights.needs_teacher else None
    data = text_windows(tok, "c4", args.seqlen)
    val = validation_windows(tok, args.seqlen, args.val_windows) if args.val_windows else None
    t0 = time.perf_counter()
    report = finetune(student, teacher, data, config, eval_windows=val, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    del teacher
    after = perplexity(student, tok, **ppl)
    rows = _rows(results)
    dense_ppl = next(r["wikitext2_ppl"] for r in rows if r["kind"] == "dense")
    before_ppl = next(r["wikitext2_ppl"] for r in rows if r["kind"] == "before")
    _append(results, {
        "kind": "finetune", "variant": args.variant, "loss_weights": weights, "model": args.sparse,
        "teacher": args.teacher, "train_windows": len(data), "steps": report["steps"],
        "tokens": report["tokens_this_run"], "train_seconds": report["train_seconds"], "wall_seconds": wall,
        "tokens_per_s": report["tokens_per_s"], "lr": args.lr, "batch": args.batch_size * args.grad_accum,
        "seqlen": args.seqlen, "precision": report["mixed_precision"], "precision_arg": precision,
        "wikitext2_ppl": after,
        "dense_ppl": dense_ppl, "before_ppl": before_ppl,
        "gap_closed": (before_ppl - after) / (before_ppl - dense_ppl),
        "val_ppl": report["evals"], "mask_check": report["mask_check"], "mask": report["mask"],
        "peak_host_mib": report["peak_host_mib"], "history": report["history"], **_stamp(),
    })


def speed(args) -> None:
    """Throughput, and under several processes the multi-GPU checks: launched by ``accelerate
    launch`` (FSDP2 with ``--use_fsdp --fsdp_version 2``) every rank builds the same random model
    on its own GPU and reads its slice of each global batch; the row (written by rank 0) has the
    per-step losses, so runs with the same global batch can be compared, and ``--crash-at`` /
    ``--resume`` with ``--output-dir`` exercise the sharded checkpoints."""
    from sparsecraft.finetune import FinetuneConfig, TrainWindows, finetune
    from sparsecraft.models import load, prunable_linears

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    teacher, _ = load(args.model, dtype=args.teacher_dtype, device=device)
    student, _ = load(args.model, device=device)
    with torch.no_grad():  # 50% magnitude mask: speed does not depend on which weights are zero
        for layer in prunable_linears(student).values():
            w = layer.weight
            w.mul_(w.abs() > w.abs().float().median())
    vocab = student.get_input_embeddings().weight.shape[0]
    n = args.batch_size * args.grad_accum * world * (args.steps + 1)
    ids = torch.randint(0, vocab, (n, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = FinetuneConfig(steps=args.steps, lr=1e-5, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, loss_weights=VARIANTS.get(args.variant, args.variant),
                            precision=args.precision, checkpoint_every=args.checkpoint_every,
                            gradient_checkpointing=args.gradient_checkpointing)

    def crash(step, metrics):
        if step == args.crash_at:
            raise SystemExit(3)

    report = finetune(student, teacher, TrainWindows.from_ids(ids), config, progress=not args.no_progress,
                      output_dir=args.output_dir, resume=args.resume,
                      on_step=crash if args.crash_at else None)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    steady = report["history"][args.warmup_steps:]
    # steady-state throughput: tokens of the steps after warm-up over their share of the time
    row = {
        "kind": "speed", "model": args.model, "variant": args.variant,
        "batch": args.batch_size * args.grad_accum * world, "batch_per_gpu": args.batch_size,
        "grad_accum": args.grad_accum,
        "seqlen": args.seqlen, "steps": report["steps"], "start_step": report["start_step"],
        "precision": report["mixed_precision"], "distributed_type": report["distributed_type"],
        "gradient_checkpointing": args.gradient_checkpointing, "teacher_dtype": args.teacher_dtype,
        "tokens_per_s": report["tokens_per_s"],
        "steady_tokens_per_s": (sum(h["tokens"] for h in steady) / sum(h["seconds"] for h in steady)
                                if steady else None),
        "losses": [h["loss"] for h in report["history"]],
        "mask_check": report["mask_check"], "peak_host_mib": report["peak_host_mib"],
        "peak_device_mib": report.get("peak_device_mib"), "world_size": report["world_size"], **_stamp(),
    }
    if args.results:
        _append(Path(args.results), row)
    else:
        print(json.dumps(row, indent=2))


def table(args) -> None:
    rows = _rows(Path(args.results))
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    before = next((r for r in rows if r["kind"] == "before"), None)
    lines = []
    if dense and before:
        lines += [f"Dense WikiText-2 ppl (40×512): **{dense['wikitext2_ppl']:.3f}**; pruned student before "
                  f"fine-tuning: **{before['wikitext2_ppl']:.3f}**.", ""]
    ft = [r for r in rows if r["kind"] == "finetune"]
    if ft:
        lines += [
            "| variant | loss weights | tokens | steps | batch×seqlen | lr | train min | tok/s | C4-val ppl "
            "start → end | WikiText-2 ppl dense / before / after | gap closed | masks identical | "
            "peak host GiB |",
            "|---|---|---:|---:|---|---:|---:|---:|---|---|---:|---|---:|",
        ]
        for r in ft:
            val = r.get("val_ppl") or []
            val_s = f"{val[0]['val_ppl']:.2f} → {val[-1]['val_ppl']:.2f}" if len(val) >= 2 else "–"
            mc = r["mask_check"]
            lines.append(
                f"| {r['variant']} | {r['loss_weights']} | {r['tokens']:,} | {r['steps']} | "
                f"{r['batch']}×{r['seqlen']} | {r['lr']:g} | {r['train_seconds'] / 60:.1f} | "
                f"{r['tokens_per_s']:.0f} | {val_s} | {r['dense_ppl']:.2f} / {r['before_ppl']:.2f} / "
                f"**{r['wikitext2_ppl']:.2f}** | **{100 * r['gap_closed']:.1f}%** | "
                f"{'yes' if mc['identical'] else 'no'} ({mc['layers']} layers, "
                f"{r['mask']['sparsity']:.1%} zeros) | {r['peak_host_mib'] / 1024:.2f} |"
            )
    sp = [r for r in rows if r["kind"] == "speed"]
    if sp:
        lines += ["", "| model | device | variant | batch×seqlen | precision | activation ckpt | "
                  "tok/s (all steps) | steady tok/s | peak device GiB |",
                  "|---|---|---|---|---|---|---:|---:|---:|"]
        for r in sp:
            steady = f"{r['steady_tokens_per_s']:.0f}" if r.get("steady_tokens_per_s") else "–"
            dev = f"{r['peak_device_mib'] / 1024:.1f}" if r.get("peak_device_mib") else "–"
            lines.append(f"| {r['model']} | {r['machine']} | {r['variant']} | {r['batch']}×{r['seqlen']} | "
                         f"{r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                         f"{r['tokens_per_s']:.0f} | {steady} | {dev} |")
    lines += ["", "Commands (one row each):", ""]
    seen = set()
    for r in rows:
        if r["command"] not in seen:
            seen.add(r["command"])
            lines.append(f"- `{r['command']}` ({r['date']}, {r['machine']})")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recovery")
    r.add_argument("--sparse", required=True)
    r.add_argument("--teacher", default="smollm2-135m")
    r.add_argument("--variant", default="sh+kd+ce", help=f"{', '.join(VARIANTS)} or explicit weights")
    r.add_argument("--tokens", type=int, default=100_000,
                   help="training tokens (steps = tokens / batch tokens)")
    r.add_argument("--minutes", type=float, default=None,
                   help="training time budget: steps from the fastest probe row of this batch shape")
    r.add_argument("--match", default=None, help="same steps and precision as this variant's last row")
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--schedule", default="linear")
    r.add_argument("--kd-temperature", type=float, default=1.0)
    r.add_argument("--max-grad-norm", type=float, default=1.0)
    r.add_argument("--precision", default="fp32")
    r.add_argument("--val-windows", type=int, default=8)
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--results", default="docs/results/finetune_rows.jsonl")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=recovery)
    q = sub.add_parser("probe")
    q.add_argument("--sparse", required=True)
    q.add_argument("--teacher", default="smollm2-135m")
    q.add_argument("--variant", default="sh+kd+ce")
    q.add_argument("--precisions", default="fp32,bf16")
    q.add_argument("--steps", type=int, default=3)
    q.add_argument("--batch-size", type=int, default=2)
    q.add_argument("--grad-accum", type=int, default=1)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--results", default="docs/results/finetune_rows.jsonl")
    q.set_defaults(func=probe)
    s = sub.add_parser("speed")
    s.add_argument("--model", default="random:llama-1b")
    s.add_argument("--variant", default="sh+kd+ce")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--warmup-steps", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--precision", default="auto")
    s.add_argument("--teacher-dtype", default="bfloat16")
    s.add_argument("--gradient-checkpointing", action="store_true")
    s.add_argument("--checkpoint-every", type=int, default=0)
    s.add_argument("--output-dir", default=None, help="checkpoints (with --checkpoint-every / --resume)")
    s.add_argument("--crash-at", type=int, default=0, help="exit after this step (to test --resume)")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--results", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=speed)
    t = sub.add_parser("table")
    t.add_argument("--results", default="docs/results/finetune_rows.jsonl")
    t.add_argument("--out", default=None)
    t.set_defaults(func=table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
