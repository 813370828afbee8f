import math
from types import SimpleNamespace

import pytest

from lowbit import memory as mem


def _row(name: str, params: int = 70_000_000_000, kv=None) -> mem.FormatMemory:
    return next(r for r in mem.weight_memory(params, kv) if r.format == name)


def test_70b_by_hand():
    # docs/formats.md#double-quantization: nf4+dq stores 4 + 8/64 + 32/(64*256) bits per weight
    # (+ one fp32 offset per probe tensor); 70e9 x 4.127 / 8 = 36.1 GB
    assert _row("nf4+dq").weight_bytes / mem.GB == pytest.approx(36.1, abs=0.05)
    assert _row("fp32").weight_bytes == 280e9  # 70e9 x 4 bytes
    assert _row("bf16").weight_bytes == 140e9
    assert _row("mxfp4").weight_bytes == 70e9 * 4.25 / 8  # 32 E2M1 codes + one E8M0 scale per block
    assert _row("int2").weight_bytes == 70e9 * 2.5 / 8  # 2-bit codes + an fp32 scale per 64


def test_labels_and_measured_bits():
    got = {r.format: (r.label, r.bits_per_weight) for r in mem.weight_memory(1)}
    assert list(got) == ["fp32", "bf16", "fp8", "int8", "nf4", "nf4+dq", "q4_0", "q4_k", "mxfp4", "nvfp4", "int2"]
    # int8 and fp8 are measured, not nominal: 8-bit codes plus one fp32 scale per 64 weights
    assert got["int8"] == ("int8", 8.5) and got["fp8"] == ("fp8_e4m3fn", 8.5)
    assert got["fp32"][1] == 32 and got["bf16"][1] == 16
    assert got["q4_0"][1] == 4.5 and got["q4_k"][1] == 4.5 and got["nf4"][1] == 4.5
    assert got["nvfp4"][1] == pytest.approx(4.5, abs=1e-3)  # + one fp32 per probe tensor


@pytest.mark.parametrize(("text", "count"), [
    ("70B", 70_000_000_000), ("7b", 7_000_000_000), ("1.5B", 1_500_000_000), ("350M", 350_000_000),
    ("1.2T", 1_200_000_000_000), ("8e9", 8_000_000_000), ("70000000000", 70_000_000_000), (" 125m ", 125_000_000),
    ("2.5e3K", 2_500_000), (".5B", 500_000_000),
])
def test_params_parse(text, count):
    assert mem.parse_params(text) == count


@pytest.mark.parametrize("text", ["0", "-70B", "70Q", "", "nan", "inf", "1e400", "0.5", "B", "1_000", "7 B B"])
def test_params_refused(text):
    with pytest.raises(ValueError, match="is not a parameter count.*70B, 7b, 1.5B, 350M, 1.2T, 8e9"):
        mem.parse_params(text)


def test_fit_boundary():
    # 16 GB with 20% held back leaves 12.8e9 bytes: exactly that fits, one byte more needs two
    assert mem.devices_needed(12.8e9, 16, 0.2) == 1
    assert mem.devices_needed(12.8e9 + 1, 16, 0.2) == 2
    assert mem.devices_needed(25.6e9, 16, 0.2) == 2
    assert mem.devices_needed(25.6e9 + 1, 16, 0.2) == 3
    assert mem.devices_needed(80e9, 80, 0.0) == 1  # no reserve: the whole device
    assert mem.devices_needed(1, 16, 0.2) == 1
    # the tool's own numbers: 70B nf4+dq (36.1 GB) fits an H100 (64 GB usable), int8 (74.4 GB) does not
    assert mem.devices_needed(_row("nf4+dq").total_bytes, 80, 0.2) == 1
    assert mem.devices_needed(_row("int8").total_bytes, 80, 0.2) == 2
    assert mem.devices_needed(_row("fp32").total_bytes, 16, 0.2) == math.ceil(280 / 12.8) == 22


