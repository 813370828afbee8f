"""workflows.run: compare's row for a label is what quantize + eval give for it, to the last digit."""

import pytest

from lowbit.evaluate import compare, evaluate_saved
from lowbit.io import save_quantized
from lowbit.models import load_model
from lowbit.planning import QuantPlan
from lowbit.workflows.run import Calibration, run

# scripts/golden.py's labels, and +awq with an activation-weighted search rounding on its own: the one
# combination whose importance compare once collected before the AWQ fold (and rescaled) where quantize
# collected it after
LABELS = ("nf4", "nf4+dq", "q4_0", "nf4@amse", "int4_asym/64@hqq", "nf4/32+dq+had+gptq@amse",
          "nf4/32+dq+awq+gptq@amse", "lloyd4/32+dq+gptq+cb@amse", "int8_outlier", "nf4/32+dq+awq@amse")
PROTOCOL = {"window": 64, "windows": 1}
CALIBRATE = 2


@pytest.mark.parametrize("label", LABELS)
def test_compare_row_is_quantize_then_eval(label, tiny_lm_dir, tmp_path):
    plan = QuantPlan.uniform(label)
    calibrate = CALIBRATE if plan.needs_calibration else None
    model, tokenizer, info = load_model(str(tiny_lm_dir))
    (row,) = compare(model, tokenizer, info, [plan], calibrate=calibrate, progress=False, **PROTOCOL)["results"]

    model, tokenizer, info = load_model(str(tiny_lm_dir))
    calibration = Calibration(tokenizer, info.kind, window=PROTOCOL["window"], scored=PROTOCOL["windows"],
                              count=calibrate, progress=False)
    report = run(model, plan, calibration, progress=False)
    save_quantized(model, tokenizer, info, report, plan, tmp_path / "q")
    (saved,) = evaluate_saved(tmp_path / "q", progress=False, **PROTOCOL)["results"]

    assert row["format"] == saved["format"] == plan.label
    for key in ("kl_mean", "kl_max", "top1", "ppl", "bits_per_weight", "weight_bytes"):
        assert saved[key] == row[key], key
