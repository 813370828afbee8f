"""lowbit.methods: what changes a model or its weights beyond rounding each weight to the nearest level (AWQ scales,
Hadamard rotation, GPTQ, codebook refit, LSQ training), each fed by the calibration engine (lowbit.calibration)."""
