import pytest
import torch

from lowbit.scaling.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000])
def test_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_first_element_in_high_bits():
    # bitsandbytes order: first element in the HIGH nibble (docs/formats.md#packing-of-codes)
    assert pack_codes(torch.tensor([0x1, 0xA]), 4).tolist() == [0x1A]
    assert pack_codes(torch.tensor([0x1]), 4, pad_code=7).tolist() == [0x17]
    assert pack_codes(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]
    # 3-bit: 8 codes -> 3 bytes, MSB first: 001 010 011 100 101 110 111 000
    assert pack_codes(torch.arange(1, 9) % 8, 3).tolist() == [0b00101001, 0b11001011, 0b10111000]
