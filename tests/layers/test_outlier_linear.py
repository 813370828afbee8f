"""LLM.int8()'s outlier layer against bitsandbytes' Linear8bitLt on the CPU, and why the
decomposition matters."""

import copy

import bitsandbytes as bnb
import pytest
import torch

from lowbit import QuantConfig, quantize_model
from lowbit.layers.outlier_linear import EXACT_COLUMNS, QMAX, Int8OutlierLinear, float_path_share, int8_matmul
from lowbit.planning import QuantPlan


def fp16_exact_linear(k: int, n: int, seed: int) -> torch.nn.Linear:
    """Weights bitsandbytes' fp16 cast leaves unchanged, so both sides quantize the same numbers."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
        lin.bias.copy_(lin.bias.half().float())
    return lin


def bnb_layer(lin: torch.nn.Linear, threshold: float):
    b = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False,
                            threshold=threshold)
    b.load_state_dict(lin.state_dict())
    return b.to("cpu").eval()  # eval: in training mode its CPU path multiplies dequantized weights instead


def with_outliers(m: int, k: int, columns, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, columns] *= 25  # |x| well above 6 in these columns, in most rows
    return x.half().float()  # bitsandbytes quantizes a float16 copy of the activations


def assert_close_to_bnb(ours: Int8OutlierLinear, theirs, x: torch.Tensor):
    """Equal up to the weight codes the two rounding rules put one apart, and float32 rounding.

    lowbit's int8 rounds w / s with s = absmax / 127 (docs/formats.md#integers); bitsandbytes rounds
    w * (127 / absmax). Where w * 127 / absmax lies within a float32 rounding of a half-integer the
    two codes differ by one (21 of 884,736 weights of a 1536x576 layer): each such code moves the
    output by s * |x_j| (its column's input, at the activation scale the int8 path gives it,
    at most |x_j| + a / 254). The rest: the int32 product is exact on both sides, and the rescaling
    and the float outlier product round in float32 (4 K 2^-24 sum|w x| covers it)."""
    with torch.no_grad():
        y, ref = ours(x), theirs(x)
    dq = (ours.int8_weight().int() - theirs.weight.data.int()).abs().float() * ours.row_scales()
    a = x.abs().amax(1, keepdim=True)
    moved = (x.abs() + a / (2 * QMAX)) @ dq.t()
    scale = x.abs() @ (ours.int8_weight().float() * ours.row_scales()).abs().t()
    bound = moved + 4 * x.shape[1] * 2.0**-24 * scale + 1e-6
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() - bound).max()
    assert dq.count_nonzero() < 1e-3 * dq.numel()


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 48), (16, 576, 1536), (7, 1536, 576)])
def test_matches_bitsandbytes_with_planted_outliers(m, k, n):
    lin = fp16_exact_linear(k, n, seed=k)
    x = with_outliers(m, k, [3, k // 2, k - 1], seed=m)
    ours = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    assert_close_to_bnb(ours, bnb_layer(lin, 6.0), x)
    assert ours.outlier_columns == 3


def test_matches_bitsandbytes_on_real_smollm2_activations(smollm2):
    """The input of layers.2.mlp.down_proj (after SiLU-gating: the model's widest activations) on one window."""
    model, tokenizer, _, _ = smollm2
    seen = {}
    layer = model.model.layers[2].mlp.down_proj
    def keep(module, args, out):  # returns None: the output is left as it is
        seen.setdefault("x", args[0].detach())

    hook = layer.register_forward_hook(keep)
    with torch.inference_mode():
        model(tokenizer("The history of the city begins with a small port on the river. " * 8,
                        return_tensors="pt").input_ids)
    hook.remove()
    x = seen["x"][0].half().float()
    lin = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.half().float())
        lin.bias.zero_()
    for threshold in (6.0, 1.0):  # 1.0: the paper's rule on a small model, so some columns take the float path
        ours = Int8OutlierLinear.from_linear(lin, threshold=threshold)
        assert_close_to_bnb(ours, bnb_layer(lin, threshold), x)
    assert ours.outlier_columns > 0


