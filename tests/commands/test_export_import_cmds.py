"""lowbit export --to bnb and lowbit import: the round trip through the command line, and the
one-line errors that leave nothing written."""

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from .helpers import run_main


def quantize(tiny_lm_dir, out, fmt, capsys):
    r = run_main(capsys, "quantize", "--model", tiny_lm_dir, "--format", fmt, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def packed(directory) -> dict:
    return {k: v for k, v in load_file(directory / "model.safetensors").items() if ".qweight." in k}


def test_export_bnb_then_import_keeps_the_bytes(tiny_lm_dir, tmp_path, capsys):
    q = quantize(tiny_lm_dir, tmp_path / "q", "nf4+dq", capsys)
    r = run_main(capsys, "export", q, "--to", "bnb", "-o", tmp_path / "bnb")
    assert r.returncode == 0, r.stderr
    assert "14 nf4, 1 float linear layers" in r.stdout  # the tied head stays the embedding
    r = run_main(capsys, "import", tmp_path / "bnb", "-o", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert "14 nf4+dq layers" in r.stdout
    ours, back = packed(q), packed(tmp_path / "back")
    assert ours.keys() == back.keys() and all((ours[k] == back[k]).all() for k in ours)
    r = run_main(capsys, "eval", tmp_path / "back", "--windows", "1", "--window", "64")
    assert r.returncode == 0, r.stderr


def gguf_q2k(path):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((256, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("command", "message"), [
    ("export Q4 --to bnb -o OUT", "bitsandbytes' 4-bit layout holds nf4, bnb_fp4; 14 layer(s) cannot be written in it: "
                                  "model.layers.0.self_attn.q_proj (q4_0)"),
    ("export NF4 --to bnb -o NF4", "bnb export writes a new directory"),
    ("export NF4 --to bnb -o /proc/lowbit-out", "cannot write to directory: /proc"),
    ("export NF4 --to gguf -o OUT", "GGUF holds the types"),
    ("import TINY -o OUT", "no bitsandbytes 4-bit quantization_config"),
    ("import Q2K -o OUT", "1 tensor(s) are in others: blk.0.ffn_down.weight (Q2_K)"),
    ("import NOPE.gguf -o OUT", "model path does not exist"),
])
def test_refusals_are_one_line_and_write_nothing(command, message, tiny_lm_dir, tmp_path, capsys):
    paths = {"Q4": quantize(tiny_lm_dir, tmp_path / "q4", "q4_0", capsys) if "Q4 " in command else None,
             "NF4": quantize(tiny_lm_dir, tmp_path / "nf4", "nf4", capsys) if "NF4" in command else None,
             "TINY": tiny_lm_dir, "Q2K": gguf_q2k(tmp_path / "q2k.gguf") if "Q2K" in command else None,
             "NOPE": tmp_path / "nope", "OUT": tmp_path / "out"}
    before = sorted(tmp_path.iterdir())
    args = [str(paths[a]) if a in paths else str(paths[a.split(".")[0]]) + ".gguf" if a.startswith("NOPE") else a
            for a in command.split()]
    r = run_main(capsys, *args)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(f"lowbit {args[0]}: error:") and message in last, r.stderr
    assert sorted(tmp_path.iterdir()) == before
