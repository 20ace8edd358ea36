#!/usr/bin/env python
"""Score the same examples with sparsecraft and with lm-evaluation-harness, and compare.

lm-eval runs from its own environment (it is not a dependency of sparsecraft): install it in a
throwaway venv and pass its ``lm_eval`` executable with ``--lm-eval``. The examples are exported
as local lm-eval tasks (``sc_<task>``, see ``sparsecraft.eval.tasks.export_lm_eval_tasks``), so
nothing is downloaded.

    python scripts/check_lm_eval.py MODEL --lm-eval /tmp/lmeval-venv/bin/lm_eval \
        --tasks piqa,arc_easy,arc_challenge,boolq,winogrande,lambada_openai --limit 500 \
        --out docs/results/lm_eval_check.json

Per task it writes both metric sets, the largest per-request |log-likelihood| difference and the
number of examples whose prediction differs. Finished tasks in --out are kept (resumable).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
    os.replace(tmp, path)


def run_lm_eval(lm_eval: str, model_dir: str, include: Path, task: str, batch_size: int, out: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--include_path",
        str(include),
        "--tasks",
        task,
        "--batch_size",
        str(batch_size),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"lm_eval failed on {task} (exit {proc.returncode}); command: {' '.join(cmd)}")
    seconds = time.perf_counter() - t0
    results = json.load(open(sorted(glob.glob(str(out / "*" / "results_*.json")))[-1]))["results"][task]
    samples_file = sorted(glob.glob(str(out / "*" / f"samples_{task}_*.jsonl")))[-1]
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    metrics = {k.split(",")[0]: v for k, v in results.items() if k.endswith(",none") and "stderr" not in k}
    return {"metrics": metrics, "lls": lls, "seconds": round(seconds, 1), "command": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", metavar="MODEL", help="HF directory (or alias/.gguf: saved as one first)")
    ap.add_argument("--lm-eval", required=True, help="path of the lm_eval executable (its own venv)")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,boolq,winogrande,lambada_openai")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from sparsecraft.eval.tasks import TASKS, evaluate_task, export_lm_eval_tasks, parse_task_list
    from sparsecraft.models import load

    done = json.load(open(args.out)) if args.out.exists() else {"tasks": {}}
    done.update(model=args.model_dir, limit=args.limit, command=" ".join(sys.argv))
    model, tokenizer = load(args.model_dir)
    if not Path(args.model_dir).is_dir():
        # lm-eval needs a HF directory: save what we loaded (an alias, a .gguf) as one.
        from sparsecraft.models import save

        hf_dir = Path(tempfile.mkdtemp(prefix="sc_lmeval_model_"))
        save(model, tokenizer, hf_dir)
        args.model_dir = str(hf_dir)
    work = Path(tempfile.mkdtemp(prefix="sc_lmeval_"))
    for name, path in parse_task_list(args.tasks):
        if name in done["tasks"]:
            print(f"{name}: done already", flush=True)
            continue
        export_lm_eval_tasks(work / "tasks", [f"{name}={path}"], args.limit)
        theirs = run_lm_eval(
            args.lm_eval, args.model_dir, work / "tasks", f"sc_{name}", args.batch_size, work / f"out_{name}"
        )
        ours = evaluate_task(model, tokenizer, name, path, args.limit, args.batch_size, samples=True)
        our_lls = [r["ll"] for r in ours.pop("samples")]
        diffs = [abs(a - b) for x, y in zip(our_lls, theirs["lls"]) for a, b in zip(x, y)]
        spec = TASKS[name]

        def pred(lls):
            return max(range(len(lls)), key=lambda i: (lls[i], -i))

        flips = (
            sum(pred(a) != pred(b) for a, b in zip(our_lls, theirs["lls"]))
            if spec.kind != "loglikelihood"
            else None
        )
        row = {
            "n": len(our_lls),
            "ours": {k: v for k, v in ours.items()},
            "lm_eval": theirs["metrics"],
            "lm_eval_seconds": theirs["seconds"],
            "lm_eval_command": theirs["command"],
            "max_abs_ll_diff": max(diffs),
            "mean_abs_ll_diff": sum(diffs) / len(diffs),
            "acc_pred_flips": flips,
        }
        done["tasks"][name] = row
        atomic_write_json(args.out, done)
        print(f"{name}: ours {ours} | lm-eval {theirs['metrics']} | max |dll| {max(diffs):.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
