"""Sparse fine-tuning on 2 CPU processes (gloo) through accelerate: DDP and FSDP2.

The test launches this file with torchrun; run as a script it is the worker. Checks: the losses
equal a one-process run with the same global batch, the gathered masks equal the sparse input,
and an FSDP2 run interrupted after a sharded checkpoint resumes to the same weights.

accelerate sets up FSDP only for accelerators; on CPU the worker flips accelerate's state to FSDP
after creating the Accelerator (on GPUs `accelerate launch --use_fsdp --fsdp_version 2` does it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS, BATCH, SEQLEN = 4, 2, 64


def _config(**kw):
    from sparsecraft.finetune import FinetuneConfig

    base = dict(steps=STEPS, lr=2e-3, batch_size=BATCH, warmup_steps=1, seed=7, checkpoint_every=2)
    return FinetuneConfig(**{**base, **kw})


def _data(tokenizer):
    from sparsecraft.finetune import text_windows

    return text_windows(tokenizer, "c4", SEQLEN, max_windows=12)


def _accelerator(mode: str):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    if mode == "fsdp":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
        )
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def worker(mode: str, sparse: str, dense: str, out: str, crash_at: int, resume: bool) -> None:
    from torch.distributed.tensor import DTensor

    from sparsecraft.finetune import finetune, validation_windows
    from sparsecraft.models import load

    acc = _accelerator(mode)
    student, tok = load(sparse)
    teacher, _ = load(dense)

    def crash(step, metrics):
        if step == crash_at:
            raise SystemExit(3)

    report = finetune(student, teacher, _data(tok), _config(), accelerator=acc, output_dir=out, resume=resume,
                      eval_windows=validation_windows(tok, SEQLEN, 2), progress=False,
                      on_step=crash if crash_at else None, save_dir=Path(out) / "model", tokenizer=tok)
    sharded = any(isinstance(p, DTensor) for p in acc.unwrap_model(student).parameters())
    if acc.is_main_process:
        report["sharded_params"] = sharded
        Path(out, "report.json").write_text(json.dumps(report))


def _launch(tmp: Path, mode: str, out: Path, crash_at: int = 0, resume: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__, mode, str(tmp / "sparse"), str(tmp / "dense"), str(out), str(crash_at), str(int(resume))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sparsecraft.models import load, prunable_linears, save

    tmp = tmp_path_factory.mktemp("dist")
    model, tok = load("random:tiny-llama", seed=1)
    save(model, tok, tmp / "dense")
    for layer in prunable_linears(model).values():  # 2:4 on half the layers, 50% unstructured on the rest
        w = layer.weight.data
        groups = w.reshape(w.shape[0], -1, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        w.copy_(groups.scatter(-1, drop, 0.0).reshape_as(w))
    save(model, tok, tmp / "sparse")

    # One process, same global batch (grad_accum = world size): the reference.
    from sparsecraft.finetune import finetune

    student, tok = load(str(tmp / "sparse"))
    teacher, _ = load(str(tmp / "dense"))
    ref = finetune(student, teacher, _data(tok), _config(grad_accum=WORLD, checkpoint_every=0),
                   progress=False)
    return tmp, ref, {n: p.detach().clone() for n, p in student.named_parameters()}


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def _check_against_reference(report: dict, weights: dict, ref: dict, ref_weights: dict, sparse_dir: Path):
    assert report["world_size"] == WORLD
    assert report["mask_check"]["identical"], report["mask_check"]
    for a, b in zip(report["history"], ref["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    initial = load_file(str(sparse_dir / "model.safetensors"))
    for name, w in weights.items():
        if name in ref_weights:
            assert torch.allclose(w, ref_weights[name], atol=1e-5, rtol=1e-4), name
        if name.endswith("proj.weight"):
            assert torch.equal(w != 0, initial[name] != 0), f"{name}: mask differs from the sparse input"


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(models):
    tmp, ref, ref_weights = models
    out = tmp / "ddp"
    proc = _launch(tmp, "ddp", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed_type"].endswith("MULTI_CPU")
    _check_against_reference(report, _final_weights(out), ref, ref_weights, tmp / "sparse")


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_crash_resume_and_match(models):
    tmp, ref, ref_weights = models
    out = tmp / "fsdp"
    crashed = _launch(tmp, "fsdp", out, crash_at=3)
    assert crashed.returncode != 0
    assert (out / "checkpoints" / "step-00000002" / "pytorch_model_fsdp_0").is_dir()
    proc = _launch(tmp, "fsdp", out, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed_type"].endswith("FSDP") and report["sharded_params"]
    assert report["start_step"] == 2
    _check_against_reference(report, _final_weights(out), ref, ref_weights, tmp / "sparse")
    shutil.rmtree(out / "checkpoints")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), bool(int(sys.argv[6])))
