"""GSM8K: 8-shot chain-of-thought exact match, and teacher-forced perplexity of the reference answers.

Generation follows the usual protocol (Wei et al. 2022 exemplars, the format of lm-eval's
``gsm8k_cot``): ``Q: <question>\\nA: <reasoning> The answer is N.`` blocks separated by blank
lines, greedy decoding, cut at the first ``Q:`` (the model starting a new question) or an end
token. The predicted number is the one after ``####`` when the model writes one, else the last
number in its answer. Exact match compares numbers after dropping ``,``, ``$`` and a trailing ``.``.

Small models rarely get GSM8K right, so the teacher-forced perplexity of the reference worked
answers (``Question: q\\nAnswer: <answer>``, the format the GSM8K fine-tuning uses) is reported too:
it moves smoothly with pruning and recovery where exact match sits near zero.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import SparsecraftError
from .tasks import BUNDLED, encode_pair, score_requests

GSM8K_TEST = BUNDLED / "gsm8k" / "test.jsonl"

# The eight exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits Reasoning".
COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does "
     "he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
     "many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing "
     "2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8. The answer is 8."),
)
STOP_STRINGS = ("Q:", "</s>", "<|im_end|>")
_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class GSM8KConfig:
    limit: int | None = 100          # first N test questions for generation (None: all 1,319)
    ppl_limit: int | None = None     # first N for the answer perplexity (None: all)
    num_fewshot: int = 8
    max_new_tokens: int = 256
    batch_size: int = 8

    def __post_init__(self):
        if not 0 <= self.num_fewshot <= len(COT_EXEMPLARS):
            raise SparsecraftError(
                f"gsm8k num_fewshot {self.num_fewshot}: must be in 0..{len(COT_EXEMPLARS)}"
            )
        for name in ("limit", "ppl_limit"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SparsecraftError(f"gsm8k {name} {value}: must be >= 0 (0 skips that part)")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise SparsecraftError("gsm8k max_new_tokens and batch_size must be at least 1")


def load_gsm8k(path: str | Path = GSM8K_TEST, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SparsecraftError(f"{path}: GSM8K file not found; give a jsonl with question/answer fields")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise SparsecraftError(f"{path}:{lineno}: needs 'question' and 'answer' fields")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def fewshot_prompt(question: str, num_fewshot: int = 8) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in COT_EXEMPLARS[:num_fewshot])
    return f"{shots}Q: {question.strip()}\nA:"


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234'; '5.0' -> '5' (so that numerically equal answers compare equal)."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(text: str) -> str | None:
    """The number after '####' if the text has one, else the last number in the text."""
    if "####" in text:
        after = _NUMBER.findall(text.split("####", 1)[1])
        if after:
            return normalize_number(after[0])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(answer: str) -> str:
    """The gold number of a GSM8K reference (after '#### ')."""
    if "####" not in answer:
        raise SparsecraftError("GSM8K reference answer without '####'")
    return normalize_number(answer.split("####")[-1])


def truncate_at_stop(text: str, stops=STOP_STRINGS) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    progress: bool = True) -> list[str]:
    """Greedy continuations, left-padded batches sorted by length, cut at the stop strings.

    Prompts longer than the model's context minus ``max_new_tokens`` lose their first tokens."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SparsecraftError("tokenizer has neither a pad nor an EOS token; cannot batch generation")
    from .perplexity import model_context

    context = model_context(model) or 2048
    if max_new_tokens >= context:
        raise SparsecraftError(
            f"max_new_tokens {max_new_tokens}: must be below the model's context of {context}"
        )
    # As lm-eval does: keep the last (context - max_new_tokens) prompt tokens.
    encoded = [tokenizer.encode(p)[-(context - max_new_tokens):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="gsm8k generate", disable=not progress,
                      leave=False):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, stop_strings=list(STOP_STRINGS), tokenizer=tokenizer,
            )
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            outputs[i] = truncate_at_stop(text)
    return outputs


def answer_perplexity(model, tokenizer, rows: list[dict], batch_size: int = 8,
                      progress: bool = True) -> dict:
    """Token-weighted perplexity of the reference answers given their questions (teacher forcing)."""
    from ..finetune.data import gsm8k_prompt  # the fine-tuning format, so both measure the same text

    requests = [encode_pair(tokenizer, gsm8k_prompt(r["question"]), " " + r["answer"].strip()) for r in rows]
    lls = score_requests(model, requests, batch_size, progress, desc="gsm8k ppl")
    tokens = sum(len(cont) for _, cont in requests)
    nll = -sum(ll for ll, _ in lls)
    return {"answer_ppl": math.exp(nll / tokens), "answer_tokens": tokens, "ppl_n": len(rows)}


def evaluate_gsm8k(model, tokenizer, config: GSM8KConfig = GSM8KConfig(), path: str | Path = GSM8K_TEST,
                   progress: bool = True, samples: bool = False) -> dict:
    """{exact_match, exact_match_stderr, n, answer_ppl, answer_tokens, ppl_n, seconds}."""
    result: dict = {}
    was_training = model.training
    model.eval()
    try:
        if config.limit != 0:
            t0 = time.perf_counter()
            rows = load_gsm8k(path, config.limit)
            prompts = [fewshot_prompt(r["question"], config.num_fewshot) for r in rows]
            gens = generate_greedy(model, tokenizer, prompts, config.max_new_tokens, config.batch_size,
                                   progress)
            hits = [float(extract_answer(g) == reference_answer(r["answer"])) for g, r in zip(gens, rows)]
            n = len(hits)
            em = sum(hits) / n
            result.update(exact_match=em, exact_match_stderr=math.sqrt(em * (1 - em) / max(n - 1, 1)), n=n,
                          num_fewshot=config.num_fewshot, generate_seconds=round(time.perf_counter() - t0, 2))
            if samples:
                result["samples"] = [{"generation": g, "pred": extract_answer(g),
                                      "gold": reference_answer(r["answer"])} for g, r in zip(gens, rows)]
        if config.ppl_limit != 0:
            t0 = time.perf_counter()
            rows = load_gsm8k(path, config.ppl_limit)
            result.update(answer_perplexity(model, tokenizer, rows, config.batch_size, progress))
            result["ppl_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        model.train(was_training)
    return result
