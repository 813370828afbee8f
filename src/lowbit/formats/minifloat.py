"""Minifloat formats ExMy (SPEC.md §3): fp4_e2m1, fp4_e3m0, fp4_e1m2, fp4_e0m3, fp8_e4m3fn, fp8_e5m2."""
