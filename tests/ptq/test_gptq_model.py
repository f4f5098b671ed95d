"""GPTQ over a tiny random Llama: against round-to-nearest on the same grid, layer by layer."""

import pytest
import torch
from torch import nn

from fourbit.nn import GPTQLinear
from fourbit.ptq.gptq_model import quantize_model_gptq
from fourbit.quant.groupwise import quantize_rtn


def tokens(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def rtn_model(model, group_size):
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            quant = quantize_rtn(module.weight.detach(), 4, group_size, sym=True)
            model.model.layers.set_submodule(name, GPTQLinear.from_quant(quant, module.bias, group_size))
    return model


def logits_error(model, reference, ids):
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        return ((model(input_ids=ids).logits - want).norm() / want.norm()).item()


def test_gptq_model_beats_round_to_nearest(make_tiny_llama, tmp_path):
    reference = make_tiny_llama(tmp_path / "m", seed=5)
    gptq = make_tiny_llama(tmp_path / "g", seed=5)
    rtn = rtn_model(make_tiny_llama(tmp_path / "r", seed=5), 32)
    calibration = tokens(32, 48, seed=0)
    report = quantize_model_gptq(gptq, calibration, bits=4, group_size=32)
    assert report.linears == 14 and report.tokens == 32 * 48 and "1536 tokens" in report.format()
    assert sum(isinstance(m, GPTQLinear) for m in gptq.modules()) == 14
    assert isinstance(gptq.lm_head, nn.Linear)  # lm_head stays dense
    held_out = tokens(8, 48, seed=1)
    for ids in (calibration[:8], held_out):
        gptq_error, rtn_error = logits_error(gptq, reference, ids), logits_error(rtn, reference, ids)
        assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_too_little_calibration_and_other_architectures_are_refused(make_tiny_llama, tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="at least 128 tokens"):
        quantize_model_gptq(model, tokens(2, 16, seed=0))
    with pytest.raises(ValueError, match="no model.layers"):
        quantize_model_gptq(nn.Sequential(nn.Linear(4, 4)), tokens(8, 32, seed=0))


def test_a_gptq_folder_round_trips_through_load_model(make_tiny_llama, tmp_path):
    import json

    import fourbit
    from fourbit.formats import GPTQ

    model = make_tiny_llama(tmp_path / "m", seed=5)
    quantize_model_gptq(model, tokens(16, 32, seed=0), bits=4, group_size=32, act_order=True)
    model.config.quantization_config = GPTQ.quantization_config(4, 32, True, True, 0.01)
    fourbit.save_quantized(model, None, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["desc_act"] is True
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["group_size"] == 32
    loaded, _ = fourbit.load_model(tmp_path / "gptq", torch_dtype="float32", compute_dtype="float32")
    assert sum(isinstance(m, GPTQLinear) for m in loaded.modules()) == 14
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # stored as the format says
    ids = tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
