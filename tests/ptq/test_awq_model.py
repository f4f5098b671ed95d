"""AWQ over a tiny random Llama: against round-to-nearest end to end, its refusals, and an AWQ
folder through save_quantized and load_model."""

import json

import pytest
import torch
from torch import nn

import fourbit
from fourbit.formats import AWQ
from fourbit.nn import AWQLinear
from fourbit.ptq.awq_model import quantize_model_awq
from fourbit.ptq.gptq_model import quantize_model_rtn


def tokens(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def logits_error(model, reference, ids):
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        return ((model(input_ids=ids).logits - want).norm() / want.norm()).item()


def test_awq_model_is_not_worse_than_round_to_nearest(make_tiny_llama, tmp_path):
    reference = make_tiny_llama(tmp_path / "m", seed=5)
    awq = make_tiny_llama(tmp_path / "a", seed=5)
    rtn = make_tiny_llama(tmp_path / "r", seed=5)
    report = quantize_model_awq(awq, tokens(32, 48, seed=0), group_size=32)
    quantize_model_rtn(rtn, 4, 32, sym=False)  # the same asymmetric 4-bit grid and groups, no scales or clipping
    assert report.linears == 14 and "1536 tokens" in report.format()
    assert sum(isinstance(m, AWQLinear) for m in awq.modules()) == 14
    assert isinstance(awq.lm_head, nn.Linear)  # lm_head stays dense
    # 2 key/value heads for 4 query heads: v_proj -> o_proj cannot be folded, and the report says so
    assert len(report.skipped) == 2 and "grouped-query attention" in report.format()
    assert len(report.ratios) == 6 and all(0 <= r < 1 for r in report.ratios.values())
    # A random model has no outlier channels, so AWQ's gain over RTN is small here (measured: 0.072
    # against 0.080 on these held-out tokens; 3-12% over other seeds and GQA/MHA); the claim is only
    # "not worse". The outlier case, where AWQ wins by 3x, is test_awq.py's.
    held_out = tokens(8, 48, seed=1)
    awq_error, rtn_error = logits_error(awq, reference, held_out), logits_error(rtn, reference, held_out)
    assert awq_error < rtn_error, (awq_error, rtn_error)


def test_bad_inputs_are_named_before_any_work(make_tiny_llama, tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="AWQ needs calibration token ids .* at least 128 tokens"):
        quantize_model_awq(model, tokens(2, 16, seed=0))
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64"):
        quantize_model_awq(model, tokens(8, 32, seed=0), group_size=48)
    with pytest.raises(ValueError, match="4-bit codes only, not 8-bit"):
        quantize_model_awq(model, tokens(8, 32, seed=0), bits=8, group_size=32)
    with pytest.raises(ValueError, match="no model.layers: AWQ runs on decoder-only models"):
        quantize_model_awq(nn.Sequential(nn.Linear(4, 4)), tokens(8, 32, seed=0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was folded


def test_a_group_no_fold_keeps_is_quantized_unscaled_and_named(make_tiny_llama, tmp_path):
    class SquaredWeightNorm(nn.Module):  # output w^2 * x_normalized: neither w nor 1 + w; no fold keeps it
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.square()

    model = make_tiny_llama(tmp_path / "m")
    model.model.layers[1].post_attention_layernorm = SquaredWeightNorm(64)
    norm = model.model.layers[1].post_attention_layernorm.weight.clone()
    report = quantize_model_awq(model, tokens(8, 32, seed=0), group_size=32)
    assert any("layers.1.mlp.gate_proj+mlp.up_proj (post_attention_layernorm (SquaredWeightNorm): its output is "
               "neither its weight nor 1 + its weight" in line for line in report.skipped), report.skipped
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight, norm)  # not folded into
    assert "layers.0.gate_proj+up_proj" in report.ratios and "layers.1.gate_proj+up_proj" not in report.ratios
    assert sum(isinstance(m, AWQLinear) for m in model.modules()) == 14  # every linear quantized all the same


def test_an_awq_folder_round_trips_through_load_model(make_tiny_llama, tmp_path):
    model = make_tiny_llama(tmp_path / "m", seed=5, num_key_value_heads=4)
    quantize_model_awq(model, tokens(16, 32, seed=0), group_size=32)
    model.config.quantization_config = AWQ.quantization_config(32)
    fourbit.save_quantized(model, None, tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                      "modules_to_not_convert": None}
    loaded, _ = fourbit.load_model(tmp_path / "awq", torch_dtype="float32", compute_dtype="float32")
    assert sum(isinstance(m, AWQLinear) for m in loaded.modules()) == 14
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.shape == (64, 8) and q_proj.scales.dtype == torch.float16  # stored as the format says
    # the folded scales live in the dense norm weights, which must travel too
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    ids = tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_trains_on_an_awq_model(make_tiny_llama, tmp_path):
    from fourbit.nn.lora import LoRALinear

    model = make_tiny_llama(tmp_path / "m", seed=5)
    quantize_model_awq(model, tokens(8, 32, seed=0), group_size=32)
    fourbit.add_lora(model, r=4, alpha=8, verbose=False)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, AWQLinear) for m in wrapped)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.count("lora_") for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens(4, 32, seed=1)  # one batch to memorize
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # a random model starts at uniform guessing, ln 256 = 5.55 (a broken forward would start far above);
    # the adapters then take ~0.06 nats a step off it (measured: 5.56 -> 5.05 in 10 steps); 0.3 leaves room
    assert losses[0] < 6.0 and losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)
