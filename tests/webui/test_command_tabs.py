"""The Evaluate and Export tabs build command lines: each one is what ``fourbit`` itself parses."""

import pytest

from fourbit.cli import build_parser
from fourbit.webui import command_tabs, runs
from fourbit.webui.chat_tab import BASE


@pytest.mark.parametrize("kind", command_tabs.EVALUATE_KINDS)
@pytest.mark.parametrize("adapter", [BASE, "run-1"])
def test_each_evaluate_job_is_a_command_fourbit_parses(tmp_path, kind, adapter):
    folder = tmp_path / "jobs" / "job-1"
    args, output = command_tabs.evaluate_command(kind, tmp_path, folder, "some/model", adapter, "text.txt", 256,
                                                 ["bf16", "nf4"], 32, "arc_easy,my_task.yaml", 0.1)
    parsed = build_parser().parse_args(args)
    assert parsed.source == "some/model"
    if kind == "perplexity":
        assert (parsed.perplexity, parsed.context, output) == ("text.txt", 256, None)
    elif kind == "compare":  # compare measures the quantization methods on the base alone
        assert (parsed.methods, parsed.plot, parsed.perplexity) == ("bf16,nf4", str(folder / "compare.png"), "text.txt")
        assert parsed.group_size == 32
        assert output == parsed.plot
    else:
        assert (parsed.tasks, parsed.limit, parsed.output) == ("arc_easy,my_task.yaml", 0.1, str(folder / "results.json"))
    if kind != "compare":
        assert parsed.adapter == (None if adapter == BASE else str(runs.run_folder(tmp_path, adapter)))


@pytest.mark.parametrize("kind, method", [("merge", "bf16"), ("merge", "nf4"), ("quantize", "gptq"), ("quantize", "int8"),
                                          ("gguf", None)])
def test_each_export_job_is_a_command_fourbit_parses(tmp_path, kind, method):
    args, output = command_tabs.export_command(kind, tmp_path, "", "run-1", "out-1", method, "q4_k_m")
    parsed = build_parser().parse_args(args)
    adapter = str(runs.run_folder(tmp_path, "run-1"))
    if kind == "merge":
        assert (parsed.adapter, parsed.base, parsed.output) == (adapter, None, str(tmp_path / "exports" / "out-1"))
        assert parsed.requantize == (None if method == "bf16" else method)
    elif kind == "quantize":
        assert (parsed.source, parsed.method, parsed.output) == ("default", method, output)
    else:
        assert (parsed.adapter, parsed.quant, parsed.output) == (adapter, "q4_k_m", str(tmp_path / "exports" / "out-1.gguf"))


def test_a_merge_without_an_adapter_and_a_bad_output_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="choose the adapter"):
        command_tabs.export_command("merge", tmp_path, "", BASE, "out", "bf16", "q8_0")
    with pytest.raises(ValueError, match="output name '../x'"):
        command_tabs.export_command("gguf", tmp_path, "", "run-1", "../x", None, "q8_0")
