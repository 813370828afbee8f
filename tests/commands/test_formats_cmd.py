import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import QuantConfig, get_format
from lowbit.cli import main
from lowbit.commands.formats_cmd import bits_by_role, layout, layout_table, level_table, levels
from lowbit.formats.facts import probe
from lowbit.formats.probe import stored
from lowbit.formats.spec import CODES, DOUBLE_QUANT_FIELDS, SCALE, SECOND_LEVEL, TENSOR_SCALE, anatomy
from lowbit.tensor import QuantizedTensor


def test_formats_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in lowbit.formats():
        assert name in out
    assert "FORMAT[/BLOCK][+dq]" in out and "256 fixed" in out


def test_formats_lists_the_reference_floats(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "full-precision reference formats" in out
    for row in ("│ fp32   │   32 │ 1/8/23", "│ tf32   │   19 │ 1/8/10", "│ bf16   │   16 │ 1/8/7",
                "│ fp16   │   16 │ 1/5/10"):
        assert row in out
    assert "65504" in out and "5.96046e-08" in out and "0.0078125" in out  # fp16 max and tiny, bf16 eps
    assert main(["formats", "tf32"]) == 0
    assert "TensorFloat-32" in capsys.readouterr().out


def test_formats_code_table(capsys):
    assert main(["formats", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "0111" in out and "-0.696192801" in out and "1111" in out
    assert "w = level[q] * absmax" in out  # brackets in the data are text, not rich markup


def test_unknown_format_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "formats", "nf44"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean nf4" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", lowbit.formats())
def test_every_format_prints_its_layout_and_levels(name, capsys):
    spec = get_format(name)
    assert main(["formats", name]) == 0
    out = capsys.readouterr().out
    assert "where the bits go" in out and anatomy(spec).rule in out
    assert "element levels" in out or spec.family == "cast"
    if spec.family == "learned":  # levels belong to each tensor (its tensor_codebook part), not to the format
        assert level_table(spec).row_count == 0 and "learned per tensor" in out
    elif spec.family == "cast":  # every 16-bit float is a level: the range facts instead of a table of them
        assert "smallest subnormal" in out and f"{name}'s range" in out
        return
    else:
        assert 2 < level_table(spec).row_count == len(levels(spec)) <= 2**spec.bits  # int narrow range, ternary
    q = probe(QuantConfig(name))
    rows = layout(q)
    assert rows and layout_table(q).row_count == len(rows)
    assert any(r.role == CODES for r in rows) and any(r.role in (SCALE, TENSOR_SCALE) for r in rows)
    assert all(r.holds and r.size for r in rows)
    # every stored byte is accounted for, by the measured part sizes or the GGUF field table
    assert sum(r.bits_per_weight for r in rows) == pytest.approx(q.bits_per_weight, rel=1e-12)


# w = (q - offset) * d (+ m): ggml-quants.c dequantize_row_* (docs/formats.md#gguf-legacy-blocks), with d = 1 and m = 0
GGUF_LEVELS = {
    "q8_0": [q - 256 if q > 127 else q for q in range(256)],  # int8 codes
    "q4_0": [q - 8 for q in range(16)],
    "q4_1": list(range(16)),
    "q5_0": [q - 16 for q in range(32)],
    "q5_1": list(range(32)),
    "q4_k": list(range(16)),
    "q6_k": [q - 32 for q in range(64)],
}


def decoded_levels(spec) -> list[float]:
    """What the codec's own decoder makes of one block whose every code is q, scales 1, minimums 0."""
    a, out = anatomy(spec), []
    for code in range(2**spec.bits):
        data = torch.frombuffer(bytearray(b"".join(f.probe_bytes(code) for f in a.fields)), dtype=torch.uint8)
        shape = torch.Size([spec.default_block_size])
        w = QuantizedTensor(spec, shape, torch.float32, spec.default_block_size, {"data": data.view(1, -1)})
        w = w.dequantize()
        assert bool((w == w[0]).all()), f"{spec.name}: code {code} decodes unevenly"
        out.append(float(w[0]))
    return out


def test_gguf_levels_come_from_the_decoder():
    gguf = [n for n in lowbit.formats() if get_format(n).values is None
            and get_format(n).family not in ("learned", "cast")]
    assert sorted(gguf) == sorted(GGUF_LEVELS)
    for name, expected in GGUF_LEVELS.items():
        assert levels(get_format(name)) == expected == decoded_levels(get_format(name)), name


def _labels():
    for name in lowbit.formats():
        spec = get_format(name)
        yield name
        if spec.double_quant:
            yield f"{name}+dq"
        if not spec.fixed_block_size:
            yield f"{name}/32"
            yield f"{name}/4096" + ("+dq" if spec.double_quant else "")
    yield from ("int8_outlier", "int4_asym/100@hqq")


def measured_layout(q: QuantizedTensor) -> list[tuple]:
    """(field, role, size of a scale part, bits/weight) of each part a codec stored, as `lowbit formats` printed
    them when it quantized the probe tensor."""
    if anatomy(q.format).gguf_block:
        assert q.parts["data"].shape[1] == q.format.block_bytes
        return [(f.name, f.role, None, 8 * f.nbytes / q.block_size) for f in anatomy(q.format).fields]
    described = {f.name: f for f in (*anatomy(q.format).fields, *DOUBLE_QUANT_FIELDS)}
    rows = []
    for name, t in q.parts.items():
        f = described[name]
        size = None if f.role == CODES else f"{str(t.dtype).removeprefix('torch.')} ({t.element_size()} B) per {f.per}"
        rows.append((name, f.role, size, 8 * t.numel() * t.element_size() / q.numel))
    return rows


@pytest.mark.parametrize("label", list(_labels()))
def test_layout_from_the_facts_is_what_the_codec_stores(label):
    """The layout rows `lowbit formats LABEL` counts from the facts (no torch) against the parts of the probe
    tensor quantized by the codecs: the same fields, in the same order, dtypes and bits per weight."""
    config = QuantConfig.parse(label)
    q, facts = stored(probe(config)), probe(config)
    assert (facts.shape, facts.block_size, facts.numel) == (tuple(q.shape), q.block_size, q.numel)
    assert facts.bits_per_weight == q.bits_per_weight
    gguf = anatomy(q.format).gguf_block  # a GGUF field's size is its byte range in the block, the same text
    rows = [(r.field, r.role, None if gguf or r.role == CODES else r.size, r.bits_per_weight) for r in layout(facts)]
    assert rows == measured_layout(q), label


def test_q4_0_explained(capsys):
    assert main(["formats", "q4_0"]) == 0
    out = capsys.readouterr().out
    assert "32 weights, fixed (GGUF)" in out and "w = (q - 8) * d" in out
    assert "bytes 0-1 (2 B)" in out and "bytes 2-17 (16 B)" in out
    assert "element j in the low nibble of byte j, element j+16 in the high nibble" in out
    assert "4.5 = codes 4 + scale 0.5" in out
    assert "1000 │" in out and "-8 │" in out  # code 8 means 0, code 0 means -8 d


def test_full_label_is_explained(capsys):
    assert main(["formats", "nf4/128+dq"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nf4/128+dq") and "128 weights (default 64" in out
    assert "double quant  yes" in out and "scales_absmax" in out and "per 256 blocks" in out
    q = probe(QuantConfig.parse("nf4/128+dq"))
    roles = bits_by_role(layout(q))
    # docs/formats.md#double-quantization: 8 bits per 128-weight block + an fp32 per 256 blocks,
    # + one fp32 offset per tensor
    assert roles == pytest.approx({CODES: 4.0, SECOND_LEVEL: 8 / 128 + 32 / (128 * 256) + 32 / q.numel})
    assert f"{q.bits_per_weight:.6g}" in out


@pytest.mark.parametrize(
    ("label", "bits"),
    # docs/formats.md#bits-per-weight, measured from stored bytes (nvfp4: + one fp32 per tensor)
    [("nf4", 4.5), ("nf4+dq", 4.127), ("q4_0", 4.5), ("q4_1", 5.0), ("q8_0", 8.5), ("q4_k", 4.5),
     ("mxfp4", 4.25), ("nvfp4", 4.5)],
)
def test_measured_bits_match_the_spec(label, bits):
    assert probe(QuantConfig.parse(label)).bits_per_weight == pytest.approx(bits, abs=1e-3)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("q4_0/64", r"q4_0 has a fixed block of 32 weights (GGUF)"),
        ("int4_asym+dq", "it stores an fp32 scale s and a uint8 zero point z per block"),
        ("nf4/abc", "block size 'abc' is not a whole number"),
        ("nf4+DQ", "did you mean nf4+dq?"),
        ("+dq", "'+dq' names no format"),
    ],
)
def test_bad_label_is_one_line_exit_2(label, message, capsys):
    assert main(["formats", label]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit formats: error: ") and err.strip().count("\n") == 0
    assert message in err


def test_llm_int8_label_explains_row_scales_and_the_activations(capsys):
    assert main(["formats", "int8_outlier/3.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "one row (4096 weights here)" in out and "8.00781 = codes 8 + scale 0.007812" in out
    assert "|x| >= 3.5" in out and "not available" in out
