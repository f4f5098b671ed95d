"""load_model on tiny random Llamas: against dense transformers models, streaming, errors."""

import copy
import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fourbit import Linear4bit, load_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dense_twin(model_4bit, dense):
    """A copy of the dense transformers model whose linears hold our dequantized weights."""
    twin = copy.deepcopy(dense)
    modules = dict(twin.named_modules())
    for name, module in model_4bit.named_modules():
        if isinstance(module, Linear4bit):
            with torch.no_grad():
                modules[name].weight.copy_(module.dequantize(torch.float32))
    return twin


def test_every_linear_but_lm_head_is_4bit(tiny_llama):
    folder, _ = tiny_llama
    model, tokenizer = load_model(folder, compute_dtype="float32")
    names = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(names) == 2 * len(LINEARS) and all(n.rsplit(".", 1)[-1] in LINEARS for n in names)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # torch_dtype auto = compute dtype
    assert not model.training and tokenizer is None  # the tiny folder has no tokenizer
    assert model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"


def code_table(quant_type):
    """The 16 values a 4-bit code stands for, from bitsandbytes (nf4, fp4) or the QLoRA paper's
    integer grid k/7 with code 15 unused (int4): independent of fourbit's tables."""
    import bitsandbytes.functional as F

    if quant_type == "int4":
        return torch.cat([torch.arange(-7, 8) / 7, torch.zeros(1)])
    return F.get_4bit_type(quant_type, device="cpu")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_logits_equal_dense_model_holding_dequantized_weights(tiny_llama, quant_type):
    folder, dense = tiny_llama
    model, _ = load_model(folder, quantization=quant_type, compute_dtype="float32")
    table = code_table(quant_type)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)):
        assert layer.quant_type == quant_type and torch.equal(layer.quant_state.code, table), name
        # Every dequantized value is a table value times its block's absmax. The largest |w| of a
        # block is stored as the code of +-1, so the block's largest |value| is that absmax: each
        # value over it is a table entry, up to float32 rounding of (entry x absmax) / absmax.
        blocks = layer.dequantize(torch.float32).flatten().view(-1, 64)
        ratios = blocks / blocks.abs().amax(dim=1, keepdim=True)
        assert ((ratios[..., None] - table).abs().amin(dim=-1) < 1e-6).all(), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, expected = model(ids).logits, dense_twin(model, dense)(ids).logits
    # Same weights, same fp32 ops in the same order: identical up to fp32 rounding.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # And quantization did change the model, by a bounded amount (4-bit noise, not garbage).
    with torch.no_grad():
        drift = (ours - dense(ids).logits).abs().max() / dense(ids).logits.abs().max()
    assert 0 < drift < 0.5


def test_unquantized_load_equals_transformers(tiny_llama):
    folder, dense = tiny_llama
    model, _ = load_model(folder, quantization=None, compute_dtype="float32")
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)


def test_tied_embeddings_stay_tied(tiny_llama_tied):
    folder, dense = tiny_llama_tied
    model, _ = load_model(folder, compute_dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_twin(model, dense)(ids).logits, rtol=1e-5, atol=1e-5)


def test_16bit_remainder_and_bf16_compute(tiny_llama):
    folder, _ = tiny_llama
    model, _ = load_model(folder, compute_dtype="bfloat16", torch_dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 5))).logits.dtype == torch.bfloat16


def test_loading_streams_one_tensor_at_a_time(tiny_llama, monkeypatch):
    """Peak memory is the quantized model plus one layer: each dense linear weight is quantized as
    it arrives and dropped, never two of them alive at once."""
    folder, _ = tiny_llama
    seen: list[weakref.ref] = []
    most_alive = 0
    real = Linear4bit.quantize_

    def watched(self, weight, name="weight"):
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(r() is not None for r in seen))  # earlier dense weights still alive
        seen.append(weakref.ref(weight))
        return real(self, weight, name)

    monkeypatch.setattr(Linear4bit, "quantize_", watched)
    model, _ = load_model(folder, compute_dtype="float32")
    gc.collect()
    assert most_alive == 0 and all(r() is None for r in seen)
    # every linear weight came through the quantizer as it was read: the check watched the whole load
    assert len(seen) == sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * len(LINEARS)


