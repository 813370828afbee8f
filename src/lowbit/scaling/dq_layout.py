"""The layout of double-quantized scales, as plain numbers (no torch: the format facts and
`lowbit memory` read it; lowbit.scaling.double_quant computes it)."""

DQ_BLOCK = 256  # bitsandbytes quantize_4bit(compress_statistics=True) second-level block
