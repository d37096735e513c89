"""GPTQ-style rounding on the round-to-nearest NF4 grid: lower layer-output error on held-out inputs than
round-to-nearest, the same constants (only codes change), and bitsandbytes dequantizes it to the same floats."""

import pytest
import torch

import lowbit
from lowbit.quant.gptq import gptq_quantize, second_moment


def _inputs(n, d, seed):
    """Correlated inputs with a decaying spectrum and a few loud channels, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) * torch.logspace(0, -2, d)[:, None]
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("shape,blocksize", [((96, 256), 64), ((64, 192), 64), ((33, 128), 128)])
def test_gptq_lowers_output_error_on_held_out_inputs(shape, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    cal, held = _inputs(2048, shape[1], 2), _inputs(1024, shape[1], 3)
    rtn = lowbit.quantize(w, "nf4", blocksize, double_quant=True)
    gq = gptq_quantize(w, second_moment(cal), "nf4", blocksize, double_quant=True)

    def err(q):
        return ((held @ (w - q.dequantize(torch.float32)).T).norm() / (held @ w.T).norm()).item()

    assert err(gq) < 0.8 * err(rtn), (err(gq), err(rtn))
    assert torch.equal(gq.absmax, rtn.absmax) and torch.equal(gq.nested_absmax, rtn.nested_absmax)
    assert gq.nested_offset == rtn.nested_offset and not torch.equal(gq.packed, rtn.packed)


def test_gptq_checkpoint_is_plain_bitsandbytes(bnbF):
    from bitsandbytes.functional import QuantState

    w = torch.randn(64, 256) * 0.05
    q = gptq_quantize(w, second_moment(_inputs(512, 256, 4)))
    sd = q.state_dict("weight")
    state = QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(sd["weight"], state), q.dequantize(torch.float32))
    back = lowbit.QuantizedTensor.from_state_dict(sd, "weight")
    assert torch.equal(back.dequantize(torch.float32), q.dequantize(torch.float32))


def test_without_correlations_each_weight_takes_the_nearest_code_of_the_stored_grid():
    """Uncorrelated inputs of equal scale leave nothing to compensate with: every weight takes the code nearest on
    the grid as stored (double-quantized scales), so no weight ends farther from its value than round-to-nearest
    puts it (which picks codes against the scales before double quantization)."""
    w = torch.randn(32, 128) * 0.05
    rtn = lowbit.quantize(w, "nf4", 64)
    gq = gptq_quantize(w, torch.eye(128, dtype=torch.float64), damp=0.0)
    mine, theirs = (gq.dequantize(torch.float32) - w).abs(), (rtn.dequantize(torch.float32) - w).abs()
    assert bool((mine <= theirs + 1e-7).all()) and mine.sum() < theirs.sum()
