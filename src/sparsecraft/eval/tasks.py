"""Zero-shot tasks scored with lm-evaluation-harness's rules.

What "the same rules" means here (lm-eval 0.4, ``api/task.py`` and ``api/model.py``):

- Each example becomes one (context, continuation) request per choice. Multiple choice puts the
  choice in the continuation, after the target delimiter ``" "``; WinoGrande's "partial" scoring
  puts the choice in the context and scores the shared rest of the sentence.
- Tokenisation: trailing spaces of the context move to the continuation; ``context +
  continuation`` is encoded once and split after ``len(encode(context))`` tokens, so the scored
  tokens are the ones the model would see in running text.
- A request's score is the summed log-probability of its continuation tokens; ``acc`` takes the
  argmax, ``acc_norm`` the argmax of score / ``len(choice)`` (characters of the choice without the
  delimiter, as lm-eval computes it), first index on ties.
- LAMBADA (openai): context ``text`` without its last word, continuation ``" " + last word``;
  ``acc`` is 1 when every continuation token is the greedy argmax, ``perplexity`` is
  exp(-mean over examples of the word's log-probability).
- ``--limit N`` takes the first N examples of the file, as lm-eval does.

Requests are sorted by length and batched; requests with an identical input (one-token choices
after a shared context, e.g. BoolQ's " no"/" yes") share one forward pass.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import SparsecraftError
from .perplexity import model_context

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "bundled"


@dataclass(frozen=True)
class Example:
    """One scored item: a (context, continuation) request per choice, and the gold index."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    # Strings whose character length normalises acc_norm (lm-eval: the choices, no delimiter).
    norm_texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "multiple_choice" or "loglikelihood" (LAMBADA-style single continuation)
    metrics: tuple[str, ...]
    default_file: str | None  # relative to the bundled data directory; None: the user supplies it
    loader: Callable[[Path], list[Example]]
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Task files -> examples (one loader per file format)


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SparsecraftError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


def _need(row: dict, keys: Sequence[str], path: Path, lineno: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise SparsecraftError(
            f"{path}:{lineno}: missing field(s) {', '.join(missing)}; this task expects {', '.join(keys)}"
        )


def _choice_example(context: str, choices: Sequence[str], gold: int) -> Example:
    return Example(tuple((context, " " + c) for c in choices), int(gold), tuple(choices))


def load_piqa(path: Path) -> list[Example]:
    """PIQA release files: ``valid.jsonl`` {goal, sol1, sol2} plus ``valid-labels.lst`` beside it."""
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = path.with_name(path.name.replace(".jsonl", "-labels.lst"))
    rows = _jsonl(path)
    if not labels_path.is_file():
        raise SparsecraftError(f"{path}: PIQA needs its labels file {labels_path.name} next to it")
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise SparsecraftError(
            f"{labels_path}: {len(labels)} labels for {len(rows)} questions in {path.name}"
        )
    out = []
    for i, (row, label) in enumerate(zip(rows, labels), 1):
        _need(row, ("goal", "sol1", "sol2"), path, i)
        out.append(_choice_example(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], label))
    return out


def load_arc(path: Path) -> list[Example]:
    """ARC as llm-foundry stores it ({query: "Question: q", choices, gold}) or the AI2/HF layout
    ({question: {stem, choices:[{label,text}]}, answerKey} / {question, choices:{text,label}, answerKey})."""
    out = []
    for i, row in enumerate(_jsonl(path), 1):
        if "query" in row:
            _need(row, ("query", "choices", "gold"), path, i)
            query = row["query"]
            question = query[len("Question: "):] if query.startswith("Question: ") else query
            texts, gold = row["choices"], row["gold"]
        else:
            _need(row, ("question", "answerKey"), path, i)
            q = row["question"]
            if isinstance(q, dict):  # AI2 release: choices live inside the question
                question, choices = q["stem"], q["choices"]
                texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
            else:
                question, texts, labels = q, row["choices"]["text"], row["choices"]["label"]
            gold = labels.index(row["answerKey"])
        out.append(_choice_example(f"Question: {question}\nAnswer:", texts, gold))
    return out


