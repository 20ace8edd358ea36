import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.models import (
    decoder_blocks,
    load,
    prunable_linears,
    save,
    set_weight_matrix,
    weight_matrix,
)
from tests.conftest import TINY_ARCHS

# Block-relative linear names each architecture must expose (fused projections stay fused).
EXPECTED_LINEARS = {
    "tiny-llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "tiny-phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "tiny-opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "fc1", "fc2"},
    "tiny-gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "tiny-gpt-neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                      "mlp.dense_4h_to_h"},
}
for _arch in ("tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"):
    EXPECTED_LINEARS[_arch] = EXPECTED_LINEARS["tiny-llama"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_discovery_finds_blocks_and_linears(tiny, arch):
    model, _ = tiny(arch)
    name, blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    layers = prunable_linears(model)
    assert len(layers) == len(blocks) * len(EXPECTED_LINEARS[arch])
    suffixes = {n.split(f"{name}.0.", 1)[1] for n in layers if n.startswith(f"{name}.0.")}
    assert suffixes == EXPECTED_LINEARS[arch]
    assert not any("lm_head" in n or "embed" in n for n in layers)


def test_targets_and_ignore(tiny):
    model, _ = tiny("tiny-llama")
    assert len(prunable_linears(model, ignore=[r"mlp\."])) == 2 * 4
    assert set(prunable_linears(model, targets=[r"down_proj"])) == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "lm_head" in prunable_linears(model, targets=[r"lm_head"])


def test_gemma2_keeps_sliding_window_layers(tiny):
    model, _ = tiny("tiny-gemma2")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.sliding_window == 32


def test_conv1d_weight_matrix_is_out_by_in(tiny):
    model, _ = tiny("tiny-gpt2")
    layer = prunable_linears(model)["transformer.h.0.mlp.c_fc"]
    w = weight_matrix(layer)
    assert w.shape == (4 * 64, 64)  # (out, in) although Conv1D stores (in, out)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.bias)
    set_weight_matrix(layer, torch.zeros_like(w))
    assert (layer.weight == 0).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_load_round_trip_identical_logits(tiny, tmp_path, arch):
    model, tok = tiny(arch)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    save(model, tok, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # plain transformers loads it
    again, tok2 = load(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ref)
        assert torch.equal(again(ids).logits, ref)
    assert tok2("abc").input_ids == tok("abc").input_ids


def test_random_models_are_seeded(tiny):
    a, _ = tiny("tiny-llama", seed=1)
    b, _ = tiny("tiny-llama", seed=1)
    c, _ = tiny("tiny-llama", seed=2)
    wa, wb, wc = (weight_matrix(prunable_linears(m)["model.layers.0.mlp.up_proj"]) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_dtype(tiny):
    model, _ = tiny("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("source,message", [
    ("/no/such/path", "no such file or directory"),
    ("random:llama-3b", "unknown random config"),
    ("smollm2-1b", "no such file or directory"),
])
def test_bad_sources(source, message):
    with pytest.raises(SparsecraftError, match=message):
        load(source)


def test_neither_hf_nor_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(SparsecraftError, match="neither a Hugging Face model directory nor a GGUF file"):
        load(str(tmp_path / "weights.bin"))
    with pytest.raises(SparsecraftError, match="without config.json"):
        load(str(tmp_path))


@pytest.mark.slow
def test_smollm2_real_model(smollm2, tmp_path):
    from sparsecraft.eval import perplexity

    model, tok = smollm2
    assert len(prunable_linears(model)) == 210
    ppl = perplexity(model, tok, "wikitext2", seqlen=256, max_windows=4, progress=False)
    assert 10 < ppl < 60, ppl
