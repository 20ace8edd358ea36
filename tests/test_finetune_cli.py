"""Fine-tuning data (packed C4, GSM8K instruction format) and the `sparsecraft finetune` command."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecraft.cli import main
from sparsecraft.errors import SparsecraftError
from sparsecraft.finetune import gsm8k_windows, pack_tokens, text_windows, training_data, validation_windows
from sparsecraft.finetune.data import GSM8K_TRAIN, instruction_windows
from sparsecraft.models import byte_tokenizer, load, prunable_linears, save

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pack_tokens_cuts_full_windows_in_order():
    ids = torch.arange(10)
    assert pack_tokens(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_text_windows_pack_a_file_and_refuse_test_splits(tmp_path):
    tok = byte_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 60)  # 600 byte tokens
    data = text_windows(tok, str(path), 256)
    assert data.input_ids.shape == (2, 256)
    assert torch.equal(data.labels, data.input_ids) and bool(data.attention_mask.all())
    assert tok.decode(data.input_ids[0, :10]) == "abcdefghij"
    with pytest.raises(SparsecraftError, match="no training window"):
        text_windows(tok, str(path), 1024)
    # validation windows: C4 documents 900-999, never a test split
    val = validation_windows(tok, 256, 2)
    assert val.shape == (2, 256)
    for source in ("wikitext2", "ptb"):
        with pytest.raises(SparsecraftError, match="evaluation only"):
            text_windows(tok, source, 256)


def test_instruction_rows_put_loss_on_the_answer_only():
    rows = instruction_windows([([5, 6, 7, 8, 9], 2), ([1, 2, 3], 1)], seqlen=6, pad_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 0, 0, 0]]
    assert rows.labels.tolist() == [[-100, -100, 7, 8, 9, -100], [-100, 2, 3, -100, -100, -100]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]


def test_gsm8k_windows_use_the_train_file_and_mask_prompts():
    tok = byte_tokenizer()
    data = gsm8k_windows(tok, seqlen=1024, max_examples=4)
    assert len(data) == 4
    first = json.loads(GSM8K_TRAIN.open().readline())
    row_text = tok.decode(data.input_ids[0][data.attention_mask[0].bool()])
    assert row_text.startswith("Question: " + first["question"][:30])
    answer = tok.decode(data.labels[0][data.labels[0] != -100][:-1])  # drop the EOS label
    assert answer == " " + first["answer"].strip()
    with pytest.raises(SparsecraftError, match="test split"):
        gsm8k_windows(tok, 1024, path=GSM8K_TRAIN.with_name("test.jsonl"))


def test_training_data_refuses_an_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SparsecraftError, match="empty"):
        training_data(byte_tokenizer(), str(empty), 64)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftcli")
    model, tok = load("random:tiny-llama", seed=2)
    save(model, tok, tmp / "dense")
    for layer in prunable_linears(model).values():
        w = layer.weight.data
        w[w.abs() <= w.abs().median()] = 0
    save(model, tok, tmp / "sparse")
    # a small training text keeps the test fast (C4 itself is covered above)
    (tmp / "train.txt").write_text(" ".join(f"line {i} of some training text." for i in range(200)))
    return tmp


def _run(model_dirs, out, *extra):
    return main(["finetune", str(model_dirs / "sparse"), "--teacher", str(model_dirs / "dense"),
                 "--data", str(model_dirs / "train.txt"), "--steps", "2", "--batch-size", "2",
                 "--seqlen", "64", "--max-train-windows", "8",
                 "--eval-windows", "2", "--lr", "1e-3", "--out", str(out), "--no-progress", *extra])


def test_cli_trains_keeps_mask_and_resumes(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(model_dirs, out, "--checkpoint-every", "1", "--loss-weights", "ce=1,squarehead=1",
                "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mask_check"]["identical"] and report["steps"] == 2
    assert report["config"]["loss_weights"] == {"ce": 1.0, "kd": 0.0, "squarehead": 1.0}
    assert (tmp_path / "r.json").exists() and (out / "checkpoints" / "step-00000002").is_dir()
    trained, _ = load(str(out / "model"))
    sparse, _ = load(str(model_dirs / "sparse"))
    for (name, a), (_, b) in zip(prunable_linears(trained).items(), prunable_linears(sparse).items()):
        assert torch.equal(a.weight != 0, b.weight != 0), name
    assert "mask identical" in capsys.readouterr().out
    # --resume with 3 steps continues from the step-2 checkpoint
    assert _run(model_dirs, out, "--checkpoint-every", "1", "--loss-weights", "ce=1,squarehead=1",
                "--resume", "--steps", "3") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["start_step"] == 2 and report["steps"] == 3


def test_cli_bad_input_gives_one_line_errors(model_dirs, tmp_path, capsys):
    assert _run(model_dirs, tmp_path / "a", "--lr", "0") == 2
    assert "learning rate must be > 0" in capsys.readouterr().err
    assert _run(model_dirs, tmp_path / "b", "--data", "ptb") == 2
    assert "evaluation only" in capsys.readouterr().err
    assert _run(model_dirs, tmp_path / "c", "--teacher", "random:tiny-gpt2") == 2
    assert "teacher" in capsys.readouterr().err