def test_the_decomposition_matters():
    """With planted outlier columns, rounding them with the rest (threshold 0) costs a large factor."""
    lin = fp16_exact_linear(576, 576, seed=1)
    x = with_outliers(32, 576, [10, 200, 400, 500], seed=2)
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    with torch.no_grad():
        err = {t: (Int8OutlierLinear.from_linear(lin, threshold=t)(x).double() - exact).abs().mean().item()
               for t in (6.0, 0.0)}
    assert err[0.0] > 5 * err[6.0], err


def test_int8_matmul_is_exact_beyond_float32s_integer_range():
    g = torch.Generator().manual_seed(0)
    k = 3 * EXACT_COLUMNS + 17  # sums up to 127^2 k > 2^24: a plain fp32 product would round
    a = torch.full((3, k), 127, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, k), dtype=torch.int8, generator=g)
    b[0] = 127
    assert torch.equal(int8_matmul(a, b).long(), a.long() @ b.long().t())


def test_bad_input_is_refused_with_the_layer_named():
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="finite number >= 0"):
        Int8OutlierLinear.from_linear(lin, threshold=-1.0)
    layer = Int8OutlierLinear.from_linear(lin, threshold=6.0, name="model.layers.0.mlp.up_proj")
    for shape in ((32,), (1, 1, 1, 32), (4, 31)):
        with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: input of shape"):
            layer(torch.randn(shape))
    x = torch.randn(2, 5, 32)
    x[1, 3, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj: NaN or inf"):
        layer(x)
    assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 8)


@pytest.mark.parametrize(("label", "threshold"), [("int8_outlier", 6.0), ("int8_outlier/3.5", 3.5),
                                                  ("int8_outlier/0", 0.0), (" int8_outlier/6.0 ", 6.0)])
def test_label_names_the_threshold(label, threshold):
    config = QuantConfig.parse(label)
    assert (config.format, config.outlier_threshold, config.format_name) == ("int8", threshold, "int8_outlier")
    assert QuantConfig.parse(config.label) == config
    assert QuantConfig(format="int8_outlier") == QuantConfig.parse("int8_outlier")


@pytest.mark.parametrize(("label", "message"), [
    ("int8_outlier/-1", "finite number >= 0"),
    ("int8_outlier/nan", "finite number >= 0"),
    ("int8_outlier/six", "after int8_outlier/ comes the outlier threshold"),
    ("int8_outlier+dq", "takes no suffix"),
    ("int8_outlier@mse", "takes no suffix or scale search"),
])
def test_bad_labels_are_refused(label, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.parse(label)
    with pytest.raises(ValueError, match="cannot take a block size"):
        QuantConfig(format="int8", outlier_threshold=6.0, block_size=64)


def test_quantize_model_swaps_in_the_outlier_layer_with_honest_bytes(smollm2):
    model = copy.deepcopy(smollm2[0])
    report = quantize_model(model, QuantPlan.uniform("int8_outlier/3.5"), progress=False)
    layers = [m for m in model.modules() if isinstance(m, Int8OutlierLinear)]
    assert len(layers) == len(report.layers) == 210 and report.format == "int8_outlier"
    assert {m.threshold for m in layers} == {3.5} and layers[0].name == report.layers[0]
    # 8 bits per weight and one float32 scale per row of in_features weights
    rows = sum(m.out_features for m in layers)
    assert report.layer_bytes_after == report.layer_numel + 4 * rows
    assert report.layer_configs[0][1] == "int8_outlier/3.5"
    ids = torch.arange(1000, 1064)[None]
    with torch.inference_mode():
        packed = model(ids).logits
        for m in layers:
            m.materialize()
        assert torch.equal(model(ids).logits, packed)  # the kept float codes give the same bits
    assert float_path_share(model) > 0