def load_boolq(path: Path) -> list[Example]:
    """BoolQ: llm-foundry ({query: "Passage: p\\nQuestion: q?", gold}) or super_glue
    ({passage, question, label})."""
    out = []
    for i, row in enumerate(_jsonl(path), 1):
        if "query" in row:
            _need(row, ("query", "gold"), path, i)
            query = row["query"]
            passage, sep, question = query.rpartition("\nQuestion: ")
            if not sep:
                raise SparsecraftError(f"{path}:{i}: query has no '\\nQuestion: ' part")
            passage = passage[len("Passage: "):] if passage.startswith("Passage: ") else passage
            question = question[:-1] if question.endswith("?") else question
            gold = row["gold"]
        else:
            _need(row, ("passage", "question", "label"), path, i)
            passage, question, gold = row["passage"], row["question"], row["label"]
        out.append(_choice_example(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], int(gold)))
    return out


def load_winogrande(path: Path) -> list[Example]:
    """WinoGrande partial scoring: the option fills the blank in the context, the rest of the
    sentence is the scored continuation. llm-foundry ({context_options, continuation, gold}) or
    the AI2/HF layout ({sentence, option1, option2, answer})."""
    out = []
    for i, row in enumerate(_jsonl(path), 1):
        if "context_options" in row:
            _need(row, ("context_options", "continuation", "gold"), path, i)
            contexts, target, gold = row["context_options"], row["continuation"], row["gold"]
        else:
            _need(row, ("sentence", "option1", "option2", "answer"), path, i)
            sentence = row["sentence"]
            idx = sentence.index("_")
            contexts = [sentence[:idx] + row["option1"], sentence[:idx] + row["option2"]]
            target = sentence[idx + 1:].strip()
            gold = {"1": 0, "2": 1}[str(row["answer"])]
        # acc_norm is not reported for WinoGrande; the contexts stand in as the "choices".
        out.append(Example(tuple((c, " " + target) for c in contexts), int(gold), tuple(contexts)))
    return out


def load_lambada(path: Path) -> list[Example]:
    """LAMBADA (OpenAI jsonl {text}): context = all but the last word, target = " " + last word."""
    out = []
    for i, row in enumerate(_jsonl(path), 1):
        _need(row, ("text",), path, i)
        context, _, word = row["text"].rpartition(" ")
        out.append(Example(((context, " " + word),), 0))
    return out


def _hellaswag_clean(text: str) -> str:
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow bracket artefacts
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Example]:
    """HellaSwag validation: the original/HF layout {activity_label, ctx_a, ctx_b, endings, label}
    (cleaned as lm-eval does), or llm-foundry's preprocessed {query, choices, gold}."""
    out = []
    for i, row in enumerate(_jsonl(path), 1):
        if "query" in row:
            _need(row, ("query", "choices", "gold"), path, i)
            out.append(_choice_example(row["query"], row["choices"], row["gold"]))
            continue
        _need(row, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), path, i)
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
        out.append(_choice_example(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])))
    return out


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("piqa", "multiple_choice", ("acc", "acc_norm"), "piqa/valid.jsonl", load_piqa,
                 "PIQA validation, 1,838"),
        TaskSpec("arc_easy", "multiple_choice", ("acc", "acc_norm"),
                 "arc_easy/arc_easy_test.llmfoundry.jsonl", load_arc, "ARC-Easy test, 2,376"),
        TaskSpec("arc_challenge", "multiple_choice", ("acc", "acc_norm"),
                 "arc_challenge/arc_challenge_test.llmfoundry.jsonl", load_arc, "ARC-Challenge test, 1,172"),
        TaskSpec("boolq", "multiple_choice", ("acc",), "boolq/boolq_dev.llmfoundry.jsonl", load_boolq,
                 "BoolQ dev, 3,270 (no passage titles)"),
        TaskSpec("winogrande", "multiple_choice", ("acc",), "winogrande/winogrande_dev.llmfoundry.jsonl",
                 load_winogrande, "WinoGrande-xl dev, 1,267, partial scoring"),
        TaskSpec("lambada_openai", "loglikelihood", ("acc", "perplexity"),
                 "lambada_openai/lambada_test.jsonl",
                 load_lambada, "LAMBADA OpenAI test, 5,153"),
        TaskSpec("hellaswag", "multiple_choice", ("acc", "acc_norm"), None, load_hellaswag,
                 "HellaSwag validation: local file only (hellaswag=PATH)"),
    ]
}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "lambada_openai")


