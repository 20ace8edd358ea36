"""runtime.static_greedy: static cache + prepared masks give generate's greedy tokens (eagerly on
the CPU; the CUDA-graph replay of the same step is exercised by `sparsecraft bench --device cuda`)."""

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.models import load
from sparsecraft.runtime.measure import greedy_tokens
from sparsecraft.runtime.static_decode import static_greedy


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gpt-neox"]
)
def test_tokens_equal_generate(name):
    model, _ = load(f"random:{name}")
    prompt = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    tokens, seconds = static_greedy(model, prompt, 20)
    reference = torch.stack([greedy_tokens(model, prompt[i : i + 1], 20) for i in range(2)])
    assert torch.equal(tokens, reference) and seconds > 0


def test_short_sliding_window_is_refused():
    model, _ = load("random:tiny-gemma2")  # window 32
    with pytest.raises(SparsecraftError, match="sliding window"):
        static_greedy(model, torch.zeros(1, 30, dtype=torch.long), 8)
    tokens, _ = static_greedy(model, torch.zeros(1, 20, dtype=torch.long), 8)  # 28 <= 32: fine
    assert torch.equal(tokens[0], greedy_tokens(model, torch.zeros(1, 20, dtype=torch.long), 8))


def test_compiled_steps_give_the_same_tokens():
    """``compile=True`` (torch.compile'd decode steps, what `bench --compile` times on a GPU) keeps
    generate's tokens, here for a model whose linears are SparseLinears."""
    from sparsecraft.runtime import convert

    model, _ = load("random:tiny-llama")
    sparse = convert(model, format="bitmask")
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    tokens, seconds = static_greedy(sparse, prompt, 6, compile=True)
    assert torch.equal(tokens[0], greedy_tokens(sparse, prompt, 6)) and seconds > 0
