"""Builds lowbit's optional C kernels; all metadata lives in pyproject.toml.

Flags keep float32 arithmetic identical to the PyTorch reference: no -ffast-math, and
-ffp-contract=off so the compiler never fuses a multiply and an add into one FMA.
If the build fails, lowbit installs anyway and uses the pure-PyTorch reference path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lowbit.kernels._ckernels",
            ["src/lowbit/kernels/_ckernels.c", "src/lowbit/kernels/linear.c", "src/lowbit/kernels/llama_step.c"],
            depends=["src/lowbit/kernels/linear.h"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