def parse_task_list(text: str | Sequence[str]) -> list[tuple[str, Path]]:
    """``"piqa,arc_easy,hellaswag=/data/hellaswag_val.jsonl"`` -> [(name, file)], all checked.

    Every name and file is checked before any work starts; errors name the allowed values.
    """
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if not items:
        raise SparsecraftError(f"no tasks given; choose from {', '.join(TASKS)}")
    out = []
    for item in items:
        name, _, file = item.partition("=")
        name = name.strip().lower()
        if name == "all":
            out.extend((n, BUNDLED / TASKS[n].default_file) for n in DEFAULT_TASKS)
            continue
        if name not in TASKS:
            raise SparsecraftError(
                f"unknown task {name!r}; choose from {', '.join(TASKS)} (or 'all'), "
                "optionally NAME=PATH for a local file"
            )
        spec = TASKS[name]
        if file:
            path = Path(file).expanduser()
        elif spec.default_file is None:
            raise SparsecraftError(
                f"task {name} has no bundled file; give one as {name}=PATH "
                "(the HellaSwag validation jsonl with activity_label, ctx_a, ctx_b, endings, label)"
            )
        else:
            path = BUNDLED / spec.default_file
        if not path.exists():
            raise SparsecraftError(
                f"task {name}: file {path} does not exist; give an existing file as {name}=PATH"
            )
        out.append((name, path))
    seen = set()
    return [t for t in out if not (t[0] in seen or seen.add(t[0]))]


def load_examples(name: str, path: Path | None = None, limit: int | None = None) -> list[Example]:
    spec = TASKS[name]
    if path is None:
        ((_, path),) = parse_task_list(name)
    examples = spec.loader(Path(path))
    if not examples:
        raise SparsecraftError(f"task {name}: {path} holds no examples")
    return examples[:limit] if limit is not None else examples


# ---------------------------------------------------------------------------------------------
# Tokenisation and scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split: trailing context spaces move to the continuation, the whole string
    is encoded once and the continuation is what follows the context's own encoding."""
    if not context:
        raise SparsecraftError("empty context: every scored request needs some context text")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Request:
    tokens: list[int]  # context + continuation, left-truncated to the model's context + 1
    n_cont: int


def score_requests(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: bool = True, desc: str = "scoring") -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy argmax) per request.

    Inputs are deduplicated, sorted longest first and right-padded; only the positions that
    predict continuation tokens go through the output head and the log-softmax.
    """
    if batch_size < 1:
        raise SparsecraftError(f"batch size {batch_size}: must be at least 1")
    max_len = model_context(model) or 2048
    reqs = []
    for ctx, cont in requests:
        if not cont:
            raise SparsecraftError("a continuation encodes to zero tokens; nothing to score")
        if len(cont) > max_len:
            raise SparsecraftError(f"a continuation of {len(cont)} tokens is longer than the model's context")
        reqs.append(_Request((list(ctx) + list(cont))[-(max_len + 1):], len(cont)))
    # One forward per distinct input (tokens[:-1]); each request then reads its own positions.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(tuple(r.tokens[:-1]), []).append(i)
    inputs = sorted(groups, key=lambda t: -len(t))
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(reqs)
    pad_id = 0
    accepts_keep = _accepts_logits_to_keep(model)
    with torch.inference_mode():
        for start in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=not progress, leave=False):
            batch = inputs[start:start + batch_size]
            width = len(batch[0])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, inp in enumerate(batch):
                ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            # Earliest position any request in the batch reads: keep only logits from there on.
            first = min(len(inp) - max(reqs[i].n_cont for i in groups[inp]) for inp in batch)
            # Right padding needs no attention mask: real tokens never attend to the pads after
            # them, and without a mask attention takes the plain causal path (as lm-eval does).
            kwargs = {"use_cache": False}
            if accepts_keep:
                kwargs["logits_to_keep"] = width - first
            logits = model(ids.to(device), **kwargs).logits
            if logits.shape[1] != width - first:
                logits = logits[:, first:]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, inp in enumerate(batch):
                for i in groups[inp]:
                    r = reqs[i]
                    cont = torch.tensor(r.tokens[-r.n_cont:], device=logprobs.device)
                    lo = len(inp) - r.n_cont - first
                    lp = logprobs[row, lo:lo + r.n_cont]
                    ll = lp.gather(1, cont[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == cont).all().item())
                    results[i] = (ll, greedy)
    return results  # type: ignore[return-value]


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def score_examples(spec: TaskSpec, examples: Sequence[Example],
                   lls: Sequence[tuple[float, bool]]) -> tuple[dict, list[dict]]:
    """Task metrics from the per-request scores (in example order), and one record per example."""
    records, k = [], 0
    for ex in examples:
        res = lls[k:k + len(ex.requests)]
        k += len(ex.requests)
        scores = [ll for ll, _ in res]
        rec: dict = {"gold": ex.gold, "ll": scores}
        if spec.kind == "loglikelihood":
            rec["acc"] = float(res[0][1])
            rec["ll_target"] = scores[0]
        else:
            rec["pred"] = _argmax(scores)
            rec["acc"] = float(rec["pred"] == ex.gold)
            if "acc_norm" in spec.metrics:
                rec["pred_norm"] = _argmax([s / len(t) for s, t in zip(scores, ex.norm_texts)])
                rec["acc_norm"] = float(rec["pred_norm"] == ex.gold)
        records.append(rec)
    metrics: dict = {"n": len(records)}
    for m in spec.metrics:
        if m == "perplexity":
            metrics["perplexity"] = math.exp(-sum(r["ll_target"] for r in records) / len(records))
        else:
            metrics[m], metrics[f"{m}_stderr"] = _mean_stderr([r[m] for r in records])
    return metrics, records


def build_requests(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, c, t) for ex in examples for c, t in ex.requests]


def evaluate_task(model, tokenizer, name: str, path: Path | None = None, limit: int | None = None,
                  batch_size: int = 16, progress: bool = True, samples: bool = False) -> dict:
    spec = TASKS[name]
    examples = load_examples(name, path, limit)
    t0 = time.perf_counter()
    lls = score_requests(model, build_requests(tokenizer, examples), batch_size, progress, desc=name)
    metrics, records = score_examples(spec, examples, lls)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    if samples:
        metrics["samples"] = records
    return metrics


def evaluate_tasks(model, tokenizer, tasks: str | Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
                   batch_size: int = 16, progress: bool = True, samples: bool = False,
                   on_result: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Evaluate ``tasks`` (names, or NAME=PATH) -> {task: {acc, acc_stderr, [acc_norm], n, seconds, ...}}.

    Everything is validated before the first forward pass. ``on_result(name, metrics)`` is called
    after each task, so callers can save partial results.
    """
    if limit is not None and limit < 1:
        raise SparsecraftError(f"--limit {limit}: must be at least 1")
    parsed = parse_task_list(tasks)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for name, path in parsed:
            results[name] = evaluate_task(model, tokenizer, name, path, limit, batch_size, progress, samples)
            if on_result is not None:
                on_result(name, results[name])
    finally:
        model.train(was_training)
    return results


