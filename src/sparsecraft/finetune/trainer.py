"""The masked fine-tuning loop: losses, mask keeping, schedule, evaluation, checkpoints, resume.

Distribution, mixed precision and checkpoint serialisation go through accelerate, so the same
code runs in one process or under ``accelerate launch`` / ``torchrun`` with DDP or FSDP2.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SparsecraftError
from ..models import save as save_model
from .config import FinetuneConfig
from .data import TrainWindows, step_indices
from .losses import ce_loss, kd_loss, shifted_token_mask, squarehead_loss
from .masks import MaskKeeper, capture_masks, check_masks, mask_summary, transposed_layouts
from .teacher import BlockRecorder, Teacher, check_compatible

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")


class TrainState:
    """What accelerate checkpoints beside model/optimizer/RNG: the step (= data position) and history."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "evals": self.evals}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evals = list(state["evals"])


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones live under a ``.tmp-`` name and are ignored)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name))
    return found[-1] if found else None


def _save_checkpoint(accelerator, root: Path, step: int, keep: int) -> Path:
    """accelerate.save_state into a temporary directory, then one atomic rename."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _make_accelerator(config: FinetuneConfig):
    from accelerate import Accelerator

    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # cpu=True is what makes accelerate set up gloo when torchrun starts several CPU processes.
    mixed = "bf16" if precision == "bf16" else "no"
    try:
        return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    except ValueError:
        # accelerate keeps one global state; a single process may switch precision between runs.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Activation (gradient) checkpointing; transformers renamed the method in v5."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def _peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def _window_nll(model, windows: torch.Tensor, batch_size: int, device) -> tuple[float, int]:
    """Summed next-token NLL over windows. Not eval.perplexity.window_nll: that runs under
    inference_mode, whose tensors FSDP2's all-gather buffers must not become."""
    nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += ids[:, 1:].numel()
    return nll, tokens


