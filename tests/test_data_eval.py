import math

import pytest
import torch
import torch.nn.functional as F

from sparsecraft.data import calibration_windows, eval_windows, load_text
from sparsecraft.errors import SparsecraftError
from sparsecraft.eval import perplexity


@pytest.fixture(scope="module")
def tok():
    from sparsecraft.models import byte_tokenizer

    return byte_tokenizer()


def test_eval_windows_protocol(tok):
    text = load_text("wikitext2", "evaluation")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")  # rows joined with "\n\n"; first row blank
    windows = eval_windows(tok, "wikitext2", seqlen=128, max_windows=5)
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert windows.shape == (5, 128)
    assert torch.equal(windows.reshape(-1), ids[: 5 * 128])  # non-overlapping, in order


def test_eval_windows_drop_tail(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 300)
    assert eval_windows(tok, str(path), seqlen=128).shape == (2, 128)
    with pytest.raises(SparsecraftError, match="shorter than one window"):
        eval_windows(tok, str(path), seqlen=1024)


def test_calibration_is_seeded_and_refuses_test_splits(tok):
    a = calibration_windows(tok, "c4", nsamples=4, seqlen=64, seed=0)
    b = calibration_windows(tok, "c4", nsamples=4, seqlen=64, seed=0)
    c = calibration_windows(tok, "c4", nsamples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    for source in ("wikitext2", "ptb"):
        with pytest.raises(SparsecraftError, match="evaluation only"):
            calibration_windows(tok, source, nsamples=1, seqlen=8)
    with pytest.raises(SparsecraftError, match="evaluation only"):
        load_text("wikitext2", "training")


def test_c4_splits_never_mix():
    train, val = load_text("c4", "training"), load_text("c4val", "evaluation")
    assert train.startswith("Beginners BBQ Class")
    assert val[:200] not in train


def test_calibration_too_short(tok, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "hello world"}\n')
    with pytest.raises(SparsecraftError, match="shorter than nsamples"):
        calibration_windows(tok, str(path), nsamples=2, seqlen=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(SparsecraftError, match="no 'text' field"):
        calibration_windows(tok, str(bad), nsamples=1, seqlen=2)


def test_perplexity_equals_brute_force(tiny):
    model, tok = tiny("tiny-llama")
    windows = eval_windows(tok, "ptb", seqlen=32, max_windows=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:  # one window, one position at a time
            logits = model(w[None]).logits[0]
            for t in range(w.numel() - 1):
                total -= F.log_softmax(logits[t].double(), -1)[w[t + 1]].item()
                count += 1
    expected = math.exp(total / count)
    got = perplexity(model, tok, "ptb", seqlen=32, max_windows=3, batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_refuses_seqlen_above_context(tiny):
    model, tok = tiny("tiny-llama")
    with pytest.raises(SparsecraftError, match="above the model's context"):
        perplexity(model, tok, "wikitext2", seqlen=4096)
