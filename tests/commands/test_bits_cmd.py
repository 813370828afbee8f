"""`lowbit bits VALUE`: fields, stored values and errors; bad input in one line."""

import re
import time

import pytest

from lowbit.cli import main


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_pi_walk_through(capsys):
    assert main(["bits", "3.1415926535"]) == 0
    rows = _rows(capsys.readouterr().out)
    stored = {name: cells[6] for name, cells in rows.items()}
    assert stored["fp32"] == "3.14159274" and stored["bf16"] == stored["fp16"] == stored["tf32"] == "3.140625"
    assert stored["fp8_e4m3fn"] == "3.25" and stored["fp8_e5m2"] == "3" and stored["fp4_e2m1"] == "3"
    assert rows["fp32"][4] == "0x40490fdb" and rows["bf16"][4] == "0x4049" and rows["fp16"][4] == "0x4248"
    assert rows["fp16"][2].startswith("10000 = 16 (2^1)") and rows["fp16"][3] == "1001001000"
    assert rows["bf16"][7] == "0.000968" and rows["bf16"][8] == "0.000308"
    assert rows["nf4"][4] == "1111 = 15" and rows["nf4"][6] == "1"  # scale 1: past the top level, clamped


@pytest.mark.parametrize("value, stored", [("-1e-3", "-0.00100040436"), ("-1/3", "-0.333251953"), ("-inf", "-inf")])
def test_negative_values_need_no_double_dash(value, stored, capsys):
    assert main(["bits", value, "--formats", "fp16"]) == 0
    assert _rows(capsys.readouterr().out)["fp16"][6] == stored


def test_codebook_level_and_scale(capsys):
    assert main(["bits", "0.35", "--formats", "nf4,int4", "--scale", "0.5"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["nf4"][4] == "1110 = 14" and rows["nf4"][6] == "0.361478418"  # 0.7 -> level 0.7229568 (bnb NF4)
    assert rows["int4"][4] == "1000 = 8" and rows["int4"][6] == "0.5"  # 0.7 rounds to q 1 of +-7


@pytest.mark.parametrize("value, expect", [
    ("nan", {"fp32": "nan", "fp8_e4m3fn": "nan", "fp4_e2m1": "-0"}),
    ("inf", {"fp32": "inf", "fp16": "inf", "fp8_e4m3fn": "nan", "fp8_e5m2": "inf", "fp4_e2m1": "6"}),
    ("1e6", {"fp32": "1000000", "bf16": "999424", "fp16": "inf", "fp8_e4m3fn": "nan", "fp4_e2m1": "6"}),
    ("-1e-50", {"fp32": "-0", "fp16": "-0"}),
    ("1e400", {"fp32": "inf", "bf16": "inf", "fp8_e4m3fn": "nan", "fp4_e2m1": "6", "nf4": "1"}),  # past float64 too
])
def test_specials_and_overflow_are_shown_not_errors(value, expect, capsys):
    assert main(["bits", value]) == 0  # -1e-50 is the value, not an option
    out = capsys.readouterr().out
    rows = _rows(out)
    for name, stored in expect.items():
        assert rows[name][6] == stored, (name, rows[name])
    if value in ("inf", "1e6"):
        assert re.search(r"fp8_e4m3fn: no Inf: a non-saturating cast gives NaN .* gives 448", " ".join(out.split()))


@pytest.mark.parametrize("argv, message", [
    (["bits", "abc"], "cannot read 'abc' as a number"),
    (["bits", "1/0"], "cannot read '1/0' as a number"),
    (["bits", "1", "--formats", "q4_0"], "q4_0 is not one of them"),
    (["bits", "1", "--formats", "nf44"], "unknown format 'nf44'"),
    (["bits", "1", "--scale", "0"], "--scale must be a positive number a float32 block scale can hold"),
    (["bits", "1", "--scale", "1e-400"], "--scale must be a positive number a float32 block scale can hold"),
    (["bits", "1", "--formats", ","], "--formats names no format"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# Issue 25 finding 6: `lowbit bits 1e10000000 --formats fp16` ran for over 10 minutes (exact rationals of
# 10^10000000); 9e-99999999999 hung too. Past 10^+-1000 a value is answered as the formats handle overflow and
# underflow, without building it.
@pytest.mark.parametrize("value, expect, abs_error", [
    ("1e10000000", {"fp32": "inf", "fp16": "inf", "fp8_e4m3fn": "nan", "fp8_e5m2": "inf", "fp4_e2m1": "6", "nf4": "1"},
     "1e+10000000"),
    ("-1e10000000", {"fp16": "-inf", "fp8_e4m3fn": "nan", "fp4_e2m1": "-6", "nf4": "-1"}, "1e+10000000"),
    ("9e-99999999999", {"fp32": "0", "fp16": "0", "fp8_e4m3fn": "0", "fp4_e2m1": "0", "nf4": "0"}, "9e-99999999999"),
    ("-9e-99999999999", {"fp32": "-0", "bf16": "-0", "fp4_e2m1": "-0"}, "9e-99999999999"),
    ("1.235e1001", {"fp4_e2m1": "6"}, "1.23e+1001"),  # 1.235e1001 - 6 is just under the tie: rounds down
    ("1e99999999999999999999", {"fp16": "inf"}, None),  # past Python's decimal exponents too
])
def test_values_past_every_range_are_answered_at_once(value, expect, abs_error, capsys):
    start = time.perf_counter()
    assert main(["bits", value]) == 0
    assert time.perf_counter() - start < 1
    rows = _rows(capsys.readouterr().out)
    for name, stored in expect.items():
        assert rows[name][6] == stored, (name, rows[name])
    if abs_error:
        assert rows["fp4_e2m1"][7] == abs_error and rows["fp4_e2m1"][8] == "1"


def test_the_exact_range_still_rounds_exactly(capsys):
    # 2^-149 (fp32's smallest subnormal) written with 105 digits is inside the exact range: stored exactly
    exact = ("1.401298464324817070923729583289916131280261941876515771757068283889791082685860601486638188362121582"
             "03125e-45")
    assert main(["bits", exact, "--formats", "fp32"]) == 0
    assert _rows(capsys.readouterr().out)["fp32"][7] == "0"


def test_a_scale_past_every_range_is_refused_at_once(capsys):
    start = time.perf_counter()
    assert main(["bits", "1", "--scale", "1e10000000"]) == 2
    assert time.perf_counter() - start < 1
    err = capsys.readouterr().err
    assert "--scale must be a positive number a float32 block scale can hold" in err and err.count("\n") == 1


def test_a_value_longer_than_the_limit_is_refused(capsys):
    assert main(["bits", "1" * 1001]) == 2
    err = capsys.readouterr().err
    assert "lowbit bits reads at most 1,000" in err and err.count("\n") == 1
