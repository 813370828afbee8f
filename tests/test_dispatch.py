"""Fast paths are chosen in one place: LOWBIT_KERNELS, an explicit choice over it, one refusal of a name."""

import pytest

from lowbit import dispatch, kernels


@pytest.mark.skipif(kernels.native is None, reason="the C library did not build")
def test_dispatch_chooses_in_one_place(monkeypatch):
    assert dispatch.lookup("quantize", "int") is not None
    with dispatch.use("reference"):
        assert dispatch.lookup("quantize", "int") is None and not kernels.enabled()
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    assert dispatch.lookup("dequantize", "codebook") is None
    with dispatch.use("native"):  # an explicit argument wins over the environment
        assert dispatch.lookup("dequantize", "codebook") is not None
    with pytest.raises(ValueError, match="native, reference"):
        dispatch.check_preference("fast")
