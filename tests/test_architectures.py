"""One shared check over a table of tiny random models, one row per architecture people fine-tune.

Each row is a transformers config built here (hidden 64, 2 layers, vocabulary 256; no download),
saved with ``save_pretrained`` and loaded back by fourbit in NF4 with double quantization. Every
row's weight rows are whole 64-blocks (intermediate sizes 128, heads of 16), so bitsandbytes'
CPU dequantization is exact on every CPU kind (see conftest.bnb_reads_partial_blocks). The checks:

- the logits equal transformers + bitsandbytes' (its exact float path) where bitsandbytes
  quantizes the same tensors: its linears, so MoE rows compare with fourbit's experts kept in
  16 bits; and equal a dense twin holding fourbit's dequantized weights with the experts in 4 bits;
- at most 5% of the dense weight bytes stay unquantized, embeddings and lm_head aside (norms,
  routers and biases; MoE experts are quantized too);
- one QLoRA step gives every LoRA parameter a gradient (on MoE rows LoRA is on every expert too,
  PEFT's target_parameters);
- PEFT loads the adapter onto the dense twin and computes what fourbit computes;
- ``merge_adapter`` writes a folder that transformers alone loads to the same function.

Tolerances (max |difference| / max |logit|): 1e-5 where both sides compute the same float32
products from the same dequantized weights in another summation order (float32 rounding, 6e-8 a
step, over 64-128 terms and two layers). bitsandbytes: 2e-3. It quantizes the dense weights
itself, to the same 4-bit codes as ours, but its CPU quantizer of the absmax constants (double
quantization) picks the neighbouring 8-bit code for about one block in a few thousand
(tests/quant/test_bnb_compat.py), which moves that block by one step of the absmax code: measured
0 to 4.8e-4 over this table. A misread layout or another code table moves the logits by their own
size. (Reading each other's bytes is exact: tests/io/test_checkpoint.py.)
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fourbit
from fourbit.io.merge import merge_adapter
from fourbit.kernels.dequantize import dequantize_4bit
from fourbit.nn.lora import lora_adapters
from fourbit.nn.lora_experts import expert_lora_layers

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
ARCHITECTURES = {
    "llama": dict(intermediate_size=128),
    "mistral": dict(intermediate_size=128, sliding_window=32),
    "qwen2": dict(intermediate_size=128),
    "qwen3": dict(intermediate_size=128),
    "gemma2": dict(intermediate_size=128, query_pre_attn_scalar=16),
    "gemma3_text": dict(intermediate_size=128, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(intermediate_size=128, pad_token_id=0),
    "olmo2": dict(intermediate_size=128),
    "granite": dict(intermediate_size=128),
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"]),
}
MOE = {"mixtral", "qwen3_moe", "gpt_oss"}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    """(name, folder of the saved dense model, the dense model)."""
    name = request.param
    config = AutoConfig.for_model(name, **COMMON, **ARCHITECTURES[name])
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(name)
    dense.save_pretrained(folder)
    return name, folder, dense


def load(folder, **kwargs):
    return fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32", **kwargs)[0]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def dense_twin(model_4bit, dense):
    """A copy of the dense model holding fourbit's dequantized weights (linears and experts)."""
    twin = copy.deepcopy(dense)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in model_4bit.named_modules():
            if isinstance(module, fourbit.Linear4bit):
                modules[name].weight.copy_(module.dequantize(torch.float32))
            for weight, states in getattr(module, "experts_4bit", {}).items():
                codes = module._parameters[weight]
                matrices = torch.stack([dequantize_4bit(codes[e], s, torch.float32) for e, s in enumerate(states)])
                getattr(modules[name], weight).copy_(matrices.transpose(1, 2) if module.is_transposed else matrices)
    return twin


EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # PEFT's target_parameters


def with_adapter(model, seed=0):
    """All-linear LoRA, and on MoE rows LoRA on every expert too."""
    torch.manual_seed(seed)
    moe = any(hasattr(m, "experts_4bit") for m in model.modules())
    fourbit.add_lora(model, r=4, alpha=8, target="all-linear", verbose=False,
                     target_parameters=EXPERT_TARGETS if moe else None)
    with torch.no_grad():
        for adapter in [*lora_adapters(model).values(), *expert_lora_layers(model).values()]:
            adapter.lora_B.weight.normal_(std=0.05)  # as after training: B is no longer 0
    return model


def test_nf4_equals_transformers_with_bitsandbytes(arch, bnb_reference):
    from transformers import BitsAndBytesConfig

    name, folder, _ = arch
    ours = load(folder, quantize_experts=False)  # bitsandbytes leaves the experts in 16 bits
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = bnb_reference(folder, quantization_config=config, dtype=torch.float32).eval()
    assert relative(logits(ours), logits(theirs)) < 2e-3  # see the module docstring


def test_nf4_equals_the_dense_model_on_its_dequantized_weights(arch):
    name, folder, dense = arch
    model = load(folder)
    assert relative(logits(model), logits(dense_twin(model, dense))) < 1e-5
    drift = relative(logits(model), logits(dense))
    assert 0 < drift < 0.5  # 4-bit noise, not garbage (gemma once loaded 1.4 away: its weights overwritten)