@dataclass
class LmEvalExport:
    """Where :func:`export_lm_eval_tasks` wrote the lm-eval task configs."""

    directory: Path
    tasks: list[str] = field(default_factory=list)


def export_lm_eval_tasks(directory: str | Path, tasks: str | Sequence[str] = DEFAULT_TASKS,
                         limit: int | None = None) -> LmEvalExport:
    """Write the examples we score as local lm-eval tasks (``sc_<name>``) with the same prompts,
    so that ``lm_eval --model hf --include_path DIR --tasks sc_piqa,...`` scores exactly the same
    items offline. One jsonl ({context, choices|target, gold}) and one YAML per task.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    export = LmEvalExport(directory)
    for name, path in parse_task_list(tasks):
        spec, examples = TASKS[name], load_examples(name, path, limit)
        rows = []
        for ex in examples:
            if spec.kind == "loglikelihood":
                rows.append({"context": ex.requests[0][0], "target": ex.requests[0][1]})
            elif name == "winogrande":
                rows.append({"contexts": [c for c, _ in ex.requests], "target": ex.requests[0][1][1:],
                             "gold": ex.gold})
            else:
                rows.append({"context": ex.requests[0][0], "choices": list(ex.norm_texts), "gold": ex.gold})
        data = directory / f"sc_{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data_yaml = json.dumps(str(data.resolve()))  # quoted: any path is a valid YAML string
        lines = [f"task: sc_{name}", "dataset_path: json",
                 f"dataset_kwargs:\n  data_files:\n    test: {data_yaml}", "test_split: test"]
        if spec.kind == "loglikelihood":
            lines += ["output_type: loglikelihood", 'doc_to_text: "{{context}}"',
                      'doc_to_target: "{{target}}"']
        elif name == "winogrande":
            # Partial scoring: lm-eval treats an int doc_to_text as the gold index among the contexts.
            lines += ["output_type: multiple_choice", "doc_to_text: gold", 'doc_to_target: "{{target}}"',
                      'doc_to_choice: "{{contexts}}"']
        else:
            lines += ["output_type: multiple_choice", 'doc_to_text: "{{context}}"', "doc_to_target: gold",
                      'doc_to_choice: "{{choices}}"']
        lines.append("metric_list:")
        for m in spec.metrics:
            agg = "perplexity" if m == "perplexity" else "mean"
            better = "false" if m == "perplexity" else "true"
            lines.append(f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: {better}")
        (directory / f"sc_{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        export.tasks.append(f"sc_{name}")
    return export
