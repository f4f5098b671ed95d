"""The fourbit command line: quantize, memory and merge, and their errors."""

import json

import pytest
import torch
from safetensors import safe_open

from fourbit.cli import main


def trained_looking(model, seed=0):
    """Give every LoRA B non-zero values, as training would (add_lora starts B at 0: a no-op adapter)."""
    from fourbit.nn.lora import lora_adapters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.05)
    return model


def test_quantize_writes_a_bnb_folder_with_the_chosen_settings(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    out = tmp_path / "fp4"
    argv = ["quantize", str(folder), "--method", "fp4", "--blocksize", "128", "--no-double-quant", "--output", str(out)]
    assert main(argv) == 0
    assert "fp4" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_use_double_quant"] is False
    with safe_open(out / "model.safetensors", "pt") as f:
        blob = f.get_tensor("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__fp4")
        assert json.loads(bytes(blob.tolist()))["blocksize"] == 128
        assert f.get_tensor("model.norm.weight").dtype.is_floating_point


def test_memory_prints_the_report(tiny_llama, capsys):
    folder, _ = tiny_llama
    assert main(["memory", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "4-bit codes" in out and "bits each" in out and "bfloat16" in out


def test_errors_are_one_line_and_exit_2(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    assert main(["quantize", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["quantize", str(folder), "--output", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["quantize", "x", "--method", "q8_0", "-o", "y"], ["memory", "--blocksize", "100"]])
def test_invalid_choices_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_merge_writes_a_dense_folder_and_prints_the_error(tiny_llama, tmp_path, capsys):
    import fourbit
    from fourbit.nn.lora import lora_layers

    folder, _ = tiny_llama
    model, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    fourbit.add_lora(model, r=2, alpha=4, target=["q_proj"], verbose=False)
    trained_looking(model)
    fourbit.save_adapter(model, tmp_path / "adapter")
    argv = ["merge", "--base", str(folder), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
            "--dtype", "fp16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "merged 2 LoRA layers" in out and "float16" in out and "max relative difference" in out
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        for name, layer in lora_layers(model).items():
            # W' = dequant(W4) + (alpha / r) B A, in float64 here, rounded once to fp16. The merge
            # sums in float32 first, which can land a value on the other side of an fp16 rounding
            # boundary: one fp16 step apart at most (2^-10 of the value; 2^-24 for subnormals).
            a, b = layer.adapter().lora_A.weight.double(), layer.adapter().lora_B.weight.double()
            want = (layer.base_layer.dequantize(torch.float32).double() + 4 / 2 * b @ a).half()
            stored = f.get_tensor(f"{name}.weight")
            assert stored.dtype == torch.float16
            torch.testing.assert_close(stored.float(), want.float(), rtol=2**-10, atol=2**-24)
    assert main(argv) == 2  # the output exists: refused, one line
    assert "already exists" in capsys.readouterr().err


@pytest.fixture
def folder_with_tokenizer(make_tiny_llama, chat_tokenizer, tmp_path):
    folder = tmp_path / "base"
    make_tiny_llama(folder, seed=7, vocab_size=len(chat_tokenizer))
    chat_tokenizer.save_pretrained(folder)
    return folder


def test_quantize_awq_writes_an_awq_gemm_folder_fourbit_loads(folder_with_tokenizer, tmp_path, capsys):
    import fourbit
    from fourbit.nn import AWQLinear

    out = tmp_path / "awq"
    argv = ["quantize", str(folder_with_tokenizer), "--method", "awq", "--group-size", "32", "--seq-len", "64",
            "--calibration-tokens", "1024", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibration: 16 sequences x 64 tokens (1024 tokens) from Python " in printed
    assert "documentation topics (pydoc_data, last keys first)" in printed
    assert "AWQ: 14 linear layers in 2 decoder layers" in printed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                      "modules_to_not_convert": None}
    model, _ = fourbit.load_model(out, torch_dtype="float32")
    assert sum(isinstance(m, AWQLinear) for m in model.modules()) == 14
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (160, 8)  # [in, out / 8]
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (5, 64)  # [in / 32, out]
    assert main(argv[:-2] + ["--bits", "8", "--output", str(tmp_path / "awq8")]) == 2
    assert "4-bit codes only, not 8-bit" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_gptq_and_rtn_write_a_gptq_folder_fourbit_loads(folder_with_tokenizer, tmp_path, capsys, method):
    import fourbit
    from fourbit.nn import GPTQLinear

    out = tmp_path / method
    argv = ["quantize", str(folder_with_tokenizer), "--method", method, "--group-size", "32", "--seq-len", "64",
            "--calibration-tokens", "1024", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    if method == "gptq":
        assert "calibration: 16 sequences x 64 tokens (1024 tokens) from Python " in printed
        assert "documentation topics (pydoc_data, last keys first)" in printed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["group_size"] == 32 and config["bits"] == 4
    model, _ = fourbit.load_model(out, torch_dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 14 and all(m.scales.dtype == torch.float16 for m in layers)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16  # --dtype's default


def test_quantize_gptq_names_too_little_calibration(folder_with_tokenizer, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("too short")
    argv = ["quantize", str(folder_with_tokenizer), "--method", "gptq", "--calibration", str(tmp_path / "tiny.txt"),
            "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "GPTQ needs at least one sequence" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_prints_the_perplexity_of_a_model_and_adapter(folder_with_tokenizer, tmp_path, capsys):
    import fourbit
    from fourbit.perplexity import perplexity

    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 40)
    model, tokenizer = fourbit.load_model(folder_with_tokenizer)  # the CLI's defaults
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    base = perplexity(model, ids, 64, 32)
    trained_looking(fourbit.add_lora(model, r=2, alpha=4, target=["q_proj"], verbose=False))
    fourbit.save_adapter(model, tmp_path / "a")
    want = perplexity(model, ids, 64, 32)
    assert want.format() != base.format()  # the adapter changes the model: a CLI ignoring it would print base
    argv = ["eval", str(folder_with_tokenizer), "--adapter", str(tmp_path / "a"), "--perplexity", str(text),
            "--context", "64"]
    assert main(argv) == 0
    assert want.format() in capsys.readouterr().out  # the same model, loaded the same way, same windows


def test_quantize_int8_writes_transformers_8bit_layout(tiny_llama, tmp_path, capsys):
    import fourbit
    from fourbit.nn import Linear8bit

    folder, _ = tiny_llama
    assert main(["quantize", str(folder), "--method", "int8", "--output", str(tmp_path / "int8")]) == 0
    assert "LLM.int8(): 14 linear layers, outlier threshold 6.0" in capsys.readouterr().out
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.1.mlp.up_proj.SCB").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight_format").dtype == torch.uint8
    model, _ = fourbit.load_model(tmp_path / "int8")
    assert sum(isinstance(m, Linear8bit) for m in model.modules()) == 14
    # config.json names the dtype the unquantized weights are stored in (--dtype, bf16 by default),
    # which transformers' dtype="auto" reads; the tiny model's own config said float32.
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["dtype"] == "bfloat16"


def test_transformers_with_bitsandbytes_reads_our_int8_folder(tiny_llama, tmp_path):
    """The folder `fourbit quantize --method int8` writes, read by transformers + bitsandbytes'
    own 8-bit loader: the same stored codes and row scales, and the same LLM.int8() function."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    import fourbit
    from fourbit.nn import Linear8bit

    folder, dense = tiny_llama
    assert main(["quantize", str(folder), "--method", "int8", "--dtype", "float32", "--output", str(tmp_path / "int8")]) == 0
    ours, _ = fourbit.load_model(tmp_path / "int8", torch_dtype="float32", compute_dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", dtype=torch.float32)
    their_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear8bit)}
    assert their_layers.keys() == our_layers.keys() and len(our_layers) == 14
    g = torch.Generator().manual_seed(0)
    for name, layer in our_layers.items():
        their = their_layers[name]
        assert torch.equal(their.weight.data, layer.weight), name
        assert torch.equal(their.state.SCB if their.state.SCB is not None else their.weight.SCB, layer.SCB), name
        # Activations on the int8 grid, k/127 of a row's absmax (1 here): both sides quantize them
        # to the codes k whatever precision they round in (bitsandbytes casts to fp16 first, we do
        # not), so LLM.int8() is the integer product, scaled: k . w_codes x SCB / 127^2, exact in
        # float64. Ours: float32 rounding (1e-6 of the largest output). bitsandbytes' scaling
        # rounds more (measured 1.8e-5 of the largest output): 1e-4.
        codes = torch.randint(-127, 128, (3, layer.in_features), generator=g)
        codes[:, 0] = 127
        x = codes.float() / 127
        exact = (codes.double() @ layer.weight.double().T) * layer.SCB.double() / 127**2
        with torch.no_grad():
            ours_out, their_out = layer(x).double(), their(x).double()
        size = exact.abs().max()
        assert (ours_out - exact).abs().max() < 1e-6 * size, name
        assert (their_out - exact).abs().max() < 1e-4 * size, name
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        ours_logits, their_logits, dense_logits = ours(ids).logits, theirs(ids).logits, dense(ids).logits
    # On real activations the two round some activations to neighbouring int8 codes (fp16 vs
    # fp32 before rounding; one step is a row's absmax / 127): measured 1.0% of the largest
    # logit apart, as far as either is from the dense model. 3%: a misread layout (a transposed
    # weight, scales of other rows) moves the logits by the logits' own size.
    scale = dense_logits.abs().max()
    assert (ours_logits - their_logits).abs().max() < 0.03 * scale
    assert (ours_logits - dense_logits).abs().max() < 0.03 * scale


def test_compare_prints_a_row_per_method_and_a_plot(folder_with_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.compare import default_text_ids
    from fourbit.perplexity import perplexity

    methods = ["bf16", "nf4", "nf4-dq", "int4-rtn", "gptq", "awq", "int8"]
    argv = ["compare", str(folder_with_tokenizer), "--methods", ",".join(methods), "--group-size", "32",
            "--context", "64", "--plot", str(tmp_path / "ppl.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("method"):].splitlines()[1:8]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table}
    assert list(rows) == methods
    bits = {m: r[1] for m, r in rows.items()}
    assert bits["bf16"] == 16.0
    assert 4.12 < bits["nf4-dq"] < 4.14 and bits["nf4"] == 4.5  # 4 + 8/64 + the nested constants; 4 + 32/64
    assert 4.2 < bits["int4-rtn"] < 5.5 and abs(bits["gptq"] - bits["int4-rtn"]) < 1e-9  # same layout
    # AWQ's layout: the same codes, zeros and scales per weight as GPTQ's, but no g_idx (32 bits per input column)
    assert 4.2 < bits["awq"] < bits["int4-rtn"]
    assert 8.0 < bits["int8"] < 8.6  # + a float32 scale per row

    # Perplexities against the float32 model's, scored here on the same text and windows. The
    # tiny random model predicts nearly uniformly (perplexity ~ its 49152 tokens) and is at no
    # loss minimum, so weight noise moves its perplexity either way (nf4 lands below float32):
    # only the size of the move follows the precision. 8 bits (bf16 rounds to 2^-9 of a value,
    # int8 to 1/254 of a row's range): measured 8e-5 relative, bound 3e-4 (a row scale off by
    # 1.5x moves it 3e-3). 4 bits: measured up to 9.3e-4, bound 2e-3.
    ids, _ = default_text_ids(AutoTokenizer.from_pretrained(folder_with_tokenizer))
    dense = AutoModelForCausalLM.from_pretrained(folder_with_tokenizer, dtype=torch.float32)
    fp32 = perplexity(dense, ids, 64).perplexity
    ppl = {m: r[0] for m, r in rows.items()}
    for method, bound in [("bf16", 3e-4), ("int8", 3e-4), ("nf4", 2e-3), ("nf4-dq", 2e-3), ("int4-rtn", 2e-3),
                          ("gptq", 2e-3), ("awq", 2e-3)]:
        assert abs(ppl[method] / fp32 - 1) < bound, (method, ppl[method], fp32)
    # Double quantization moves each block's absmax by less than 1% (8-bit codes of the centred
    # constants): measured 5e-6 apart from nf4, bound 1e-4.
    assert abs(ppl["nf4-dq"] / ppl["nf4"] - 1) < 1e-4
    # GPTQ's error feedback and AWQ's scales and asymmetric grid change codes that round-to-nearest
    # picks: a different model, a different perplexity (equal would mean the method was not run).
    assert ppl["gptq"] != ppl["int4-rtn"] and ppl["awq"] != ppl["int4-rtn"]
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_scores_python_documentation_by_default(chat_tokenizer):
    from pydoc_data.topics import topics

    from fourbit.compare import default_text_ids

    ids, origin = default_text_ids(chat_tokenizer, n_tokens=300)
    assert len(ids) == 300 and "documentation topics (pydoc_data, first keys first), first 300 tokens" in origin
    first = topics[sorted(topics)[0]]
    assert chat_tokenizer.decode(ids[:40]) == chat_tokenizer.decode(chat_tokenizer(first[:400])["input_ids"][:40])


def test_compare_names_methods_it_does_not_have(folder_with_tokenizer, capsys):
    assert main(["compare", str(folder_with_tokenizer), "--methods", "nf4,awq8"]) == 2
    assert "unknown method 'awq8'; choose from bf16, nf4, nf4-dq, fp4, int4-rtn, gptq, awq, int8" in capsys.readouterr().err


def test_only_input_errors_exit_2_and_faults_keep_their_traceback(monkeypatch, capsys):
    import fourbit.cli as cli
    from fourbit.errors import InputError

    def raising(error):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(cli, "_memory", raising(InputError("the thing is wrong; give one of a, b")))
    assert main(["memory"]) == 2
    assert capsys.readouterr().err == "fourbit memory: error: the thing is wrong; give one of a, b\n"
    for fault in (TypeError("a bug"), ValueError("raised by a library under fourbit"), KeyError("k")):
        monkeypatch.setattr(cli, "_memory", raising(fault))
        with pytest.raises(type(fault)):
            main(["memory"])


def test_chat_decodes_from_the_4bit_codes_on_a_cpu_where_the_native_kernel_runs(monkeypatch):
    from fourbit.cli import _chat_dense_cache
    from fourbit.kernels.cpu import native

    model = torch.nn.Linear(2, 2)
    monkeypatch.setenv(native.ENV, "1")
    assert _chat_dense_cache(None, model) is (native.library() is None)  # a machine without a C compiler keeps it
    assert _chat_dense_cache(True, model) and not _chat_dense_cache(False, model)
    monkeypatch.setenv(native.ENV, "0")
    assert _chat_dense_cache(None, model)
