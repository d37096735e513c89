"""Code packing (quant/packing.py; tests/data/test_packing.py is sample packing): the documented byte layouts,
round trips, and NF3/NF2 taking 3 and 2 bits of real storage."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.planner.memory import plan
from lowbit.quant import codebooks, nf4
from lowbit.quant.packing import pack_codes, unpack_codes
from lowbit.quant.spec import NESTED_BLOCKSIZE, QUANT_TYPES, packed_bytes


def test_layouts_by_hand():
    # 3 bits: 001 010 011 100 101 110 111 000 = 0010 1001 | 1100 1011 | 1011 1000
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3).tolist() == [0x29, 0xCB, 0xB8]
    assert pack_codes(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b11000110]
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4, pad=7).tolist() == [0x12, 0x37]
    assert pack_codes(torch.tensor([7], dtype=torch.uint8), 3, pad=1).tolist() == [0b11100100, 0b10010010, 0b01001001]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_bytes(n, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("qt", list(QUANT_TYPES))
def test_codebook_size_fits_storage_width(qt):
    assert nf4.code_bits(codebooks.codebook(qt)) == QUANT_TYPES[qt].storage_bits


@pytest.mark.parametrize("qt,bits", [("nf3", 3), ("nf2", 2)])
def test_real_storage_bits(qt, bits):
    w = torch.randn(512, 1024)
    q = lowbit.quantize(w, qt, 64, double_quant=True)
    assert q.packed.numel() == w.numel() * bits // 8
    blocks = w.numel() // 64
    assert q.bits_per_param == pytest.approx(bits + 8 / 64 + 32 * (-(-blocks // NESTED_BLOCKSIZE) + 1) / w.numel())
    assert round(q.bits_per_param, 2) == bits + 0.13
    assert q.info_bits == bits


@pytest.mark.parametrize("qt", ["nf3", "nf2"])
def test_dense_state_dict_round_trip_and_legacy_nibbles(qt):
    w = torch.randn(33, 97)
    q = lowbit.quantize(w, qt, 32)
    sd = q.state_dict("w")
    assert json.loads(bytes(sd[f"w.quant_state.bitsandbytes__{qt}"].tolist()))["code_bits"] == q.info_bits
    q2 = lowbit.QuantizedTensor.from_state_dict(sd, "w")
    assert torch.equal(q2.packed, q.packed) and torch.equal(q2.dequantize(), q.dequantize())
    # a file older lowbit wrote: one code per nibble, no code_bits
    codes = unpack_codes(q.packed, q.info_bits, w.numel())
    old = {**sd, "w": pack_codes(codes, 4).view(-1, 1),
           f"w.quant_state.bitsandbytes__{qt}": torch.tensor(list(json.dumps(
               {k: v for k, v in json.loads(bytes(sd[f"w.quant_state.bitsandbytes__{qt}"].tolist())).items()
                if k != "code_bits"}).encode()), dtype=torch.uint8)}
    q3 = lowbit.QuantizedTensor.from_state_dict(old, "w")
    assert torch.equal(q3.packed, q.packed) and torch.equal(q3.dequantize(), q.dequantize())
    bad = {**sd, f"w.quant_state.bitsandbytes__{qt}": torch.tensor(list(json.dumps(
        {**json.loads(bytes(sd[f"w.quant_state.bitsandbytes__{qt}"].tolist())), "code_bits": 4}).encode()),
        dtype=torch.uint8)}
    with pytest.raises(ValueError, match="code_bits"):
        lowbit.QuantizedTensor.from_state_dict(bad, "w")
    with pytest.raises(ValueError, match="codes do not fit quant_type"):
        lowbit.QuantizedTensor.from_state_dict({**sd, "w.quant_map": codebooks.codebook("nf4")}, "w")


def test_planner_counts_real_bits():
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    n = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    sizes = {qt: plan(cfg, quant_type=qt, device="cpu").items["quantized_weights"] for qt in ("nf4", "nf3", "nf2")}
    assert sizes == {"nf4": n // 2, "nf3": n * 3 // 8, "nf2": n // 4}


@pytest.mark.parametrize("qt", ["nf4", "nf2", "int3", "int2"])
@pytest.mark.parametrize("dq", [True, False])
def test_planner_counts_the_bytes_a_loaded_base_holds(tmp_path, qt, dq):
    """The planner's codes + constants equal what the loaded 4-bit layers hold (INT3 / INT2: with zero points)."""
    from lowbit.io.loader import load
    from lowbit.nn.linear import Linear4bit
    from lowbit.quant.spec import QuantSpec

    from tiny import save_tiny

    save_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    net = load(tmp_path, QuantSpec(qt, 64, dq), compute_dtype=torch.float32)
    held = sum(m.weight.nbytes for m in net.modules() if isinstance(m, Linear4bit))
    items = plan(cfg, quant_type=qt, double_quant=dq, blocksize=64, device="cpu").items
    assert items["quantized_weights"] + items["quant_constants"] == held