def test_almost_every_weight_byte_is_quantized(arch):
    name, folder, dense = arch
    model = load(folder)
    outside = ("embed_tokens", "lm_head")
    dense_bytes = sum(p.numel() * 4 for n, p in dense.named_parameters() if not any(o in n for o in outside))
    left = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if p.is_floating_point() and not any(o in n for o in outside))
    assert left < 0.05 * dense_bytes, (name, left, dense_bytes)
    if name in MOE:
        assert any(hasattr(m, "experts_4bit") for m in model.modules())
        assert model.config._experts_implementation == "fourbit"


def test_one_qlora_step_gives_every_adapter_a_gradient(arch):
    name, folder, _ = arch
    model = with_adapter(load(folder))
    model.train()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    assert len(expert_lora_layers(model)) == (2 * 2 if name in MOE else 0)  # both expert weights of both layers
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n, _ in params)
    no_grad = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_peft_and_merge_compute_what_fourbit_computes(arch, tmp_path):
    from peft import PeftModel

    name, folder, dense = arch
    model = with_adapter(load(folder))
    want = logits(model)
    fourbit.save_adapter(model, tmp_path / "adapter")
    twin = dense_twin(load(folder), dense)
    theirs = PeftModel.from_pretrained(twin, tmp_path / "adapter")
    assert relative(logits(theirs), want) < 1e-5
    merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("fourbit" in type(m).__module__ for m in merged.modules())
    assert relative(logits(merged), want) < 1e-5


def test_4bit_experts_are_not_saved_into_a_format_that_cannot_hold_them(tmp_path):
    name = "mixtral"
    config = AutoConfig.for_model(name, **COMMON, **ARCHITECTURES[name])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="mixture-of-experts weights are in 4 bits, which no checkpoint format holds"):
        fourbit.save_quantized(load(tmp_path / "dense"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fourbit.save_quantized(load(tmp_path / "dense", quantize_experts=False), None, tmp_path / "out")  # bnb-4bit


@pytest.mark.parametrize("name", sorted(MOE))
def test_qlora_on_a_moe_model_learns_with_checkpointing_and_a_paged_8bit_optimizer(name, tmp_path):
    from fourbit.optim import AdamW
    from fourbit.train.recipe import enable_gradient_checkpointing

    # A wide initializer lets the random lm_head rows express a peaked distribution (at 0.02 a
    # 64-wide model cannot get far below ln(vocab); tests/train/conftest.py does the same).
    config = AutoConfig.for_model(name, **COMMON, **ARCHITECTURES[name], initializer_range=0.5)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    model = with_adapter(load(tmp_path / "dense"))
    enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=1e-2, optim_bits=8, paged=True, min_8bit_size=0)  # every state 8-bit
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # A fixed batch to memorize: the loss must fall to well below where the random model starts.
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(hasattr(m, "experts_4bit") for m in model.modules() if hasattr(m, "has_gate"))


def layer_errors(dense, quantized, calibration) -> float:
    """How far the quantized decoder layers are from the dense ones on the dense model's own layer
    inputs: sum of |quantized layer's update - dense layer's update|^2 over the layers, relative to
    the dense updates' (a layer's update: its output minus its input). Measured layer by layer so
    that one layer's error does not compound through the next (on a random tiny model the logits
    move by their own size under any 4-bit grid, which would rank methods by noise)."""
    from fourbit.ptq.layerwise import layer_calls, output

    hidden, calls = layer_calls(dense, dense.model.layers, calibration, 8, "cpu")
    error = total = 0.0
    with torch.no_grad():
        for index, (ours, theirs) in enumerate(zip(quantized.model.layers, dense.model.layers)):
            for h, (args, kwargs) in zip(hidden, calls[index]):
                want = output(theirs(h, *args, **kwargs))
                error += (output(ours(h, *args, **kwargs)) - want).double().square().sum().item()
                total += (want - h).double().square().sum().item()
            hidden = [output(theirs(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls[index])]
    return error / total


def test_gptq_and_awq_quantize_reload_and_beat_round_to_nearest(arch, tmp_path):
    """GPTQ and AWQ on every architecture: each writes a folder fourbit reloads to the same logits,
    and fits the calibration tokens closer than round-to-nearest on the same grid (group 32)."""
    from fourbit.ptq import quantize_dense

    name, folder, dense = arch
    dense = copy.deepcopy(dense)
    with torch.no_grad():  # a few outlier channels, as trained LLMs have: the case AWQ's scales are for
        for n, param in dense.named_parameters():
            if "layernorm" in n and param.dim() == 1:
                param[:4] = 8.0
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        model = copy.deepcopy(dense)
        report = quantize_dense(model, method, calibration if method != "rtn" else None, 4, 32)
        errors[method] = layer_errors(dense, model, calibration)
        fourbit.save_quantized(model, None, tmp_path / method)
        again, _ = fourbit.load_model(tmp_path / method, compute_dtype="float32", torch_dtype="float32")
        assert relative(logits(again, calibration), logits(model, calibration)) < 1e-5, (method, report)
    # measured: GPTQ 2.5-10x and AWQ 2.3-3.2x below round-to-nearest over the table
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], (name, errors)
