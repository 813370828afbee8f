import json

import pytest

from lowbit import memory as mem
from lowbit.cli import main


def _lines(out: str) -> dict[str, str]:
    """Table rows by their first cell."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 2 and cells[0]:
            rows.setdefault(cells[0], line)
    return rows


def test_70b_tables(capsys):
    assert main(["memory", "--params", "70B"]) == 0
    out = capsys.readouterr().out
    assert "weight memory in decimal GB (1 GB = 1e9 bytes)" in out
    assert "70,000,000,000 parameters (--params 70B)" in out
    assert max(len(line) for line in out.splitlines()) <= 140
    rows = _lines(out)
    assert "4.127" in rows["nf4+dq"] and "36.1" in rows["nf4+dq"]
    assert "280.0" in rows["fp32"] and "fp8_e4m3fn" in rows["fp8"]
    flat = " ".join(out.split())  # captions wrap
    assert "20% of memory held back for activations + KV cache" in flat
    assert "nf4, nf4+dq, q4_0, q4_k, int2 have no hardware path" in flat
    for name in ("T4", "L4", "A100 40GB", "A100 80GB", "L40S", "H100", "H200", "B200", "MI300X"):
        assert name in rows  # the hardware table has a row for every device
    assert "M3 Max" not in out


def test_json_numbers(tmp_path, capsys):
    path = tmp_path / "m.json"
    assert main(["memory", "--params", "70B", "--json", str(path)]) == 0
    got = json.loads(path.read_text())
    assert got["params"] == 70_000_000_000 and got["reserve"] == 0.2 and got["kv_cache"] is None
    rows = {r["format"]: r for r in got["formats"]}
    assert rows["nf4+dq"]["weight_bytes"] / 1e9 == pytest.approx(36.1, abs=0.05)
    # H100: 64 GB usable; nf4+dq fits, bf16 (140 GB) needs 3, and int8 runs on its tensor cores
    assert rows["nf4+dq"]["devices_needed"]["H100"] == 1
    assert rows["bf16"]["devices_needed"]["H100"] == 3
    assert rows["int8"]["native"]["H100"] and not rows["nf4+dq"]["native"]["H100"]
    assert rows["nvfp4"]["native"]["B200"] and not rows["nvfp4"]["native"]["H200"]
    assert {a["name"] for a in got["accelerators"]} == {a.name for a in mem.ACCELERATORS}
    assert f"wrote {path}" in capsys.readouterr().out


def test_kv_cache_and_apple(tmp_path, capsys):
    path = tmp_path / "kv.json"
    assert main(["memory", "--params", "70B", "--context", "8192", "--batch", "1", "--layers", "80",
                 "--kv-heads", "8", "--head-dim", "128", "--apple", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # captions wrap
    assert "2,684,354,560 bytes" in flat  # 2 x 80 x 8 x 128 x 8192 x 2
    assert "the weights + KV cache, 20% of memory held back for activations" in flat
    assert "activations + KV cache" not in out  # the KV cache is in the total, not in the reserve
    assert "M3 Max" in out and "M2 Ultra" in out
    assert max(len(line) for line in out.splitlines()) <= 140
    got = json.loads(path.read_text())
    assert got["kv_cache"]["bytes"] == 2_684_354_560
    nf4dq = next(r for r in got["formats"] if r["format"] == "nf4+dq")
    assert nf4dq["total_bytes"] == nf4dq["weight_bytes"] + 2_684_354_560
    # 38.8 GB against 40 x 0.8 = 32 GB: an A100 40GB no longer holds it, a L40S (38.4 GB) neither
    assert nf4dq["devices_needed"]["A100 40GB"] == 2 and nf4dq["devices_needed"]["L40S"] == 2


def test_reserve_changes_the_fit(tmp_path):
    path = tmp_path / "r.json"
    # 70B nf4+dq is 36.1 GB: it fits a 48 GB L40S with 20% held back (38.4 GB) but not with 30% (33.6 GB)
    assert main(["memory", "--params", "70B", "--reserve", "0.3", "--json", str(path)]) == 0
    nf4dq = next(r for r in json.loads(path.read_text())["formats"] if r["format"] == "nf4+dq")
    assert nf4dq["devices_needed"]["L40S"] == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--params", "0"], "'0' is not a parameter count"),
    (["--params=-70B"], "'-70B' is not a parameter count"),
    (["--params", "70Q"], "give a positive number such as 70B, 7b, 1.5B, 350M, 1.2T, 8e9"),
    (["--params", ""], "'' is not a parameter count"),
    (["--params", "nan"], "'nan' is not a parameter count"),
    (["--params", "inf"], "'inf' is not a parameter count"),
    ([], "give the model as --params N"),
    (["--params", "7B", "--model", "x"], "one of the two"),
    (["--params", "7B", "--reserve", "1"], "in [0, 1)"),
    (["--params", "7B", "--reserve", "-0.1"], "in [0, 1)"),
    (["--params", "7B", "--context", "8192"], "give --layers, --kv-heads, --head-dim"),
    (["--params", "7B", "--context", "8192", "--layers", "32"], "give --kv-heads, --head-dim"),
    (["--params", "7B", "--layers", "32"], "give --context too"),
    (["--params", "7B", "--json", "/dev/null"], "not a regular file"),  # write_json would replace the device
    (["--params", "7B", "--context", "0", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"],
     "--context: must be a whole number from 1 to 16,777,216"),
    (["--params", "7B", "--context", "8", "--batch", "0", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"],
     "--batch: must be a whole number from 1 to 1,048,576"),
    # issue 25 finding 19: 1e30 printed 1,000,000,000,000,000,019,884,624,838,656 parameters (float noise)
    (["--params", "1e30"], "'1e30' is not a parameter count from 1 to 1,000,000,000,000,000"),
    (["--params", "1e999999999"], "'1e999999999' is not a parameter count from 1 to"),
    (["--params", "1.0000000000000001e9"], "not a whole number of parameters"),  # float() rounds it to 1e9
    (["--params", "7B", "--context", "99999999999999999999", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"],
     "--context: must be a whole number from 1 to 16,777,216"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    try:
        code = main(["memory", *argv])
    except SystemExit as e:  # a range argparse checks as it reads the flag (lowbit.limits)
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("lowbit memory: error: ") and err.strip().count("\n") == 0
    assert message in err and "Traceback" not in err
    assert captured.out == ""


def test_model_counts_every_parameter(tiny_lm_dir, tmp_path, capsys):
    from lowbit import load_model

    model = load_model(str(tiny_lm_dir))[0]
    total = sum(p.numel() for p in model.parameters())
    path = tmp_path / "tiny.json"
    assert main(["memory", "--model", str(tiny_lm_dir), "--context", "1024", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    # counted from the safetensors headers (a tied lm_head is stored once), equal to the loaded parameters
    assert f"{total:,} parameters (every float tensor stored in 1 safetensors file" in flat
    assert "nothing loaded" in flat
    got = json.loads(path.read_text())
    assert got["params"] == total
    # the tiny Llama: 2 layers, 2 KV heads, head dim 64 / 4 = 16, from its config
    assert got["kv_cache"]["bytes"] == 2 * 2 * 2 * 16 * 1024 * 2
    assert got["kv_cache"]["layers"] == 2 and got["kv_cache"]["kv_heads"] == 2 and got["kv_cache"]["head_dim"] == 16
    fp32 = next(r for r in got["formats"] if r["format"] == "fp32")
    assert fp32["weight_bytes"] == 4 * total


def test_model_config_without_attention_shape(tiny_lm_dir, capsys, monkeypatch):
    from lowbit.commands import memory_cmd

    real = memory_cmd._count_model
    monkeypatch.setattr(memory_cmd, "_count_model", lambda spec, con: (*real(spec, con)[:2], object()))
    assert main(["memory", "--model", str(tiny_lm_dir), "--context", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "loading" note
    assert err.startswith("lowbit memory: error: ") and "give --layers, --kv-heads and --head-dim" in err
    # the flags stand in for the config
    assert main(["memory", "--model", str(tiny_lm_dir), "--context", "8", "--layers", "1", "--kv-heads", "1",
                 "--head-dim", "1"]) == 0
    assert "2 (K, V) x 1 layers x 1 KV heads x 1 head dim x 8 tokens" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("text", "count"), [("1e15", 10**15), ("0.001T", 10**9), ("123456789012345", 123456789012345),
                                             ("1.5B", 1_500_000_000)])
def test_counts_are_read_exactly(text, count, capsys):
    assert main(["memory", "--params", text]) == 0
    assert f"{count:,} parameters (--params {text})" in " ".join(capsys.readouterr().out.split())