def _validation_ppl(model, windows: torch.Tensor, accelerator, batch_size: int) -> float:
    """Perplexity on held-out windows, split over ranks (every rank the same count: FSDP needs it)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = max(1, len(windows) // world)
    shard = windows[rank::world][:per_rank] if len(windows) >= world else windows[:1]
    was_training = model.training
    model.eval()
    nll, tokens = _window_nll(model, shard, batch_size, accelerator.device)
    model.train(was_training)
    totals = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return math.exp(totals[0].item() / totals[1].item())


def rows_read(n_rows: int, config: FinetuneConfig, world_size: int = 1) -> list[int]:
    """Every training row a run of ``config`` reads, in first-read order."""
    seen: dict[int, None] = {}
    for step in range(config.steps):
        for micro in range(config.grad_accum):
            for rank in range(world_size):
                for r in step_indices(n_rows, step, micro, rank, batch_size=config.batch_size,
                                      grad_accum=config.grad_accum, world_size=world_size,
                                      seed=config.seed).tolist():
                    seen.setdefault(r, None)
    return list(seen)


def precompute_teacher(teacher: nn.Module, data: TrainWindows, config: FinetuneConfig, cache_dir: str | Path,
                       world_size: int = 1, device: str | torch.device | None = None,
                       batch_size: int | None = None) -> int:
    """Write the teacher outputs of every row the run will read to ``cache_dir``.

    A later ``finetune(student, None, data, config with teacher_cache="disk",
    teacher_cache_dir=cache_dir)`` then trains with no teacher in memory. Returns the row count.
    """
    w = config.loss_weights
    tutor = Teacher(teacher, device=device, need_logits=w.kd > 0, need_hiddens=w.squarehead > 0, cache="disk",
                    cache_dir=cache_dir)
    rows = rows_read(len(data), config, world_size)
    tutor.precompute(data, rows, batch_size or config.batch_size)
    tutor.release()
    return len(rows)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    data: TrainWindows,
    config: FinetuneConfig,
    *,
    eval_windows: torch.Tensor | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    accelerator=None,
    teacher_device: str | torch.device | None = None,
    teacher_cache_dir: str | Path | None = None,
    progress: bool = True,
    on_step=None,
    save_dir: str | Path | None = None,
    tokenizer=None,
) -> dict:
    """Fine-tune ``student`` in place keeping its zeros; return a JSON-ready report.

    ``data`` rows are read in a seeded order that depends only on (seed, step), which is what makes
    ``resume`` exact. Checkpoints go to ``output_dir/checkpoints`` every ``config.checkpoint_every``
    steps. ``on_step(step, metrics)`` is called after every optimizer step (tests use it to
    simulate a crash). ``save_dir`` writes the trained student (gathered under FSDP) with ``tokenizer``.
    """
    config.validate()
    if not isinstance(data, TrainWindows):
        raise SparsecraftError(f"training data must be TrainWindows, got {type(data).__name__}")
    if len(data) == 0 or data.supervised_tokens() == 0:
        raise SparsecraftError("training data is empty: no windows (or no supervised tokens) to train on")
    weights = config.loss_weights
    if weights.needs_teacher:
        if teacher is None and config.teacher_cache != "disk":
            raise SparsecraftError("the kd/squarehead losses need a teacher; pass the dense model "
                "or use ce only")
        if teacher is not None:
            check_compatible(student, teacher)
    if (config.checkpoint_every or resume) and output_dir is None:
        raise SparsecraftError("checkpoints and --resume need an output directory")
    ckpt_root = Path(output_dir) / "checkpoints" if output_dir is not None else None

    accelerator = accelerator or _make_accelerator(config)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    main = accelerator.is_main_process

    masks = capture_masks(student)
    summary = mask_summary(masks, transposed_layouts(student, masks))
    if main:
        log.info("mask: %d layers, %.1f%% zeros%s", summary["layers"], 100 * summary["sparsity"],
                 f", {summary['nm']} pattern" if summary["nm"] else "")

    if getattr(student.config, "use_cache", None):
        student.config.use_cache = False
    if config.gradient_checkpointing:
        _set_checkpointing(student, True)
    student.train()

    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=config.lr, betas=config.betas,
        eps=config.adam_eps, weight_decay=config.weight_decay,
    )
    model, optimizer = accelerator.prepare(student, optimizer)
    inner_opt = getattr(optimizer, "optimizer", optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner_opt, lambda s: config.lr_factor(s))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)

    unwrapped = accelerator.unwrap_model(model)
    keeper = MaskKeeper(unwrapped, masks)
    keeper.apply()  # a no-op on a fresh student; guards against a wrapper that re-initialised anything
    recorder = BlockRecorder(unwrapped) if weights.squarehead > 0 else None

    tutor = None
    if weights.needs_teacher:
        tutor = Teacher(teacher, device=teacher_device or accelerator.device, need_logits=weights.kd > 0,
                        need_hiddens=weights.squarehead > 0, cache=config.teacher_cache,
                        cache_dir=teacher_cache_dir)

    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            if main:
                log.info("resume: no checkpoint in %s, starting from step 0", ckpt_root)
        else:
            accelerator.load_state(str(ckpt))
            if main:
                log.info("resumed from %s (step %d)", ckpt, state.step)
    start_step = state.step

    world = accelerator.num_processes
    device = accelerator.device
    if eval_windows is not None and start_step == 0 and not state.evals:
        state.evals.append({"step": 0, "val_ppl": _validation_ppl(model, eval_windows, accelerator,
                                                                  config.eval_batch_size)})

    bar = tqdm(total=config.steps, initial=start_step, desc="finetune", disable=not (progress and main))
    train_seconds = 0.0
    tokens_this_run = 0
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "squarehead": 0.0}
        step_tokens = 0
        for micro in range(config.grad_accum):
            rows = step_indices(len(data), step, micro, accelerator.process_index,
                                batch_size=config.batch_size, grad_accum=config.grad_accum,
                                world_size=world, seed=config.seed)
            batch = {k: v.to(device) for k, v in data.rows(rows).items()}
            labels = batch["labels"]
            token_mask = (shifted_token_mask(labels) if config.distill_mask == "loss"
                          else batch["attention_mask"].bool())
            step_tokens += int(batch["attention_mask"].sum())
            t_logits, t_hiddens = (None, [])
            if tutor is not None:
                t_logits, t_hiddens = tutor.outputs(rows, batch["input_ids"], batch["attention_mask"], device)
            sync = micro == config.grad_accum - 1
            with accelerator.no_sync(model) if not sync else _null():
                with accelerator.autocast():
                    if recorder:
                        with recorder.recording():
                            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False)
                        s_hiddens = recorder.take()
                    else:
                        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)
                terms = {}
                if weights.ce > 0:
                    terms["ce"] = ce_loss(out.logits, labels)
                if weights.kd > 0:
                    terms["kd"] = kd_loss(out.logits, t_logits, token_mask, config.kd_temperature)
                if weights.squarehead > 0:
                    terms["squarehead"] = squarehead_loss(s_hiddens, t_hiddens, token_mask)
                loss = sum(getattr(weights, k) * v for k, v in terms.items())
                accelerator.backward(loss / config.grad_accum)
            sums["loss"] += loss.item() / config.grad_accum
            for k, v in terms.items():
                sums[k] += v.item() / config.grad_accum
            del out, loss, terms, t_logits, t_hiddens

        keeper.mask_gradients()
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        keeper.apply()
        step_seconds = time.perf_counter() - t0
        train_seconds += step_seconds

        stats = torch.tensor([sums["loss"], sums["ce"], sums["kd"], sums["squarehead"]], device=device)
        stats = accelerator.reduce(stats, reduction="mean")
        n_tok = accelerator.reduce(torch.tensor(step_tokens, device=device), reduction="sum")
        tokens_this_run += int(n_tok)
        metrics = {"step": step + 1, "lr": lr, "tokens": int(n_tok), "seconds": step_seconds,
                   **{k: float(v) for k, v in zip(("loss", "ce", "kd", "squarehead"), stats.tolist())}}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        state.history.append(metrics)
        state.step = step + 1
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "ce", "kd", "squarehead")
                         if k == "loss" or getattr(weights, k) > 0} | {"lr": f"{lr:.2e}"})
        bar.update(1)

        if eval_windows is not None and config.eval_every and state.step % config.eval_every == 0 \
                and state.step != config.steps:
            ppl = _validation_ppl(model, eval_windows, accelerator, config.eval_batch_size)
            state.evals.append({"step": state.step, "val_ppl": ppl})
            bar.write(f"step {state.step}: validation ppl {ppl:.3f}") if main else None
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, ckpt_root, state.step, config.keep_checkpoints)
        if on_step is not None:
            on_step(state.step, metrics)
    bar.close()

    if eval_windows is not None and (not state.evals or state.evals[-1]["step"] != state.step):
        state.evals.append({"step": state.step, "val_ppl": _validation_ppl(model, eval_windows, accelerator,
                                                                           config.eval_batch_size)})
    model.eval()
    check = check_masks(unwrapped, masks)
    if recorder:
        recorder.remove()
    if tutor is not None:
        tutor.close()
    if config.gradient_checkpointing:
        _set_checkpointing(unwrapped, False)
    if main:
        verdict = "identical" if check.identical else (
            "pruned weights still zero" if check.pruned_still_zero else f"BROKEN ({check.regrown} regrown)")
        log.info("mask check: %s", verdict)
    report = {
        "config": config.to_dict(),
        "world_size": world,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "train_windows": len(data),
        "seqlen": data.seqlen,
        "start_step": start_step,
        "steps": state.step,
        "tokens_this_run": tokens_this_run,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_this_run / train_seconds if train_seconds else None,
        "history": state.history,
        "evals": state.evals,
        "mask": summary,
        "mask_check": check.to_dict(),
        "peak_host_mib": _peak_host_mib(),
    }
    if torch.cuda.is_available():
        report["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if save_dir is not None:
        report["saved_to"] = str(save_trained(model, tokenizer, save_dir, accelerator,
                                              extra_files={"finetune.json": _json_ready(report)}))
    return report


def _json_ready(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "history"}


def save_trained(model, tokenizer, out_dir: str | Path, accelerator, extra_files: dict | None = None) -> Path:
    """Write the trained student as a HF directory; under DDP/FSDP the full weights are gathered first."""
    if accelerator.num_processes == 1:
        return save_model(accelerator.unwrap_model(model), tokenizer, out_dir, extra_files)
    state_dict = accelerator.get_state_dict(model)  # collective: every rank must call it
    out = Path(out_dir)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out, extra_files, state_dict=state_dict)
    accelerator.wait_for_everyone()
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