@pytest.mark.parametrize("reserve", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_reserve_range(reserve):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mem.check_reserve(reserve)


def test_kv_cache_llama_70b_shape():
    # 2 (K, V) x 80 layers x 8 KV heads x 128 head dim x 8192 tokens x 2 bytes (bf16) = 2.68 GB
    kv = mem.KVCache(layers=80, kv_heads=8, head_dim=128, context=8192)
    assert kv.nbytes == 2 * 80 * 8 * 128 * 8192 * 2 == 2_684_354_560
    assert mem.KVCache(80, 8, 128, 8192, batch=4, dtype="fp8").nbytes == 2 * 80 * 8 * 128 * 8192 * 4
    assert mem.KVCache(80, 8, 128, 8192, dtype="fp32").nbytes == 2 * kv.nbytes
    row = _row("nf4+dq", kv=kv)
    assert row.kv_bytes == kv.nbytes and row.total_bytes == row.weight_bytes + kv.nbytes


def test_kv_cache_refuses_nonsense():
    with pytest.raises(ValueError, match="context >= 1"):
        mem.KVCache(80, 8, 128, 0)
    with pytest.raises(ValueError, match="dtype 'int4'"):
        mem.KVCache(80, 8, 128, 8192, dtype="int4")


def test_kv_shape_from_config():
    gqa = SimpleNamespace(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192)
    assert mem.kv_shape(gqa) == (80, 8, 128)  # head_dim = hidden_size / attention heads
    mha = SimpleNamespace(num_hidden_layers=12, num_attention_heads=12, hidden_size=768)
    assert mem.kv_shape(mha) == (12, 12, 64)  # no num_key_value_heads: every head has its K, V
    explicit = SimpleNamespace(num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                               hidden_size=2304, head_dim=256)
    assert mem.kv_shape(explicit) == (26, 4, 256)
    assert mem.kv_shape(SimpleNamespace(text_config=gqa)) == (80, 8, 128)
    with pytest.raises(ValueError, match="give --layers, --kv-heads and --head-dim"):
        mem.kv_shape(SimpleNamespace(n_layer=12))


def test_every_device_has_a_native_row():
    for a in mem.ACCELERATORS + mem.APPLE:
        assert set(mem.NATIVE[a.generation]) == set(mem.FEATURES), a.name
    assert {a.name for a in mem.ACCELERATORS} == {"T4", "L4", "A100 40GB", "A100 80GB", "L40S", "H100", "H200",
                                                  "B200", "MI300X"}
    assert set(mem.FORMAT_PATH) == {name for name, _ in mem.FORMATS}
    assert all(path is None or path in mem.FEATURES for path in mem.FORMAT_PATH.values())
    assert all(gen in mem.NATIVE and f in mem.FEATURES for gen, f in mem.CAVEATS)


def test_native_paths_by_generation():
    by_name = {a.name: a for a in mem.ACCELERATORS + mem.APPLE}
    # docs/hardware.md#native-element-types
    assert not mem.native("bf16", by_name["T4"]) and mem.native("int8", by_name["T4"])
    assert mem.native("bf16", by_name["A100 80GB"]) and not mem.native("fp8", by_name["A100 80GB"])
    assert mem.native("fp8", by_name["L4"]) and mem.native("fp8", by_name["H100"])
    assert not mem.native("nvfp4", by_name["H200"]) and not mem.native("mxfp4", by_name["MI300X"])
    assert mem.native("nvfp4", by_name["B200"]) and mem.native("mxfp4", by_name["B200"])
    for software in ("nf4", "nf4+dq", "q4_0", "q4_k", "int2"):
        assert not any(mem.native(software, a) for a in by_name.values())
    assert all(mem.native("fp32", a) for a in by_name.values())
    assert not mem.native("bf16", by_name["M3 Max"])  # unconfirmed is not marked native


def test_bf16_is_a_measured_plain_cast():
    assert mem.bits_per_weight("bf16") == 16.0  # the registered bf16 format: 2 bytes per weight, no scales
