"""Recipes: one YAML file chains the stages prune → refine → finetune → quantize → compress → eval → bench.

A recipe::

    name: sgpt50-dsnot-ft-int8
    model: smollm2-135m            # HF dir, .gguf, alias or random:NAME
    out: runs/sgpt50-dsnot-ft-int8 # default: runs/<name> (relative paths: to the current directory)
    stages:
      - prune: {method: sparsegpt, sparsity: 0.5, nsamples: 128, seqlen: 512}
      - refine: {method: dsnot}
      - eval: {ppl: [wikitext2], tasks: [piqa, arc_easy], limit: 500}

Each stage is a one-key mapping ``KIND: {fields}``. The fields of a model-making stage are the
options of the matching ``sparsecraft KIND`` command (``--nsamples 128`` -> ``nsamples: 128``;
dashes or underscores); the runner supplies the input model, ``--out``, ``--json`` and the dense
model (``refine --dense``, ``finetune --teacher``) itself. ``eval`` takes the fields of
:class:`sparsecraft.eval.suite.EvalConfig` and is called through the Python API. Stages that
change the model must come in the order above; ``eval`` and ``bench`` may come anywhere after the
start (several times, too) and measure the newest model.

Before any work starts the whole file is checked: unknown stages, unknown fields, values the
command rejects, stages out of order; every error names the file, the line and the allowed
values. Each stage writes into ``OUT/NN-KIND/`` (the model in ``model/``, its report in
``result.json``, the record in ``stage.json``). A rerun skips every stage whose record matches
its fields and its input; changing a stage reruns it and everything after it. ``OUT/summary.json``
is rewritten after every stage, and at the end ``OUT/report/`` gets the tables and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .errors import SparsecraftError

log = logging.getLogger(__name__)

ORDER = ("prune", "refine", "finetune", "quantize", "compress")  # stages that make a new model
MEASURE = ("eval", "bench")  # stages that measure the newest model
STAGES = ORDER + MEASURE
TOP_KEYS = ("name", "model", "out", "stages", "description")
# Options the runner sets itself (never in a recipe).
RUNNER_OPTIONS = {"out", "json", "json_path", "overwrite", "resume", "no_progress", "help"}
DENSE_OPTION = {"refine": "dense", "finetune": "teacher"}


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _LineLoader(yaml.SafeLoader):
    """Safe YAML whose mappings remember the line of every key."""


class LineDict(dict):
    line: int = 0
    key_lines: dict

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# ---------------------------------------------------------------------------------------------
# Recipe model and validation


@dataclass
class Stage:
    kind: str
    fields: dict
    line: int
    index: int
    argv: list[str] = field(default_factory=list)  # for command-backed stages

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.kind}"


@dataclass
class Recipe:
    path: Path
    name: str
    model: str
    out: Path
    stages: list[Stage]


def _err(path: Path, line: int, msg: str) -> SparsecraftError:
    return SparsecraftError(f"{path}:{line}: {msg}")


def _command_parser(kind: str) -> argparse.ArgumentParser | None:
    """The real ``sparsecraft KIND`` parser, or None when this checkout has no such command."""
    import importlib

    try:
        module = importlib.import_module(f"sparsecraft.cli.{kind}")
    except ModuleNotFoundError as e:
        if e.name == f"sparsecraft.cli.{kind}":
            return None
        raise
    root = argparse.ArgumentParser(prog="sparsecraft")
    sub = root.add_subparsers(dest="command")
    module.register(sub)
    return sub.choices[kind]


def _options(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.Action], list[argparse.Action]]:
    opts, positionals = {}, []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if not action.option_strings:
            positionals.append(action)
            continue
        long = max(action.option_strings, key=len).lstrip("-").replace("-", "_")
        opts[long] = action
    return opts, positionals


def _to_argv(kind: str, fields_: LineDict, parser, path: Path) -> list[str]:
    opts, _ = _options(parser)
    allowed = sorted(k for k in opts if k not in RUNNER_OPTIONS)
    argv: list[str] = []
    for key, value in fields_.items():
        name = str(key).replace("-", "_")
        line = fields_.line_of(key)
        if name in RUNNER_OPTIONS:
            raise _err(path, line, f"stage {kind}: field {key!r} is set by the recipe runner; remove it")
        if name not in opts:
            raise _err(path, line, f"stage {kind}: unknown field {key!r}; allowed: {', '.join(allowed)}")
        action = opts[name]
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise _err(path, line, f"stage {kind}: field {key!r} is a switch; write true or false")
            if value:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, _scalar(v)]
        elif action.nargs in ("*", "+"):
            argv += [flag, *[_scalar(v) for v in (value if isinstance(value, list) else [value])]]
        else:
            if isinstance(value, list | dict):
                if isinstance(value, list) and all(not isinstance(v, list | dict) for v in value):
                    value = ",".join(_scalar(v) for v in value)  # e.g. loss: [squarehead, ce]
                else:
                    raise _err(path, line, f"stage {kind}: field {key!r} takes one value, not {value!r}")
            argv += [flag, _scalar(value)]
    return argv


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _check_argv(kind: str, argv: list[str], parser, path: Path, line: int) -> None:
    """Let the command's own parser judge types and choices, without running anything."""
    _, positionals = _options(parser)
    trial = ["INPUT"] * len(positionals) + argv
    opts, _ = _options(parser)
    for name in ("out",):
        if name in opts:
            trial += [max(opts[name].option_strings, key=len), "OUT"]
    dense = DENSE_OPTION.get(kind)
    if dense and dense in opts:
        trial += [max(opts[dense].option_strings, key=len), "DENSE"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            parser.parse_args(trial)
    except SystemExit:
        msg = buf.getvalue().strip().splitlines()[-1] if buf.getvalue().strip() else "invalid options"
        msg = msg.split("error: ", 1)[-1]
        raise _err(path, line, f"stage {kind}: {msg}") from None


def _check_prune(stage: Stage, path: Path) -> None:
    """PruneConfig validates values argparse cannot (sparsity range, N:M, OWL settings)."""
    from .prune import PruneConfig

    known = {f.name for f in fields(PruneConfig)}
    kwargs = {str(k).replace("-", "_"): v for k, v in stage.fields.items()}
    kwargs = {k: v for k, v in kwargs.items() if k in known and k not in ("dsnot", "targets", "ignore")}
    kwargs.setdefault("method", "sparsegpt")
    try:
        PruneConfig(**kwargs)
    except SparsecraftError as e:
        raise _err(path, stage.line, f"stage prune: {e}") from None
    except TypeError as e:
        raise _err(path, stage.line, f"stage prune: {e}") from None


def _check_eval(stage: Stage, path: Path) -> None:
    from .eval.suite import EvalConfig

    allowed = [f.name for f in fields(EvalConfig) if f.name not in ("dtype", "device")]
    kwargs = {}
    for key, value in stage.fields.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise _err(
                path,
                stage.fields.line_of(key),
                f"stage eval: unknown field {key!r}; allowed: {', '.join(allowed)}",
            )
        if name in ("tasks", "ppl") and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        kwargs[name] = value
    try:
        EvalConfig(**kwargs).validate()
    except SparsecraftError as e:
        raise _err(path, stage.line, f"stage eval: {e}") from None
    stage.fields = LineDict(kwargs)
    stage.fields.line, stage.fields.key_lines = stage.line, {}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe completely; nothing runs here."""
    path = Path(path)
    if not path.is_file():
        raise SparsecraftError(f"{path}: recipe file not found")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SparsecraftError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({e})") from None
    if not isinstance(doc, LineDict):
        raise SparsecraftError(f"{path}:1: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise _err(path, doc.line_of(key), f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    for key in ("model", "stages"):
        if key not in doc:
            raise _err(path, doc.line, f"missing key {key!r} (a recipe needs model and stages)")
    name = str(doc.get("name") or path.stem)
    out = Path(doc.get("out") or Path("runs") / name)
    items = doc["stages"]
    if not isinstance(items, list) or not items:
        raise _err(
            path,
            doc.line_of("stages"),
            f"stages: a list of one-key mappings, each one of {', '.join(STAGES)}",
        )
    stages: list[Stage] = []
    last_order = -1
    for i, item in enumerate(items, 1):
        line = item.line if isinstance(item, LineDict) else doc.line_of("stages")
        if isinstance(item, str):
            item = LineDict({item: None})
            item.line, item.key_lines = line, {}
        if not isinstance(item, LineDict) or len(item) != 1:
            raise _err(
                path, line, f"stage {i}: write it as KIND: {{fields}} with KIND one of {', '.join(STAGES)}"
            )
        kind, body = next(iter(item.items()))
        line = item.line_of(kind)
        if kind not in STAGES:
            raise _err(path, line, f"unknown stage {kind!r}; allowed: {', '.join(STAGES)}")
        if body is None:
            body = LineDict()
            body.line, body.key_lines = line, {}
        if not isinstance(body, LineDict):
            raise _err(path, line, f"stage {kind}: its fields must be a mapping (field: value)")
        if kind in ORDER:
            pos = ORDER.index(kind)
            if pos <= last_order:
                raise _err(
                    path,
                    line,
                    f"stage {kind} comes after {ORDER[last_order]}; model stages run in the "
                    f"order {' -> '.join(ORDER)}, each at most once",
                )
            last_order = pos
        stage = Stage(kind, body, line, i)
        if kind == "eval":
            _check_eval(stage, path)
        else:
            parser = _command_parser(kind)
            if parser is None:
                raise _err(
                    path, line, f"stage {kind}: `sparsecraft {kind}` is not available in this installation"
                )
            stage.argv = _to_argv(kind, body, parser, path)
            _check_argv(kind, stage.argv, parser, path, line)
            if kind == "prune":
                _check_prune(stage, path)
        stages.append(stage)
    return Recipe(path, name, str(doc["model"]), out, stages)


# ---------------------------------------------------------------------------------------------
# Running


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone
    os.replace(tmp, path)


def _figures(kind: str, result: dict | None) -> dict:
    """A few headline numbers of a stage's result, for the summary table."""
    if not result:
        return {}
    out: dict = {}
    if kind in ("prune", "refine"):
        s = result.get("summary", {})
        out = {
            "sparsity": s.get("sparsity"),
            "mean_rel_error": s.get("mean_rel_error"),
            "seconds": result.get("timing", {}).get("total_s"),
        }
    elif kind == "finetune":
        evals = result.get("evals") or []
        if evals:
            out["val_ppl_first"], out["val_ppl_last"] = evals[0].get("val_ppl"), evals[-1].get("val_ppl")
        out["masks_identical"] = (result.get("mask_check") or {}).get("identical")
        out["tokens_per_s"] = result.get("tokens_per_s")
    elif kind in ("quantize", "compress"):
        size = result.get("size", result)
        total = size.get("total", {}) if isinstance(size, dict) else {}
        out = {"bits_per_weight": total.get("bits_per_weight")}
    elif kind == "eval":
        for res in result.get("models", {}).values():
            for key, entry in res.get("ppl", {}).items():
                out[f"ppl {key.split('@')[0]}"] = entry["ppl"]
            for task, m in res.get("tasks", {}).items():
                out[f"{task} acc"] = m.get("acc")
            if "gsm8k" in res:
                out.update(
                    {
                        f"gsm8k {k}": res["gsm8k"][k]
                        for k in ("exact_match", "answer_ppl")
                        if k in res["gsm8k"]
                    }
                )
    elif kind == "bench":
        for name, v in (result.get("variants") or {}).items():
            out[f"{name} tok/s"] = v.get("tokens_per_s")
            if v.get("speedup_vs_dense") is not None and not name.startswith("dense"):
                out[f"{name} x dense"] = v["speedup_vs_dense"]
    return {k: v for k, v in out.items() if v is not None}


def _model_dir(path: Path) -> str:
    """Where a stage left its model: ``--out`` itself, or its ``model/`` (finetune keeps
    checkpoints and reports beside the model)."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return str(path / "model")
    return str(path)


def _run_command(
    kind: str, stage: Stage, model: str, dense: str, stage_dir: Path, resume: bool
) -> dict | None:
    parser = _command_parser(kind)
    opts, positionals = _options(parser)
    model_dir = stage_dir / "model"
    result_path = stage_dir / "result.json"
    argv = [model] * len(positionals) + list(stage.argv)
    if kind in ORDER:
        argv += [max(opts["out"].option_strings, key=len), str(model_dir)]
    elif "out" in opts:
        argv += [max(opts["out"].option_strings, key=len), str(stage_dir / "out")]
    json_opt = opts.get("json") or opts.get("json_path")
    if json_opt is not None:
        argv += [max(json_opt.option_strings, key=len), str(result_path)]
    if (
        kind in DENSE_OPTION
        and DENSE_OPTION[kind] in opts
        and not any(a == max(opts[DENSE_OPTION[kind]].option_strings, key=len) for a in argv)
    ):
        argv += [max(opts[DENSE_OPTION[kind]].option_strings, key=len), dense]
    can_resume = "resume" in opts
    if resume and can_resume:
        argv.append("--resume")
    elif model_dir.exists():
        shutil.rmtree(model_dir)  # a failed earlier attempt that cannot be resumed
    if "overwrite" in opts and model_dir.exists():
        argv.append("--overwrite")
    if "no_progress" in opts:
        argv.append("--no-progress")
    log.info("stage %s: sparsecraft %s %s", stage.dirname, kind, " ".join(argv))
    args = parser.parse_args(argv)
    args.command = kind
    args.debug = False
    code = int(args.func(args) or 0)
    if code:
        raise SparsecraftError(f"stage {stage.dirname}: sparsecraft {kind} exited with code {code}")
    return json.loads(result_path.read_text()) if result_path.is_file() else None


def _run_eval(stage: Stage, model: str, stage_dir: Path, resume: bool) -> dict:
    """``resume``: an interrupted attempt on the same input keeps its finished measurements;
    otherwise old results (of another input or other fields) are discarded."""
    from .eval.suite import run_eval

    result_path = stage_dir / "result.json"
    if not resume and result_path.exists():
        result_path.unlink()
    return run_eval([model], json_path=result_path, resume=resume, **dict(stage.fields))


def run_recipe(recipe: Recipe | str | Path, force: bool = False) -> dict:
    """Run (or continue) a recipe; returns the summary that is also written to OUT/summary.json."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "model": recipe.model,
        "out": str(out),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": {},
    }
    summary_path = out / "summary.json"
    model = recipe.model
    upstream = _fingerprint(recipe.model)
    t_all = time.perf_counter()
    for stage in recipe.stages:
        stage_dir = out / stage.dirname
        record_path = stage_dir / "stage.json"
        fp = _fingerprint(stage.kind, dict(stage.fields), upstream)
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        output = _model_dir(stage_dir / "model") if stage.kind in ORDER else None
        if record and record.get("fingerprint") == fp and record.get("status") == "done" and not force:
            log.info("stage %s: done before, skipped", stage.dirname)
            entry = {**record, "status": "skipped (done before)"}
        else:
            # An interrupted attempt (same fields and input, not finished) continues where it stopped.
            started = (
                record is not None and record.get("fingerprint") == fp and record.get("status") != "done"
            )
            stage_dir.mkdir(parents=True, exist_ok=True)
            _write_json(
                record_path,
                {
                    "fingerprint": fp,
                    "status": "running",
                    "kind": stage.kind,
                    "fields": dict(stage.fields),
                    "input": model,
                },
            )
            t0 = time.perf_counter()
            try:
                if stage.kind == "eval":
                    result = _run_eval(stage, model, stage_dir, started)
                else:
                    result = _run_command(stage.kind, stage, model, recipe.model, stage_dir, started)
            except BaseException as e:
                _write_json(
                    record_path,
                    {
                        "fingerprint": fp,
                        "status": "failed",
                        "kind": stage.kind,
                        "fields": dict(stage.fields),
                        "input": model,
                        "error": str(e),
                    },
                )
                summary["stages"][stage.dirname] = {"status": "failed", "error": str(e)}
                _write_json(summary_path, summary)
                raise
            output = _model_dir(stage_dir / "model") if stage.kind in ORDER else None
            if output is not None and not Path(output, "config.json").is_file():
                raise SparsecraftError(
                    f"stage {stage.dirname}: sparsecraft {stage.kind} left no model in {output}"
                )
            entry = {
                "fingerprint": fp,
                "status": "done",
                "kind": stage.kind,
                "fields": dict(stage.fields),
                "input": model,
                "output": output,
                "seconds": round(time.perf_counter() - t0, 1),
                "result": str(stage_dir / "result.json") if (stage_dir / "result.json").is_file() else None,
                "figures": _figures(stage.kind, result),
            }
            _write_json(record_path, entry)
        summary["stages"][stage.dirname] = {k: v for k, v in entry.items() if k != "fingerprint"}
        _write_json(summary_path, summary)
        if stage.kind in ORDER:
            model, upstream = output, fp
    summary["seconds_this_run"] = round(time.perf_counter() - t_all, 1)
    summary["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    summary["report"] = _make_report(out, summary)
    _write_json(summary_path, summary)
    return summary


def _make_report(out: Path, summary: dict) -> str | None:
    """Tables and plots of this run: the summary, the stages' reports and results."""
    from .report import build_report

    inputs = [out / "summary.json"]
    for name, st in summary["stages"].items():
        if st.get("result"):
            inputs.append(Path(st["result"]))
        elif (
            st.get("output")
            and (Path(st["output"]) / "sparsecraft.json").is_file()
            and name.endswith("prune")
        ):
            inputs.append(Path(st["output"]) / "sparsecraft.json")
    _write_json(out / "summary.json", summary)
    try:
        res = build_report(
            [p for p in inputs if p.is_file()], out / "report", title=f"recipe {summary['name']}"
        )
    except SparsecraftError as e:
        log.warning("report not written: %s", e)
        return None
    return res["markdown"]
