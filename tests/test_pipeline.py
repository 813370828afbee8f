"""The grid pipeline: fake quantization equals quantize().dequantize() to the bit, its
gradients are LSQ's, fast paths are chosen in one place, and the package layering holds."""

import ast
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import dispatch, kernels
from lowbit.fake_quant import fake_quantize, initial_scales
from lowbit.formats.registry import GridCodec, codec_for
from lowbit.formats.table import FACTS

SRC = Path(lowbit.__file__).parent
GRID = [name for name in lowbit.formats() if issubclass(codec_for(lowbit.get_format(name)), GridCodec)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("name", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_forward_is_dequantize_to_the_bit(name, dtype):
    torch.manual_seed(hash(name) % 1000)
    x = (torch.randn(19, 101) * torch.logspace(-2, 1, 101)).to(dtype)  # a partial trailing block, varied ranges
    x[3, :40] = 0  # an all-zero block
    spec = lowbit.get_format(name)
    expected = lowbit.quantize(x, spec).dequantize()
    got = fake_quantize(x, spec, initial_scales(x, spec))
    assert got.dtype == dtype and torch.equal(bits(got), bits(expected))


def test_fake_quantize_gradients_are_lsq():
    """int4: d out/dx = 1 inside [-Qp s, Qp s]; d out/ds = q - x/s inside, +-Qp at the clip."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    scales = initial_scales(x, "int4", block_size=64)
    s = (scales["scales"] * 0.6).requires_grad_(True)  # clip some elements
    xx = x.clone().requires_grad_(True)
    fake_quantize(xx, "int4", {"scales": s}, block_size=64).sum().backward()
    y = x / s.detach()[:, None]
    inside = y.abs() <= 7
    q = torch.round(y).clamp(-7, 7)
    assert torch.equal(xx.grad, inside.float())
    torch.testing.assert_close(s.grad, torch.where(inside, q - y, q).sum(dim=1))


def test_fake_quantize_zero_point_gradient():
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    scales = initial_scales(x, "int4_asym")
    s = scales["scales"].clone().requires_grad_(True)
    z = scales["zeros"].float().requires_grad_(True)
    out = fake_quantize(x, "int4_asym", {"scales": s, "zeros": z})
    assert torch.equal(out, lowbit.quantize(x, "int4_asym").dequantize())
    out.sum().backward()
    assert s.grad is not None and z.grad is not None and torch.isfinite(s.grad).all()


def test_fake_quantize_with_a_float_zero_is_the_hqq_tensor():
    torch.manual_seed(2)
    x = torch.randn(5, 100)  # a partial trailing block
    q = lowbit.quantize(x, "int4_asym", search="hqq")
    scales = {k: v for k, v in q.parts.items() if k != "codes"}
    assert scales["zeros"].dtype == torch.float16
    assert torch.equal(fake_quantize(x, "int4_asym", scales), q.dequantize())


def test_fake_quantize_refuses_gguf_blocks():
    with pytest.raises(ValueError, match="grid format"):
        fake_quantize(torch.zeros(32), "q4_0", {})


@pytest.mark.skipif(kernels.native is None, reason="the C library did not build")
def test_dispatch_chooses_in_one_place(monkeypatch):
    assert dispatch.lookup("quantize", "int") is not None
    with dispatch.use("reference"):
        assert dispatch.lookup("quantize", "int") is None and not kernels.enabled()
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    assert dispatch.lookup("dequantize", "codebook") is None
    with dispatch.use("native"):  # an explicit argument wins over the environment
        assert dispatch.lookup("dequantize", "codebook") is not None
    with pytest.raises(ValueError, match="native, reference"):
        dispatch.check_preference("fast")


@pytest.mark.skipif(kernels.native is None, reason="the C library did not build")
@pytest.mark.parametrize("op_family", sorted(dispatch.registered()), ids=lambda k: "-".join(k))
def test_every_fast_path_matches_the_reference(op_family):
    op, family = op_family
    names = [n for n in lowbit.formats() if lowbit.get_format(n).family == family] or ["fp4_e2m1"]
    if op == "search":  # picks a scale, not bits: it must reach the reference search's error
        torch.manual_seed(4)
        x = torch.randn(96, 256) * torch.rand(256) ** 2
        imp = torch.rand(256) ** 3
        for name in names[:3]:
            errors = []
            for path in ("native", "reference"):
                q = lowbit.quantize(x, name, search="amse", importance=imp, kernels=path)
                errors.append(float(((q.dequantize() - x) ** 2 * imp).sum()))
            assert errors[0] <= errors[1] * 1.03, (name, errors)  # two heuristic scans: within 3%
        return
    if op in ("round", "lut_scale"):  # element-level paths, reached through these families
        names = {"exmy": ["fp4_e2m1", "fp8_e4m3fn", "mxfp4", "nvfp4"], "minifloat": ["fp8_e5m2"],
                 "mx": ["mxfp6_e3m2"], "nvfp4": ["nvfp4"]}[family]
    torch.manual_seed(3)
    x = torch.randn(64, 256) * 3
    for name in names:
        native = lowbit.quantize(x, name, kernels="native")
        reference = lowbit.quantize(x, name, kernels="reference")
        assert native.tobytes() == reference.tobytes(), name
        assert torch.equal(bits(native.dequantize(kernels="native")), bits(reference.dequantize(kernels="reference")))


def _imports(package: str) -> set[str]:
    """Modules a package's files import, relative imports resolved."""
    found = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = ["lowbit", *path.relative_to(SRC).parent.parts]  # "from ." is this package
                base = package[: len(package) + 1 - node.level]
                found.add(".".join([*base, node.module] if node.module else base))
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return found


def test_package_layering():
    """formats never imports gguf or the kernels; scaling never imports formats."""
    formats = _imports("formats")
    assert not any(m.startswith(("lowbit.gguf", "lowbit.kernels")) for m in formats), formats
    assert not any(m.startswith("lowbit.formats") for m in _imports("scaling"))


def test_format_ids_are_written_once():
    """Every registered format comes from the facts table, and no codec module writes an id."""
    assert {f.name for f in FACTS} == set(lowbit.formats())
    for f in FACTS:
        spec = lowbit.get_format(f.name)
        assert (spec.id, spec.bits, spec.default_block_size, spec.family) == (f.id, f.bits, f.block, f.family)
    for path in [*(SRC / "formats").glob("*.py"), *(SRC / "gguf").glob("*.py")]:
        if path.name not in ("table.py", "registry.py"):  # the table, and define() that reads it
            assert "id=" not in path.read_text().replace("_id=", ""), path
    assert lowbit.get_format("q4_0").gguf_type == "Q4_0" and lowbit.get_format("nf4").bnb_quant_type == "nf4"
