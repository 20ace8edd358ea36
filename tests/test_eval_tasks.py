"""Zero-shot scoring against a brute-force loop, task files, GSM8K answer extraction, the suite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.eval import gsm8k as g
from sparsecraft.eval.suite import format_table, run_eval
from sparsecraft.eval.tasks import (
    TASKS,
    Example,
    encode_pair,
    evaluate_tasks,
    export_lm_eval_tasks,
    load_examples,
    parse_task_list,
    score_examples,
    score_requests,
)


def brute_force(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded forward per request, full logits."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_score_requests_matches_brute_force(tiny, arch):
    model, tok = tiny(arch)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for _ in range(9):
        ctx = torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        cont = torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        reqs.append((ctx, cont))
    # Shared context with one-token continuations: deduplicated into one forward.
    reqs += [([5, 6, 7, 8], [9]), ([5, 6, 7, 8], [10]), ([5, 6, 7], [8, 11])]
    # A continuation the model predicts greedily, so is_greedy is exercised both ways.
    ctx = [1, 2, 3, 4, 5]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    reqs.append((ctx, [nxt]))
    want = [brute_force(model, c, t) for c, t in reqs]
    assert want[-1][1] is True
    for bs in (1, 4, 64):
        got = score_requests(model, reqs, batch_size=bs, progress=False)
        for (ll, greedy), (wll, wgreedy) in zip(got, want):
            assert ll == pytest.approx(wll, abs=1e-4)
            assert greedy == wgreedy


class CharTok:
    """Whitespace-sensitive toy tokenizer: a space joins the following word into one token."""

    def encode(self, text):
        out, word = [], ""
        for ch in text:
            if ch == " " and word:
                out.append(hash(word) % 1000)
                word = ""
            word += ch
        if word:
            out.append(hash(word) % 1000)
        return out


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding():
    tok = CharTok()
    ctx, cont = encode_pair(tok, "the cat ", "sat")
    # The trailing space belongs to the continuation: " sat" is one token, as in running text.
    assert ctx == tok.encode("the cat")
    assert cont == tok.encode("the cat sat")[len(ctx):] == [hash(" sat") % 1000]
    with pytest.raises(SparsecraftError):
        encode_pair(tok, "", "x")


def test_score_examples_acc_and_acc_norm_follow_lm_eval():
    spec = TASKS["piqa"]
    # Choice 1 has the higher total log-likelihood, the long choice 0 the higher per-character one.
    examples = [Example((("q", " abcdefgh"), ("q", " ab")), 0, ("abcdefgh", "ab"))]
    metrics, recs = score_examples(spec, examples, [(-4.0, False), (-3.0, False)])
    assert recs[0]["pred"] == 1 and recs[0]["pred_norm"] == 0
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0
    # Ties go to the first choice, as numpy's argmax does.
    metrics, recs = score_examples(spec, examples, [(-3.0, False), (-3.0, False)])
    assert recs[0]["pred"] == 0


def test_lambada_metrics_are_greedy_accuracy_and_exp_mean_nll():
    spec = TASKS["lambada_openai"]
    exs = [Example((("a", " b"),), 0), Example((("c", " d"),), 0)]
    metrics, _ = score_examples(spec, exs, [(-1.0, True), (-3.0, False)])
    assert metrics["acc"] == 0.5
    assert metrics["perplexity"] == pytest.approx(math.exp(2.0))


def test_bundled_tasks_load_with_lm_eval_prompts():
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267,
              "lambada_openai": 5153}
    for name, n in counts.items():
        assert len(load_examples(name)) == n
    piqa = load_examples("piqa", limit=1)[0]
    assert piqa.requests[0][0].startswith("Question: How do I ready a guinea pig cage")
    assert piqa.requests[0][0].endswith("\nAnswer:") and piqa.requests[0][1].startswith(" Provide")
    boolq = load_examples("boolq", limit=1)[0]
    assert not boolq.requests[0][0].startswith("Passage:")
    assert boolq.requests[0][0].endswith("?\nAnswer:") and [t for _, t in boolq.requests] == [" no", " yes"]
    wino = load_examples("winogrande", limit=1)[0]
    assert wino.requests[0][0].endswith("so Sarah") and wino.requests[1][0].endswith("so Maria")
    assert wino.requests[0][1] == " always got the easier cases." and wino.gold == 1
    lam = load_examples("lambada_openai", limit=1)[0]
    assert lam.requests[0][1].startswith(" ") and " " not in lam.requests[0][1][1:]


def test_hellaswag_local_file_original_layout(tmp_path):
    row = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "then he",
           "endings": ["bakes [title] bread.", "sleeps.", "x", "y"], "label": "0"}
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [(name, p)] = parse_task_list(f"hellaswag={path}")
    ex = load_examples(name, p)[0]
    assert ex.requests[0] == ("Baking: A man mixes flour. Then he", " bakes. bread.")
    assert ex.gold == 0


@pytest.mark.parametrize("bad, fragment", [
    ("piqa,nope", "unknown task 'nope'"),
    ("hellaswag", "hellaswag=PATH"),
    ("piqa=/no/such/file.jsonl", "does not exist"),
    ("", "no tasks given"),
])
def test_bad_task_lists_name_allowed_values(bad, fragment):
    with pytest.raises(SparsecraftError, match=fragment) as e:
        parse_task_list(bad)
    if "unknown" in fragment:
        assert "arc_easy" in str(e.value)


def test_evaluate_tasks_on_tiny_model_is_batch_independent(tiny):
    model, tok = tiny("tiny-llama")
    a = evaluate_tasks(model, tok, "piqa,winogrande,lambada_openai", limit=4, batch_size=1, progress=False)
    b = evaluate_tasks(model, tok, ["piqa", "winogrande", "lambada_openai"], limit=4, batch_size=5,
                       progress=False)
    for task in a:
        assert a[task]["n"] == 4
        for k in ("acc", "acc_norm", "perplexity"):
            if k in a[task]:
                assert a[task][k] == pytest.approx(b[task][k], rel=1e-5)
    with pytest.raises(SparsecraftError, match="--limit"):
        evaluate_tasks(model, tok, "piqa", limit=0)


def test_export_lm_eval_tasks_writes_same_examples(tmp_path):
    export_lm_eval_tasks(tmp_path, "piqa,winogrande,lambada_openai", limit=3)
    rows = [json.loads(line) for line in open(tmp_path / "sc_piqa.jsonl")]
    ex = load_examples("piqa", limit=3)
    assert [r["context"] for r in rows] == [e.requests[0][0] for e in ex]
    assert [r["gold"] for r in rows] == [e.gold for e in ex]
    assert "output_type: loglikelihood" in (tmp_path / "sc_lambada_openai.yaml").read_text()
    assert "doc_to_text: gold" in (tmp_path / "sc_winogrande.yaml").read_text()


# --- GSM8K ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("She has 5 + 3 = 8 apples. The answer is 8.", "8"),
    ("so 1,234 dollars. #### 1,234", "1234"),
    ("#### $70,000.", "70000"),
    ("The answer is -3.", "-3"),
    ("costs 2.50 then 7.0", "7"),
    ("first 12 then #### 5 and later 9", "5"),
    ("no numbers here", None),
    ("It is 0.5 of 10. The answer is 0.5", "0.5"),
])
def test_extract_answer(text, want):
    assert g.extract_answer(text) == want


def test_reference_answer_and_prompt():
    assert g.reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    prompt = g.fewshot_prompt("How many?", 8)
    assert prompt.count("Q: ") == 9 and prompt.endswith("Q: How many?\nA:")
    assert prompt.count("The answer is") == 8
    assert g.fewshot_prompt("x", 0) == "Q: x\nA:"
    assert g.truncate_at_stop(" 4 + 4 = 8. The answer is 8.\n\nQ: next") == " 4 + 4 = 8. The answer is 8.\n\n"


def test_gsm8k_on_tiny_model(tiny):
    model, tok = tiny("tiny-llama")
    res = g.evaluate_gsm8k(model, tok, g.GSM8KConfig(limit=2, ppl_limit=3, max_new_tokens=4, batch_size=2,
                                                     num_fewshot=1),
                           progress=False, samples=True)
    assert res["n"] == 2 and 0.0 <= res["exact_match"] <= 1.0
    assert res["ppl_n"] == 3 and res["answer_ppl"] > 1.0 and res["answer_tokens"] > 0
    # Greedy generation in a batch equals generating each prompt alone (left padding is harmless).
    prompts = ["Q: 1+1?\nA:", "Q: a much longer question about apples and pears?\nA:"]
    batched = g.generate_greedy(model, tok, prompts, 6, batch_size=2, progress=False)
    alone = [g.generate_greedy(model, tok, [p], 6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == alone
    with pytest.raises(SparsecraftError):
        g.GSM8KConfig(num_fewshot=9)


def test_run_eval_table_and_resume(tmp_path):
    out = tmp_path / "r.json"
    res = run_eval(["random:tiny-llama"], "piqa,lambada_openai", limit=2, json_path=out, progress=False,
                   gsm8k_ppl_limit=2)
    saved = json.loads(out.read_text())
    assert saved["models"]["random:tiny-llama"]["tasks"]["piqa"]["n"] == 2
    table = format_table(res)
    assert "| piqa (n=2) | acc |" in table and "answer_ppl" in table
    # Resume keeps finished measurements: mark one and check it survives a rerun.
    saved["models"]["random:tiny-llama"]["tasks"]["piqa"]["marker"] = 1
    out.write_text(json.dumps(saved))
    res2 = run_eval(["random:tiny-llama"], "piqa,lambada_openai", limit=2, json_path=out, resume=True,
                    progress=False, gsm8k_ppl_limit=2)
    assert res2["models"]["random:tiny-llama"]["tasks"]["piqa"]["marker"] == 1
    with pytest.raises(SparsecraftError, match="nothing to evaluate"):
        run_eval(["random:tiny-llama"], [], progress=False)
    with pytest.raises(SparsecraftError, match="unknown task"):
        run_eval(["random:tiny-llama"], "pika", progress=False)
