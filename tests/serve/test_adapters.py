"""Several adapters on one 4-bit base, against independent references.

- One adapter chosen: the same model with that adapter loaded the ordinary way (LoRALinear).
- A weighted combination: a dense model whose weights are dequant(W4) + sum_a w_a s_a B_a A_a
  (the merged form; float32, so 1e-5 relative for the different order of the sums).
- A mixed batch: each row run alone with its choice (1e-6 relative: the same products, the base
  computed for more rows at once).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit
from fourbit.nn.lora import LoRALinear, lora_adapters, lora_layers
from fourbit.serve import Sampling, generate
from fourbit.serve.adapters import AdapterSet

IDS = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))


def base_model(folder):
    model, tok = fourbit.load_model(folder, quantization="nf4", compute_dtype="float32", torch_dtype="float32")
    return model


def make_adapter(folder, out, seed, target="all-linear", r=4, **kw):
    model = base_model(folder)
    torch.manual_seed(seed)
    fourbit.add_lora(model, r=r, alpha=2 * r, target=target, verbose=False, **kw)
    for adapter in lora_adapters(model).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.05)
    fourbit.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    folder, _ = tiny_llama
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(folder, root / "a", seed=1)
    b = make_adapter(folder, root / "b", seed=2, target=["q_proj", "v_proj"], r=2)  # another rank and target set
    return folder, a, b


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(x, y):
    return ((x - y).abs().max() / y.abs().max()).item()


def test_one_adapter_equals_it_loaded_alone(two_adapters):
    folder, a, b = two_adapters
    reference = logits(fourbit.load_adapter(base_model(folder), a))
    model = base_model(folder)
    adapters = AdapterSet(model)
    adapters.add("a", a)
    adapters.add("b", b)
    with adapters.use("a"):
        assert relative(logits(model), reference) < 1e-6
    with adapters.use(None):
        assert torch.equal(logits(model), logits(base_model(folder)))


def test_a_weighted_combination_equals_the_merged_weights(two_adapters):
    folder, a, b = two_adapters
    dense = base_model(folder)
    with torch.no_grad():
        for path, weight in ((a, 0.5), (b, 0.3)):
            adapted = fourbit.load_adapter(base_model(folder), path)
            for name, layer in lora_layers(adapted).items():
                module = dense.get_submodule(name)
                if not isinstance(module, nn.Linear):
                    module = nn.Linear(module.in_features, module.out_features, bias=False)
                    module.weight.data = dense.get_submodule(name).dequantize(torch.float32)
                    dense.set_submodule(name, module)
                module.weight += weight * layer.adapter().delta_weight()
    model = base_model(folder)
    adapters = AdapterSet(model)
    adapters.add("a", a)
    adapters.add("b", b)
    with adapters.use({"a": 0.5, "b": 0.3}):
        assert relative(logits(model), logits(dense)) < 1e-5


def test_a_mixed_batch_gives_each_row_its_own_result(two_adapters):
    folder, a, b = two_adapters
    model = base_model(folder)
    adapters = AdapterSet(model)
    adapters.add("a", a)
    adapters.add("b", b)
    choices = ["a", "b", None, {"a": 0.5, "b": 0.3}]
    with adapters.use(choices):
        batch = logits(model)
    for row, choice in enumerate(choices):
        with adapters.use(choice):
            assert relative(batch[row], logits(model, IDS[row : row + 1])[0]) < 1e-6, choice


def test_per_row_adapters_in_generation_match_each_row_alone(two_adapters):
    folder, a, b = two_adapters
    model = base_model(folder)
    adapters = AdapterSet(model)
    adapters.add("a", a)
    adapters.add("b", b)
    prompts, choices = [[5, 6, 7], [9, 3, 4, 1, 2], [8]], ["b", None, "a"]
    settings = Sampling(max_new_tokens=6)
    with adapters.use(choices):
        batch = generate(model, None, prompts, settings, eos_ids=set())
    for prompt, choice, got in zip(prompts, choices, batch):
        with adapters.use(choice):
            assert generate(model, None, [prompt], settings, eos_ids=set())[0].token_ids == got.token_ids


def test_adapters_come_and_go_without_touching_the_base(two_adapters):
    folder, a, b = two_adapters
    model = base_model(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = AdapterSet(model)
    adapters.add("a", a)
    adapters.add("b", b)
    adapters.remove("a")
    assert adapters.names == ["b"]
    with pytest.raises(ValueError, match="no adapter named 'a' is loaded"):
        with adapters.use("a"):
            pass
    adapters.add("a", b)  # a name can be reused once removed
    adapters.remove("a")
    adapters.remove("b")
    wrapped = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert wrapped.keys() == before.keys() and all(torch.equal(wrapped[k], before[k]) for k in before)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 14
    # a second set on the same model would wrap the wrapped layers' base layers again
    with pytest.raises(ValueError, match="already has LoRA layers"):
        AdapterSet(model)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 14


def test_bad_adapters_are_refused_by_name(two_adapters, make_tiny_llama, tmp_path):
    folder, a, b = two_adapters
    adapters = AdapterSet(base_model(folder))
    adapters.add("a", a)
    with pytest.raises(ValueError, match="already loaded"):
        adapters.add("a", b)
    with pytest.raises(ValueError, match="adapter name"):
        adapters.add("../x", b)
    other = tmp_path / "other"
    make_tiny_llama(other, hidden_size=32, intermediate_size=96)
    with pytest.raises(ValueError, match="this model's layer needs"):
        adapters.add("other", make_adapter(other, tmp_path / "other-adapter", seed=0))
    nan = tmp_path / "nan"
    make_adapter(folder, nan, seed=3)
    tensors = load_file(nan / "adapter_model.safetensors")
    next(v for k, v in tensors.items() if k.endswith("lora_A.weight"))[0, 0] = float("inf")
    save_file(tensors, nan / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN/Inf"):
        adapters.add("nan", nan)
    with pytest.raises(ValueError, match="DoRA"):
        adapters.add("dora", make_adapter(folder, tmp_path / "dora", seed=4, use_dora=True))
    (tmp_path / "experts").mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "experts" / file).write_bytes((a / file).read_bytes())
    config = json.loads((a / "adapter_config.json").read_text()) | {"target_parameters": ["mlp.experts.down_proj"]}
    (tmp_path / "experts" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mixture-of-experts weights \(target_parameters\) cannot be served"):
        adapters.add("experts", tmp_path / "experts")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        adapters.add("pickle", tmp_path / "pickle")
    assert adapters.names == ["a"]  # nothing half-loaded
