"""LoRA on mixture-of-experts weights (nn/lora_experts.py), checked against PEFT's
``target_parameters`` (its ParamWrapper), the format's owner. The architecture matrix
(tests/test_architectures.py) checks the other direction on every MoE row: PEFT reads ours.

Tolerance 1e-5 (max |difference| / max |logit|): both sides compute the same float32 products
from the same weights, PEFT on W_e + s B_e A_e folded into the weight and ours as a separate
low-rank product, which rounds differently (6e-8 a step over sums of 64-128 terms, two layers).
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fourbit
from fourbit.io.peft import load_adapter, save_adapter
from fourbit.nn.lora import count_parameters
from fourbit.nn.lora_experts import expert_lora_layers

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2)
MOE = {
    "mixtral": dict(intermediate_size=128, num_local_experts=4),  # experts [E, out, in]
    "gpt_oss": dict(intermediate_size=64, num_local_experts=4,  # transposed, [E, in, out], with biases
                    layer_types=["sliding_attention", "full_attention"]),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    """(folder of a saved tiny MoE model, that model)."""
    config = AutoConfig.for_model(request.param, **COMMON, **MOE[request.param])
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param)
    dense.save_pretrained(folder)
    return folder, dense


def load(folder, quantization=None):
    return fourbit.load_model(folder, quantization=quantization, compute_dtype="float32", torch_dtype="float32")[0]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_an_adapter_peft_wrote_on_the_experts_computes_what_peft_computes(moe, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder, _ = moe
    torch.manual_seed(1)
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, init_lora_weights=False),
    )
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load(folder), tmp_path / "adapter")
    assert len(expert_lora_layers(ours)) == 2 * 2  # two weights in each of two layers
    assert relative(logits(ours), logits(theirs)) < 1e-5  # see the module docstring
    assert relative(logits(ours), logits(load(folder))) > 1e-2  # the experts' updates count


def test_experts_with_a_fresh_adapter_compute_what_the_base_computes(moe):
    folder, dense = moe
    model = load(folder)
    fourbit.add_lora(model, r=4, alpha=8, target=[], target_parameters=EXPERTS, verbose=False)
    assert model.config._experts_implementation == "fourbit"  # the forward that applies the updates
    # B starts at zero: fourbit's experts forward over dense weights alone, against transformers'
    assert relative(logits(model), logits(dense)) < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all("experts_lora" in n for n in trainable)


def test_saved_expert_adapters_reload_and_count_their_4bit_base_whole(moe, tmp_path):
    folder, dense = moe
    model = load(folder, "nf4")
    fourbit.add_lora(model, r=4, alpha=8, target=["q_proj"], target_parameters=EXPERTS, verbose=False)
    with torch.no_grad():
        for layer in expert_lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.05)
    trainable, total = count_parameters(model)
    assert total == sum(p.numel() for p in dense.parameters()) + trainable  # 4-bit experts at their element count
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(load(folder, "nf4"), tmp_path / "adapter")
    assert torch.equal(logits(again), logits(model))


def test_what_peft_cannot_express_on_experts_is_refused_by_name(moe):
    folder, _ = moe
    with pytest.raises(ValueError, match="without dropout and DoRA"):
        fourbit.add_lora(load(folder), target=[], target_parameters=EXPERTS, dropout=0.1, verbose=False)
    with pytest.raises(ValueError, match="without dropout and DoRA"):
        fourbit.add_lora(load(folder), target=[], target_parameters=EXPERTS, use_dora=True, verbose=False)
    with pytest.raises(ValueError, match=r"selects \['model.norm.weight'\], which are not fused expert weights"):
        fourbit.add_lora(load(folder), target_parameters=["model.norm.weight"], verbose=False)
    with pytest.raises(ValueError, match=r"matches no expert weight of this model; its expert weights are named"):
        fourbit.add_lora(load(folder), target_parameters=["mlp.experts.w1"], verbose=False)


def test_a_dense_model_has_no_expert_weights_to_target(tiny_llama):
    _, model = tiny_llama
    with pytest.raises(ValueError, match="it has no fused expert weights"):
        fourbit.add_lora(model, target_parameters=EXPERTS, verbose=False)