@pytest.mark.parametrize("bnb_layer_shapes", ["aligned", "partial"], indirect=True)
def test_prequantized_bitsandbytes_checkpoint_loads_as_stored(make_tiny_llama, bnb_layer_shapes, tmp_path, bnb_reference):
    """A folder written by transformers + bitsandbytes: same dequantized weights, same logits."""
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "dense"
    make_tiny_llama(folder, **bnb_layer_shapes)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    theirs = bnb_reference(folder, quantization_config=config, dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    import bitsandbytes.functional as F

    ours, _ = load_model(tmp_path / "bnb", quantization="fp4", compute_dtype="float32")  # stored nf4 wins
    layer, their_layer = ours.model.layers[1].mlp.down_proj, theirs.model.layers[1].mlp.down_proj
    assert layer.quant_type == "nf4" and layer.double_quant
    their_weight = F.dequantize_4bit(their_layer.weight, their_layer.weight.quant_state).float()
    assert torch.equal(layer.dequantize(torch.float32), their_weight)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def write_variant(src, dst, edit):
    """Copy a checkpoint folder, passing its tensors and config through ``edit``."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    tensors, config = edit(tensors, config)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def nf4_folder(tiny_llama, tmp_path_factory):
    from fourbit import save_quantized

    folder, _ = tiny_llama
    out = tmp_path_factory.mktemp("nf4") / "model"
    save_quantized(*load_model(folder, compute_dtype="float32"), out)
    return out


def test_checkpoint_missing_a_quantization_tensor_is_refused(nf4_folder, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight.nested_absmax"
    bad = write_variant(nf4_folder, tmp_path / "bad", lambda t, c: ({k: v for k, v in t.items() if k != key}, c))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.nested_absmax is missing"):
        load_model(bad)


def test_checkpoint_with_misshaped_quantization_tensor_is_refused(nf4_folder, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    bad = write_variant(nf4_folder, tmp_path / "bad", lambda t, c: (t | {key: t[key][:-3].clone()}, c))
    with pytest.raises(ValueError, match=r"up_proj.weight.absmax has dtype torch.uint8 and shape \(157,\); "
                                         r"expected torch.uint8 and \(160,\)"):
        load_model(bad)


def test_checkpoint_with_unknown_quant_type_is_refused(nf4_folder, tmp_path):
    def edit(tensors, config):
        config["quantization_config"]["bnb_4bit_quant_type"] = "nf5"
        return tensors, config

    with pytest.raises(ValueError, match=r"unknown 4-bit quantization type 'nf5'"):
        load_model(write_variant(nf4_folder, tmp_path / "bad", edit))


def test_checkpoint_missing_a_dense_tensor_is_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    bad = write_variant(folder, tmp_path / "bad", lambda t, c: ({k: v for k, v in t.items() if k != "model.norm.weight"}, c))
    with pytest.raises(ValueError, match=r"lacks 1 tensors the model needs, e.g. \['model.norm.weight'\]"):
        load_model(bad)


@pytest.mark.parametrize("qconfig,error", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "declares bitsandbytes 8-bit, but"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "declares GPTQ, but it holds no '.qweight'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "declares AWQ, but it holds no '.qweight'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv' is not supported; fourbit reads the 'gemm'"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "8-bit AWQ checkpoints are not supported"),
    ({"quant_method": "hqq"}, "'hqq' is not supported by this loader; expected bitsandbytes 4-bit or 8-bit"),
])
def test_a_quantization_config_without_its_tensors_or_unknown_is_refused(tiny_llama, tmp_path, qconfig, error):
    folder, _ = tiny_llama

    def edit(tensors, config):
        config["quantization_config"] = qconfig
        return tensors, config

    with pytest.raises(ValueError, match=error):
        load_model(write_variant(folder, tmp_path / "bad", edit))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"quantization": "nf2"}, r"unknown 4-bit quantization type 'nf2'"),
        ({"blocksize": 100}, r"unsupported block size 100"),
        ({"compute_dtype": "float8"}, r"unknown dtype 'float8'"),
    ],
)
def test_bad_arguments_are_refused(tiny_llama, kwargs, error):
    folder, _ = tiny_llama
    with pytest.raises(ValueError, match=error):
        load_model(folder, **kwargs)


def test_nan_in_a_weight_names_the_weight(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    key = "model.layers.1.self_attn.o_proj.weight"

    def edit(tensors, config):
        tensors[key] = tensors[key].clone()
        tensors[key][2, 3] = float("nan")
        return tensors, config

    with pytest.raises(ValueError, match=rf"tensor {key} holds 1 NaN or Inf values"):
        load_model(write_variant(folder, tmp_path / "bad", edit))


@pytest.mark.parametrize("key,value", [
    ("model.norm.weight", float("inf")),  # outside the linear weights: no quantizer sees these
    ("model.embed_tokens.weight", float("nan")),
    ("model.layers.0.post_attention_layernorm.weight", float("-inf")),
])
@pytest.mark.parametrize("quantization", ["nf4", None])
def test_nan_or_inf_anywhere_is_refused_by_name(tiny_llama, tmp_path, key, value, quantization):
    folder, _ = tiny_llama

    def edit(tensors, config):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[5] = value
        return tensors, config

    with pytest.raises(ValueError, match=rf"tensor {key} holds 1 NaN or Inf values"):
        load_model(write_variant(folder, tmp_path / "bad", edit), quantization=quantization)


def test_nan_in_a_stored_quantization_constant_is_refused(nf4_folder, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight.nested_absmax"  # float32, the second level of double quant

    def edit(tensors, config):
        tensors[key] = tensors[key].clone()
        tensors[key][0] = float("nan")
        return tensors, config

    with pytest.raises(ValueError, match=rf"tensor {key} holds 1 NaN or Inf values"):
        load_model(write_variant(nf4_folder, tmp_path / "bad", edit))


def test_a_model_that_needs_its_own_code_is_refused_and_none_is_run(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    marker = tmp_path / "the-folder's-code-ran"

    def custom(tensors, config):
        config["model_type"] = "zorbotron"
        config["auto_map"] = {"AutoConfig": "modeling_zorbotron.ZorbotronConfig",
                              "AutoModelForCausalLM": "modeling_zorbotron.ZorbotronForCausalLM"}
        return tensors, config

    bad = write_variant(folder, tmp_path / "custom", custom)
    (bad / "modeling_zorbotron.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"needs Python code that comes with it .* fourbit never runs a model's own code"):
        load_model(bad)
    assert not marker.exists()


def test_a_known_architecture_with_an_auto_map_loads_with_transformers_own_classes(tiny_llama, tmp_path):
    # auto_map alone (many hub folders carry one) does not make transformers ask or run anything
    # when told trust_remote_code=False: the built-in Llama is used.
    folder, dense = tiny_llama

    def with_auto_map(tensors, config):
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_llama_custom.LlamaForCausalLM"}
        return tensors, config

    variant = write_variant(folder, tmp_path / "mapped", with_auto_map)
    (variant / "modeling_llama_custom.py").write_text("raise SystemExit('the folder code ran')\n")
    model, _ = load_model(variant, quantization=None, compute_dtype="float32")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)


def test_a_truncated_safetensors_file_is_named(tiny_llama, tmp_path):
    import shutil

    folder, _ = tiny_llama
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"broken/model.safetensors is not a readable safetensors file .* truncated"):
        load_model(broken)


def test_transformers_loads_through_fourbits_quantizer_and_saves_and_reads_it_back(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import fourbit

    folder, _ = tiny_llama
    ours, _ = load_model(folder, compute_dtype="float32", torch_dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=fourbit.NF4Config(), dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in theirs.modules()) == 2 * len(LINEARS)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)  # the same quantizer, the same bytes
        theirs.save_pretrained(tmp_path / "saved")  # transformers' own save: the config names fourbit's layout
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
        assert torch.equal(again(ids).logits, ours(ids).logits)
