"""Merging an adapter: the merged folder, read by transformers alone, computes base + adapter.

The reference is fourbit's unmerged model (4-bit base + LoRA, float32 compute) on the same
tokens. Tolerances on max |logit difference| / max |logit|:
- float32 merge: 1e-5. Same float32 weights, but x (W + sBA)^T sums in another order than
  x W^T + s (x A^T) B^T; float32 rounding (6e-8 relative) over 64-160 terms a product and two
  layers stays near 1e-6.
- bfloat16 merge: 2e-2. Each merged weight is rounded to bf16 (relative 2^-9 = 2e-3 at most,
  ~6e-4 in RMS); summed over a layer's inputs and through two layers the logits move by about
  1e-2 of their largest value on these random models.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import fourbit
from fourbit.io.merge import merge_adapter, probe_ids
from fourbit.nn.lora import lora_adapters

IDS = torch.tensor([[1, 5, 9, 33, 200, 7, 64, 12, 90, 3]])


def trained_adapter(folder, out, seed=0, ids=IDS, **lora):
    """A 4-bit model of ``folder`` with a LoRA whose B is random (as after training), saved;
    returns its logits on ``ids``."""
    model, _ = fourbit.load_model(folder, quantization="nf4", compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(seed)
    fourbit.add_lora(model, r=4, alpha=8, target="all-linear", verbose=False, **lora)
    for adapter in lora_adapters(model).values():
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.05)
    fourbit.save_adapter(model, out)
    with torch.no_grad():
        return model(input_ids=ids).logits


def transformers_logits(folder, tmp_path):
    """Logits from the merged folder in a fresh interpreter where fourbit cannot be imported."""
    out = tmp_path / "logits.pt"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["fourbit"] = None  # any import of fourbit now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return torch.load(out)


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_merged_folder_in_plain_transformers_matches_base_plus_adapter(tiny_llama, tmp_path, dtype, tolerance):
    folder, _ = tiny_llama
    unmerged = trained_adapter(folder, tmp_path / "adapter")
    report = merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype=dtype)
    assert report.layers_merged == 14 and report.merged_error < tolerance
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {getattr(torch, dtype)}
    assert relative(transformers_logits(tmp_path / "merged", tmp_path), unmerged) < tolerance


def test_dora_merges_into_the_same_function(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    unmerged = trained_adapter(folder, tmp_path / "adapter", use_dora=True)
    merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert relative(transformers_logits(tmp_path / "merged", tmp_path), unmerged) < 1e-5  # float32, as above


def test_tied_embeddings_stay_tied(tiny_llama_tied, tmp_path):
    folder, _ = tiny_llama_tied
    unmerged = trained_adapter(folder, tmp_path / "adapter")
    merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
    assert relative(transformers_logits(tmp_path / "merged", tmp_path), unmerged) < 1e-5


def test_requantizing_reports_the_error_it_adds(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    probe = probe_ids(None, 256)  # what merge_adapter measures on when the base has no tokenizer
    unmerged = trained_adapter(folder, tmp_path / "adapter", ids=probe)
    report = merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged4", dtype="float32", requantize="nf4")
    # A second NF4 rounding of every weight: far above float32 rounding, and printed.
    assert report.requantized_error > 100 * report.merged_error
    assert "requantized to nf4" in report.format()
    model, _ = fourbit.load_model(tmp_path / "merged4", compute_dtype="float32", torch_dtype="float32")
    assert json.loads((tmp_path / "merged4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    # the folder holds exactly the model whose error was reported (float32 compute both times)
    assert relative(logits, unmerged) == pytest.approx(report.requantized_error, rel=1e-4)


def test_generation_config_carries_the_chat_templates_end_of_turn(make_tiny_llama, chat_tokenizer, tmp_path):
    folder = tmp_path / "base"
    make_tiny_llama(folder, vocab_size=len(chat_tokenizer))
    chat_tokenizer.save_pretrained(folder)
    trained_adapter(folder, tmp_path / "adapter")
    merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_an_adapter_with_nan_is_refused_and_nothing_is_written(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    trained_adapter(folder, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds NaN/Inf"):
        merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_for_another_base_is_refused(tiny_llama, make_tiny_llama, tmp_path):
    folder, _ = tiny_llama
    other = tmp_path / "other"
    make_tiny_llama(other, hidden_size=32, intermediate_size=96)
    trained_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="has shape"):
        merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bad_dtype_and_requantize_values_are_named(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(ValueError, match="merge dtype must be one of"):
        merge_adapter(folder, tmp_path / "a", tmp_path / "m", dtype="int8")
    with pytest.raises(ValueError, match="requantize must be 'nf4' or 'fp4'"):
        merge_adapter(folder, tmp_path / "a", tmp_path / "m", requantize="gptq")


def test_an_adapter_is_merged_into_the_base_it_was_trained_on(tiny_llama, tmp_path):
    # A 16-bit LoRA: its training_base.json says "none", so the merge adds it to the 16-bit weights,
    # not to NF4-quantized ones (which would differ by the whole quantization error, 4e-3 relative
    # on this model where base + adapter as trained is matched to 1e-5).
    folder, _ = tiny_llama
    model, _ = fourbit.load_model(folder, quantization=None, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(0)
    fourbit.add_lora(model, r=4, alpha=8, target="all-linear", verbose=False)
    for adapter in lora_adapters(model).values():
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.05)
    fourbit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "training_base.json").read_text()) == {
        "quantization": "none", "double_quant": None, "blocksize": None}
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    report = merge_adapter(folder, tmp_path / "a", tmp_path / "merged", dtype="float32")
    assert report.base == "16-bit (no quantization), as the adapter was trained (training_base.json)"
    assert relative(transformers_logits(tmp_path / "merged", tmp_path), trained) < 1e-5  # see the module docstring
    # Asked for another base than the adapter's, the merge does it and says what that means.
    other = merge_adapter(folder, tmp_path / "a", tmp_path / "nf4", dtype="float32", base_quantization="nf4")
    assert other.base.startswith("nf4 + double quant, block 64, as asked, but the adapter was trained on 16-bit")
    assert relative(transformers_logits(tmp_path / "nf4", tmp_path), trained) > 1e-3


def test_an_adapter_without_a_training_base_is_taken_as_trained_by_default(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    want = trained_adapter(folder, tmp_path / "a")  # NF4 + double quant, block 64: fourbit train's default
    (tmp_path / "a" / "training_base.json").unlink()  # as PEFT or an older fourbit writes adapters
    report = merge_adapter(folder, tmp_path / "a", tmp_path / "merged", dtype="float32")
    assert report.base == ("nf4 + double quant, block 64, the adapter records no training base (training_base.json): "
                           "taken as fourbit train's default")
    assert relative(transformers_logits(tmp_path / "merged", tmp_path), want) < 1e-5


def test_into_original_adds_the_update_to_the_16_bit_weights(tiny_llama, tmp_path):
    """An adapter trained on NF4, merged --into original: W + s B A from the dense folder's own
    weights (the reference: transformers' dense model with the update added by hand, float64)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder, dense = tiny_llama
    trained_adapter(folder, tmp_path / "a")
    report = merge_adapter(folder, tmp_path / "a", tmp_path / "original", dtype="float32", into="original")
    assert report.base.startswith("16-bit (no quantization), as asked, but the adapter was trained on nf4")
    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f, torch.no_grad():
        for key in f.keys():
            if key.endswith("lora_A.weight"):
                module = expected.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
                b = f.get_tensor(key.replace("lora_A", "lora_B")).double()
                module.weight += 8 / 4 * b @ f.get_tensor(key).double()  # alpha / r
    with torch.no_grad():
        want = expected(input_ids=IDS).logits.float()
    def merged_logits(out):  # in this process: the other tests show merged folders need no fourbit
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=IDS).logits

    assert relative(merged_logits(tmp_path / "original"), want) < 1e-5  # float32 vs float64 sums
    merge_adapter(folder, tmp_path / "a", tmp_path / "dequantized", dtype="float32")  # the default
    assert relative(merged_logits(tmp_path / "dequantized"), want) > 1e-3  # NF4's error
    with pytest.raises(ValueError, match=r"into must be one of \('dequantized', 'original'\)"):
        merge_adapter(folder, tmp_path / "a", tmp_path / "x", into="raw")
