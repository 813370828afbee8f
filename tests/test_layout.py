"""tests/ mirrors src/lowbit/ (issue 26, deliverable 6): the tests of ``lowbit/<package>/<module>.py`` are in
``tests/<package>/test_<module>.py``. Files beside those (conftest.py, helpers, golden data, cross-cutting tests
such as test_cli.py or test_properties.py) are allowed; a module without its file is not, unless it is listed
below. Both lists only shrink: a module that gets its file must leave them (the last test says so).

Print the modules without a mirror file:

    .venv/bin/python tests/test_layout.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC, TESTS = ROOT / "src" / "lowbit", ROOT / "tests"

# Modules without logic: nothing of their own to test.
WITHOUT_LOGIC = {
    "errors.py",  # the exception classes, no code
    "scaling/dq_layout.py",  # one constant
}

# Modules with logic and no mirror file yet, each with where its tests are today ("none": not tested at all).
# Move them into the mirror file (or write them) and take the module off this list.
NOT_MIRRORED = {
    "_lazy.py": "test_fast_start.py (no torch for a sibling's sake), through every package's lazy names",
    "commands/export_cmd.py": "commands/test_export_import_cmds.py",
    "commands/import_cmd.py": "commands/test_export_import_cmds.py",
    "commands/outliers_cmd.py": "eval/test_outliers.py, test_limits.py, commands/test_plot_cmd.py",
    "commands/quantize_cmd.py": "commands/test_model_cmds.py, commands/test_budget_cmd.py, commands/test_awq_cmd.py",
    "commands/report_cmd.py": "report/test_html.py, test_fast_start.py",
    "commands/sensitivity_cmd.py": "planning/test_sensitivity.py, commands/test_budget_cmd.py",
    "eval/cache_header.py": "eval/test_cache.py (the damaged files; eval/helpers.py reads headers with it)",
    "evaluate.py": "workflows/test_run.py, layers/test_surgery.py, eval/test_causal.py (materialize)",
    "files/outputs.py": "commands/test_outputs_safety.py",
    "formats/catalog.py": "the tests over every format (formats/test_facts.py, test_levels.py, test_one_value.py)",
    "formats/learned.py": "scaling/test_codebook_fit.py",
    "formats/probe.py": "formats/test_facts.py",
    "formats/rounding.py": "formats/test_floats.py, scaling/test_codebook_fit.py",
    "formats/ternary.py": "formats/test_codebooks.py, formats/test_levels.py, the tests over every format",
    "json_file.py": "planning/test_plan.py, commands/test_plan_cmd.py (a plan file that is not JSON)",
    "kernels/library.py": "kernels/test_linear.py, kernels/test_paths.py (through the kernels it loads)",
    "kernels/llama_step.py": "test_generation.py",
    "layers/keep_dtype.py": "io/test_model_io.py, commands/test_hardening.py (through save_quantized and --keep-dtype)",
    "methods/awq_method.py": "methods/test_awq.py, methods/test_registry.py",
    "methods/codebook_method.py": "methods/test_codebook_refit.py, methods/test_registry.py",
    "methods/gptq_method.py": "methods/test_gptq.py, methods/test_registry.py",
    "methods/gptq_model.py": "methods/test_gptq.py, methods/test_calibrated.py, methods/test_hadamard.py",
    "pipeline.py": "test_quantize.py and every test that quantizes (no test of its own steps)",
    "progress.py": "none",
    "report/bits.py": "commands/test_bits_cmd.py",
    "report/layers.py": "commands/test_budget_cmd.py, planning/test_sensitivity.py (the printed tables)",
    "report/outliers.py": "commands/test_fast_commands_golden.py (the printed tables)",
    "report/table.py": "commands/test_hardening.py, commands/test_fast_commands_golden.py",
    "scaling/blocks.py": "test_quantize.py and every test that quantizes",
    "tensor.py": "test_quantize.py and every test that quantizes",
    "workflows/qat.py": "commands/test_qat_cmd.py, commands/test_outputs_safety.py",
}


def modules() -> list[str]:
    """src/lowbit's modules, relative to it, package __init__ files left out (they re-export)."""
    return sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py")


def mirror(module: str) -> Path:
    path = Path(module)
    return TESTS / path.parent / f"test_{path.name}"


def unmirrored() -> list[str]:
    return [m for m in modules() if not mirror(m).exists()]


def test_every_module_has_its_mirror_test_file():
    assert [m for m in unmirrored() if m not in WITHOUT_LOGIC | NOT_MIRRORED.keys()] == []


def test_the_lists_only_name_modules_still_without_a_mirror():
    """A module that got its file, or that is gone, leaves the lists: they show the gap as it is."""
    missing = set(unmirrored())
    assert sorted((WITHOUT_LOGIC | NOT_MIRRORED.keys()) - missing) == []


if __name__ == "__main__":
    for module in unmirrored():
        print(module, "->", mirror(module).relative_to(ROOT), f"({NOT_MIRRORED.get(module, 'without logic')})"
              if module in WITHOUT_LOGIC | NOT_MIRRORED.keys() else "(not listed)")
