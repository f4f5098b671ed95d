"""AWQ's pieces against what they promise: folding is exact, the scale candidates are AutoAWQ's,
the clip search never loses, and on a layer with outlier input channels AWQ beats round-to-nearest."""

import copy

import pytest
import torch

from fourbit.ptq.awq_model import groups
from fourbit.ptq.layerwise import layer_calls, output
from fourbit.quant import awq
from fourbit.quant.awq import awq_quantize, clip_and_quantize, fold_scales, search_clip
from fourbit.quant.groupwise import quantize_rtn


def layer_updates(model, ids):
    """What each decoder layer adds to the residual stream, output - input (the logits alone would
    hide it: a random tiny model's layers add little to the embeddings, so rounding in them vanishes)."""
    updates = []
    hooks = [layer.register_forward_hook(lambda m, args, out: updates.append(output(out) - args[0]))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return torch.stack(updates)


def fold_random_scales(model, ids, seed, prev=True):
    generator, folded = torch.Generator().manual_seed(seed), 0
    hidden, calls = layer_calls(model, model.model.layers, ids, 8, "cpu")
    for index, layer in enumerate(model.model.layers):
        chosen, _ = groups(layer, hidden[0], *calls[index][0])  # traced on any input of the right shape
        for group in chosen:
            first = layer.get_submodule(group.targets[0])
            s = torch.exp(2 * torch.randn(first.in_features, generator=generator, dtype=torch.float64))  # e^±4 spread
            targets = [layer.get_submodule(t) for t in group.targets]
            if prev:
                fold_scales(layer.get_submodule(group.prev), targets, s, group.unit_offset)
            else:  # the targets alone, a wrong fold: the control that shows the check can fail
                for t in targets:
                    t.weight.data *= s
            folded += 1
    return folded


@pytest.mark.parametrize("dtype,tolerance", [
    # float64: a scale and its inverse add ~1e-16 relative rounding per weight, amplified a little
    # through the attention and MLP (measured 5e-16); 1e-12 leaves room for other seeds and BLAS orders
    (torch.float64, 1e-12),
    # float32 (as quantization runs): the same at 6e-8 per rounding (measured 3e-7); 1e-5 leaves room
    (torch.float32, 1e-5),
])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # norms scaling by w, and by 1 + w (Gemma's)
def test_folding_scales_leaves_the_full_precision_model_unchanged(tmp_path, dtype, tolerance, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    # 4 key/value heads = 4 query heads: v_proj -> o_proj folds too, so all four groups are checked
    config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, head_dim=16, vocab_size=256, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # norms that are not all ones, so dividing them is visible
            if "norm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    wrong = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    before = layer_updates(model, ids)
    assert fold_random_scales(model, ids, seed=1) == 8
    if arch == "gemma2":  # Gemma's norms compute in float32 whatever the model's dtype: float32 rounding
        tolerance = max(tolerance, 1e-5)
    assert ((layer_updates(model, ids) - before).norm() / before.norm()).item() < tolerance
    fold_random_scales(wrong, ids, seed=1, prev=False)
    assert ((layer_updates(wrong, ids) - before).norm() / before.norm()).item() > 0.1


def test_scale_candidates_are_autoawqs_duo_scaling():
    x_mean, w_mean = torch.rand(16) + 0.1, torch.rand(16) + 0.1
    candidates = list(awq.candidate_scales(x_mean, w_mean))
    assert [ratio for ratio, _ in candidates] == [k / 20 for k in range(20)]  # 20 points, 1 excluded
    for ratio, s in candidates:
        raw = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        # s is raw / sqrt(max raw * min raw): the same direction, and max(s) * min(s) = 1 (float32 rounding: 1e-5)
        assert torch.allclose(s / s[0], raw / raw[0], rtol=1e-5)
        assert abs((s.max() * s.min()).item() - 1) < 1e-5


def test_weight_mean_is_relative_to_each_groups_max():
    w = torch.tensor([[1.0, -2.0, 3.0, -6.0], [4.0, 4.0, 1.0, 1.0]])
    # groups of 2: row 0 -> [1/2, 2/2], [3/6, 6/6]; row 1 -> [1, 1], [1, 1]; then the mean over rows
    # (the 1e-6 AutoAWQ adds to each max moves these by 1e-6 relative)
    assert torch.allclose(awq.weight_mean([w], 2), torch.tensor([0.75, 1.0, 0.75, 1.0]), rtol=1e-5)


def test_clip_search_never_does_worse_than_no_clip():
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(300, 64)
    bounds = search_clip(w, x, 32)
    m0 = w.view(16, 2, 32).abs().amax(dim=-1)
    assert bounds.shape == (16, 2) and (bounds <= m0).all() and (bounds >= 0.5 * m0 * (1 - 1e-6)).all()

    def groupwise_error(q):  # per (row, group): mean over tokens of the squared dot-product difference
        return (torch.einsum("tgk,ogk->otg", x.view(-1, 2, 32), (q - w).view(16, 2, 32))).square().mean(dim=1)

    clipped = groupwise_error(clip_and_quantize(w, x, 32).dequantize())
    unclipped = groupwise_error(quantize_rtn(w, 4, 32, sym=False).dequantize())
    # the unclipped bound is candidate 0, so every group's error is at most its error (float32
    # sums of 32 products: 1e-5 relative)
    assert (clipped <= unclipped * (1 + 1e-5)).all() and (clipped < unclipped).any()


def test_awq_beats_round_to_nearest_on_a_layer_with_outlier_input_channels():
    g = torch.Generator().manual_seed(0)
    w, x = 0.05 * torch.randn(64, 256, generator=g), torch.randn(512, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:8]] *= 20  # 8 salient input channels, as LLM activations have
    quant, s = awq_quantize(w, x, group_size=64)
    reference = x @ w.T
    awq_error = ((x / s) @ quant.dequantize().T - reference).square().mean()  # the layer computes (x / s) W~^T
    rtn_error = (x @ quantize_rtn(w, 4, 64, sym=False).dequantize().T - reference).square().mean()
    # measured 0.28 of RTN's error over seeds 0-4 (at most 0.32); 0.5 fails only if the scaling stops working
    assert awq_error < 0.5 * rtn_error, (awq_error, rtn_error)


def test_a_group_size_that_does_not_divide_the_input_is_named():
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 256"):
        awq_quantize(torch.randn(64, 256), torch.randn(32, 256), group_size=48)
