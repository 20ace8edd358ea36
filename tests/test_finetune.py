"""Sparse fine-tuning: losses against hand computations, mask keeping, resume, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsecraft.errors import SparsecraftError
from sparsecraft.finetune import (
    FinetuneConfig,
    LossWeights,
    TrainWindows,
    capture_masks,
    ce_loss,
    check_masks,
    detect_nm,
    finetune,
    kd_loss,
    latest_checkpoint,
    shifted_token_mask,
    squarehead_loss,
    step_indices,
)
from sparsecraft.models import build_random, prunable_linears

VOCAB = 320

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- fixtures


def _tiny(name: str = "tiny-llama", seed: int = 0):
    model, _ = build_random(name, seed=seed)
    return model


def _prune(model, kind: str = "unstructured", seed: int = 0):
    """Zero half of every prunable weight: smallest magnitudes, or the 2 smallest of every 4 inputs."""
    for layer in prunable_linears(model).values():
        w = layer.weight.data
        if kind == "2:4":
            groups = w.reshape(w.shape[0], -1, 4)
            drop = groups.abs().argsort(-1)[..., :2]
            keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
            w.copy_((groups * keep).reshape_as(w))
        else:
            thr = w.abs().flatten().kthvalue(w.numel() // 2).values
            w[w.abs() <= thr] = 0
    return model


@pytest.fixture(scope="module")
def pair():
    """(dense teacher state, sparse student state) of one tiny llama."""
    teacher = _tiny()
    student = _prune(_tiny())
    return teacher.state_dict(), student.state_dict()


def _models(pair):
    teacher, student = _tiny(), _tiny()
    teacher.load_state_dict(pair[0])
    student.load_state_dict(pair[1])
    return student, teacher


def _data(n: int = 12, seqlen: int = 32, seed: int = 0) -> TrainWindows:
    g = torch.Generator().manual_seed(seed)
    return TrainWindows.from_ids(torch.randint(0, VOCAB, (n, seqlen), generator=g))


# ---------------------------------------------------------------- losses


def test_squarehead_matches_hand_computation():
    hs = [torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])]
    ht = [torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])]
    # layer 1: MSE = (0+1+4+9)/4 = 3.5, teacher mean square = 1      -> 3.5
    # layer 2: MSE = (4+1+1+4)/4 = 2.5, teacher mean square = 8/4 = 2 -> 1.25
    assert squarehead_loss(hs, ht).item() == pytest.approx(4.75)
    # only the first token counts: layer 1 (0+1)/2 / 1 = 0.5 ; layer 2 (4+1)/2 / (4/2) = 1.25
    mask = torch.tensor([[1, 0]])
    assert squarehead_loss(hs, ht, mask).item() == pytest.approx(1.75)


def test_squarehead_is_zero_for_equal_hiddens_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(1)
    h = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    assert squarehead_loss(h, [x.clone() for x in h]).item() == 0.0
    mask = torch.ones(2, 5)
    mask[:, -2:] = 0
    noisy = [x.clone() for x in h]
    for x in noisy:
        x[:, -2:] += 100.0  # padding positions: must not matter
    assert squarehead_loss(noisy, h, mask).item() == 0.0
    assert squarehead_loss(noisy, h).item() > 0


def test_squarehead_is_scale_invariant_per_layer():
    g = torch.Generator().manual_seed(2)
    ht = [torch.randn(1, 4, 6, generator=g)]
    hs = [ht[0] + 0.1 * torch.randn(1, 4, 6, generator=g)]
    base = squarehead_loss(hs, ht).item()
    assert squarehead_loss([10 * hs[0]], [10 * ht[0]]).item() == pytest.approx(base, rel=1e-5)


def test_kd_loss_matches_kl_with_temperature_squared():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    T = 2.0
    pt = F.softmax(t / T, -1)
    manual = (pt * (pt.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, temperature=T).item() == pytest.approx(manual.item(), rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]])
    pt1 = F.softmax(t, -1)
    kl = (pt1 * (pt1.log() - F.log_softmax(s, -1))).sum(-1)
    assert kd_loss(s, t, mask).item() == pytest.approx(((kl[0, 0] + kl[1, 2]) / 2).item(), rel=1e-5)


def test_ce_loss_ignores_masked_labels():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 4, 5, generator=g)
    labels = torch.tensor([[0, -100, 3, 1]])
    # positions 1 and 2 predict labels 3 and 1; position 0 predicts -100 (ignored)
    lp = F.log_softmax(logits, -1)
    manual = -(lp[0, 1, 3] + lp[0, 2, 1]) / 2
    assert ce_loss(logits, labels).item() == pytest.approx(manual.item(), rel=1e-6)
    assert shifted_token_mask(labels).tolist() == [[False, True, True, False]]


# ---------------------------------------------------------------- config and data order


def test_config_rejects_bad_values():
    with pytest.raises(SparsecraftError, match="lr"):
        FinetuneConfig(lr=0)
    with pytest.raises(SparsecraftError, match="lr"):
        FinetuneConfig(lr=-1e-4)
    with pytest.raises(SparsecraftError, match="schedule"):
        FinetuneConfig(schedule="step")
    with pytest.raises(SparsecraftError, match="all three are 0"):
        LossWeights(0, 0, 0)
    with pytest.raises(SparsecraftError, match="unknown term"):
        LossWeights.parse("ce=1,mse=2")
    assert LossWeights.parse("squarehead,ce") == LossWeights(ce=1, kd=0, squarehead=1)
    assert LossWeights.parse("ce=0.5,kd=2") == LossWeights(ce=0.5, kd=2, squarehead=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_warms_up_then_decays(schedule):
    cfg = FinetuneConfig(steps=10, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    f = [cfg.lr_factor(s) for s in range(10)]
    assert f[0] < f[1] < f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[-1] >= 0.1 and f[-1] < 0.5


def test_rows_of_a_global_batch_do_not_depend_on_world_size():
    kw = dict(batch_size=2, seed=5)
    for step in range(4):
        one = torch.cat([step_indices(10, step, m, 0, grad_accum=4, world_size=1, **kw) for m in range(4)])
        two = torch.cat([step_indices(10, step, m, r, grad_accum=2, world_size=2, **kw)
                         for m in range(2) for r in range(2)])
        assert torch.equal(one, two)
    # every window is read once per epoch
    epoch = torch.cat([step_indices(10, 0, m, 0, batch_size=5, grad_accum=2, world_size=1, seed=5)
                       for m in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))


# ---------------------------------------------------------------- masks


def test_detect_nm():
    m = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert detect_nm(m) == (2, 4)
    assert detect_nm(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)) is None


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_masks_identical_after_training_steps(pair, kind):
    student, teacher = _models(pair)
    if kind == "2:4":
        student = _prune(student, "2:4")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    masks = capture_masks(student)
    cfg = FinetuneConfig(steps=3, lr=1e-2, batch_size=2, max_grad_norm=None, weight_decay=0.1)
    report = finetune(student, teacher, _data(), cfg, progress=False)
    assert report["mask_check"]["identical"] and report["mask_check"]["regrown"] == 0
    if kind == "2:4":
        assert report["mask"]["nm"] == "2:4"
    for name, mask in masks.items():
        w = dict(student.named_parameters())[name].detach()
        assert torch.equal(w != 0, mask), name
        assert not torch.equal(w, before[name]), f"{name} did not train"
    assert check_masks(student, masks).identical


def test_without_mask_keeping_weights_would_regrow(pair):
    """The check can fail: a plain AdamW step on the sparse student fills the zeros."""
    student, _ = _models(pair)
    masks = capture_masks(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = _data().input_ids[:2]
    student(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    check = check_masks(student, masks)
    assert not check.pruned_still_zero and check.regrown > 0


# ---------------------------------------------------------------- resume


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted_run(pair, tmp_path):
    cfg = dict(steps=4, lr=5e-3, batch_size=2, grad_accum=2, warmup_steps=1, schedule="cosine",
               checkpoint_every=2, seed=3, weight_decay=0.01)
    data = _data(n=10)  # 16 windows read over 4 steps: crosses an epoch boundary

    ref_student, teacher = _models(pair)
    ref = finetune(ref_student, teacher, data, FinetuneConfig(**cfg), output_dir=tmp_path / "ref",
                   progress=False)

    student, teacher = _models(pair)

    def crash(step, metrics):
        if step == 3:  # after the step-2 checkpoint, before the next one
            raise _Crash

    with pytest.raises(_Crash):
        finetune(student, teacher, data, FinetuneConfig(**cfg), output_dir=tmp_path / "run", progress=False,
                 on_step=crash)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"

    student, teacher = _models(pair)  # a fresh process would reload the sparse student
    resumed = finetune(student, teacher, data, FinetuneConfig(**cfg), output_dir=tmp_path / "run",
                       resume=True, progress=False)
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in ref["history"]]
    for (name, a), (_, b) in zip(ref_student.named_parameters(), student.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed["mask_check"]["identical"]


# ---------------------------------------------------------------- teacher cache


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_teacher_gives_the_same_run(pair, cache, tmp_path):
    cfg = dict(steps=2, lr=1e-3, batch_size=2, seed=1)
    s1, t1 = _models(pair)
    plain = finetune(s1, t1, _data(n=4), FinetuneConfig(**cfg), progress=False)
    s2, t2 = _models(pair)
    cached = finetune(s2, t2, _data(n=4), FinetuneConfig(**cfg, teacher_cache=cache),
                      teacher_cache_dir=tmp_path / "cache", progress=False)
    for a, b in zip(plain["history"], cached["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---------------------------------------------------------------- bad input


def test_teacher_of_another_architecture_is_refused(pair):
    student, _ = _models(pair)
    with pytest.raises(SparsecraftError, match="gpt2"):
        finetune(student, _tiny("tiny-gpt2"), _data(), FinetuneConfig(steps=1), progress=False)


def test_teacher_with_another_vocabulary_is_refused(pair):
    from transformers import LlamaConfig, LlamaForCausalLM

    student, teacher = _models(pair)
    cfg = LlamaConfig(**{**teacher.config.to_dict(), "vocab_size": VOCAB + 64})
    with pytest.raises(SparsecraftError, match="vocabulary"):
        finetune(student, LlamaForCausalLM(cfg), _data(), FinetuneConfig(steps=1), progress=False)


def test_dense_student_warns_no_mask(pair):
    dense = _tiny()
    with pytest.warns(UserWarning, match="no mask to keep"):
        finetune(dense, None, _data(n=2), FinetuneConfig(steps=1, loss_weights="ce"), progress=False)


def test_empty_data_and_missing_teacher_are_refused(pair):
    student, _ = _models(pair)
    empty = TrainWindows.from_ids(torch.zeros(0, 16, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SparsecraftError, match="empty"):
            finetune(student, None, empty, FinetuneConfig(steps=1, loss_weights="ce"), progress=False)
    with pytest.raises(SparsecraftError, match="teacher"):
        finetune(student, None, _data(), FinetuneConfig(steps=1), progress=False)


def test_validation_ppl_is_reported(pair):
    student, teacher = _models(pair)
    val = _data(n=2, seed=9).input_ids
    report = finetune(student, teacher, _data(), FinetuneConfig(steps=2, lr=1e-3, eval_every=1, batch_size=2),
                      eval_windows=val, progress=False)
    steps = [e["step"] for e in report["evals"]]
    assert steps == [0, 1, 2]
    assert all(math.isfinite(e["val_ppl"]) and e["val_ppl"] > 1 for e in report["evals"])


def test_gradient_checkpointing_and_bf16_autocast_run_the_same_losses(pair):
    cfg = dict(steps=2, lr=1e-3, batch_size=2, seed=4)
    s1, t1 = _models(pair)
    plain = finetune(s1, t1, _data(n=4), FinetuneConfig(**cfg), progress=False)
    s2, t2 = _models(pair)
    ckpt = finetune(s2, t2, _data(n=4), FinetuneConfig(**cfg, gradient_checkpointing=True), progress=False)
    for a, b in zip(plain["history"], ckpt["history"]):
        assert a["squarehead"] == pytest.approx(b["squarehead"], rel=1e-5)  # no block recorded twice
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert ckpt["mask_check"]["identical"]
    s3, t3 = _models(pair)
    bf16 = finetune(s3, t3, _data(n=4), FinetuneConfig(**cfg, precision="bf16"), progress=False)
    assert bf16["mixed_precision"] == "bf16" and bf16["mask_check"]["identical"]
    assert bf16["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=0.05)


def test_instruction_rows_distill_only_on_answer_tokens(pair):
    from sparsecraft.finetune.data import instruction_windows

    student, teacher = _models(pair)
    rows = instruction_windows([(list(range(10, 40)), 20), (list(range(50, 70)), 15)], seqlen=32, pad_id=0)
    report = finetune(student, teacher, rows, FinetuneConfig(steps=1, lr=1e-3, batch_size=2), progress=False)
    assert math.isfinite(report["history"][0]["loss"]) and report["mask_check"]["identical"]


def test_precomputed_teacher_outputs_replace_the_teacher(pair, tmp_path):
    from sparsecraft.finetune import precompute_teacher

    cfg = FinetuneConfig(steps=2, lr=1e-3, batch_size=2, seed=2, teacher_cache="disk")
    data = _data(n=6)
    s1, t1 = _models(pair)
    live = finetune(s1, t1, data, FinetuneConfig(steps=2, lr=1e-3, batch_size=2, seed=2), progress=False)
    _, t2 = _models(pair)
    assert precompute_teacher(t2, data, cfg, tmp_path / "cache") == 4
    del t2
    s3, _ = _models(pair)
    cached = finetune(s3, None, data, cfg, teacher_cache_dir=tmp_path / "cache", progress=False)
    for a, b in zip(live["history"], cached["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
