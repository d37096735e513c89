"""Compiled decoder layers (nn/compiled_layers.py) and what they are made of: the 4-bit matmul as one custom operator,
causal attention with a matmul backward, the compiled chunked loss — each against the eager path it replaces."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.nn.causal_attention import MAX_SCORES, causal_attention, suits
from lowbit.nn.compiled_layers import compile_layers, compiler_missing, is_compiled
from lowbit.nn.cross_entropy import chunked_token_logps
from lowbit.nn.linear import Linear4bit
from lowbit.nn.matmul4bit_op import matmul_4bit
from lowbit.quant.spec import QuantSpec

pytestmark = pytest.mark.skipif(compiler_missing("cpu") is not None, reason="torch.compile needs a C++ compiler")


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("nf3", True), ("int2", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_4bit_operator_equals_the_eager_layer(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 96), QuantSpec(quant_type, 64, double_quant))
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 96, dtype=dtype)
    want = layer(x.to(dtype))
    (gx_want,) = torch.autograd.grad(want, x, g)

    def through_operator(t):
        return matmul_4bit(t.to(dtype), layer, dtype) + layer.bias.to(dtype)

    got = through_operator(x)  # the operator itself: the same arithmetic, bit for bit
    assert torch.equal(got, want) and torch.equal(torch.autograd.grad(got, x, g)[0], gx_want)
    got = torch.compile(layer, fullgraph=True)(x.to(dtype))  # fullgraph: the layer does not break a graph
    # the compiler adds the bias inside the product's rounding: equal in float32, within an ulp in bfloat16
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1.6e-2 if bf16 else 0, atol=1e-3 if bf16 else 0)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], gx_want)


def test_causal_attention_matches_sdpa_with_grouped_heads():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16).requires_grad_() for h in (6, 2, 2))
    g = torch.randn(2, 6, 40, 16)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True, scale=0.3)
    ref_grads = torch.autograd.grad(ref, exact, g.double())
    flash = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
    got = causal_attention(q, k, v, 0.3)
    assert torch.equal(got, flash)  # the forward is the flash kernel's
    # the backward: as close to the float64 gradients as the flash kernel's backward is
    for ours, theirs, exact_g in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(flash, (q, k, v), g),
                                     ref_grads):
        assert (ours.double() - exact_g).abs().max() <= 2 * (theirs.double() - exact_g).abs().max() + 1e-6
    assert suits(q, k, 0.0) and not suits(q, k, 0.1)
    long = torch.empty(1, 1, int(MAX_SCORES ** 0.5) + 1, 8)  # more scores than allowed: the flash backward
    assert not suits(long, long, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunked_loss_equals_eager(dtype):
    torch.manual_seed(0)
    h = torch.randn(37, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(300, 32, dtype=dtype)
    labels = torch.randint(0, 300, (37,))
    g = torch.randn(37)
    out = [chunked_token_logps(h, w, labels, chunk_tokens=16, compiled=c) for c in (False, True)]  # ragged chunk
    grads = [torch.autograd.grad(o, h, g)[0] for o in out]
    want = torch.log_softmax(h.float() @ w.float().t(), -1).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(out[1], out[0], atol=1e-5)
    assert torch.allclose(out[1], want, atol=1e-4 if dtype == torch.float32 else 0.1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grads[1].float(), grads[0].float(), atol=tol), (grads[1] - grads[0]).abs().max()


def _tiny(tmp_path, checkpointing: bool):
    """A tiny 4-bit LLaMA with random LoRA, prepared as training prepares it (document attention, checkpointing)."""
    from lowbit.io.loader import load
    from lowbit.nn.document_attention import NAME
    from lowbit.nn.lora import add_lora
    from lowbit.training.config import TrainConfig
    from lowbit.training.model import prepare_model

    from tiny import randomize_lora, save_tiny

    if not (tmp_path / "config.json").exists():
        save_tiny(tmp_path, "llama")
    torch.manual_seed(0)
    m = load(tmp_path, QuantSpec(), compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    randomize_lora(m)
    prepare_model(TrainConfig(gradient_checkpointing=checkpointing, compile=False), m, 0, print)
    assert m.config._attn_implementation == NAME
    return m.train()


def _ran_operator(fn) -> bool:
    from tiny import runs_compiled_layers

    return runs_compiled_layers(fn)[1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_like_eager_layers(tmp_path, checkpointing):
    from lowbit.training.loss import lm_loss

    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 24))
    plain = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    packed = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.tensor([[*range(10), *range(14)]] * 2)}
    for batch in (plain, packed):
        results = []
        for compiled in (False, True):
            m = _tiny(tmp_path, checkpointing)
            if compiled:
                assert compile_layers(m) == 2 and is_compiled(m.get_output_embeddings())
            params = [p for p in m.parameters() if p.requires_grad]
            out = {}
            assert _ran_operator(lambda: out.update(loss=lm_loss(m, batch)[0])) == compiled
            results.append((out["loss"].item(), torch.autograd.grad(out["loss"], params)))
        (l0, g0), (l1, g1) = results
        assert l1 == pytest.approx(l0, rel=1e-5)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (a - b).abs().max()
    with torch.no_grad():  # evaluation and sampling stay eager
        assert not _ran_operator(lambda: m(ids))
        assert not _ran_operator(lambda: m.generate(ids[:1, :4], max_new_tokens=2, do_sample=False))


def test_compile_key_chooses_and_reports(tmp_path, monkeypatch):
    from lowbit.errors import LowbitError
    from lowbit.training.config import TrainConfig, apply_overrides
    from lowbit.training.model import apply_compile

    m = _tiny(tmp_path, False)
    lines = []
    apply_compile(TrainConfig(compile="auto"), m, 10**6, lines.append)  # a small model: auto leaves it eager
    assert not any(is_compiled(x) for x in m.modules()) and not lines
    monkeypatch.setattr("shutil.which", lambda name: None)
    apply_compile(TrainConfig(compile=True), m, 10**6, lines.append)
    assert lines == ["compile: no C++ compiler (g++ or clang++) was found, so the layers run uncompiled"]
    monkeypatch.undo()
    apply_compile(TrainConfig(compile=True), m, 10**6, lines.append)
    assert lines[-1].startswith("compile: 2 decoder layers through torch.compile") and is_compiled(m.model.layers[0])
    assert apply_overrides(TrainConfig(), {"torch_compile": False}).compile is False
    assert apply_overrides(TrainConfig(), {"torch_compile": "auto"}).compile == "auto"
    assert apply_overrides(TrainConfig(), {"compile": "true"}, from_string=True).compile is True
    with pytest.raises(LowbitError, match="config: compile must be one of false, true, auto, got 'sometimes'"):
        apply_overrides(TrainConfig(), {"compile": "sometimes"}).validate()


@pytest.mark.parametrize("arch,why", [("granitemoehybrid", "state-space or convolution mixers"),
                                      ("mixtral", "mixture-of-experts layers"), ("llama", None)])
def test_only_attention_and_dense_layers_are_compiled(tmp_path, arch, why):
    from lowbit.io.loader import load
    from lowbit.nn.compiled_layers import not_compiled_because
    from lowbit.training.config import TrainConfig
    from lowbit.training.model import apply_compile

    from tiny import save_tiny

    save_tiny(tmp_path, arch)
    m = load(tmp_path, QuantSpec(), compute_dtype=torch.float32)
    reason = not_compiled_because(m)
    assert (reason is None) if why is None else (why in reason)
    lines = []
    apply_compile(TrainConfig(compile=True), m, 10**9, lines.append)
    assert lines[-1] == (f"compile: {reason}, so the layers run uncompiled" if why else
                         "compile: 2 decoder layers through torch.compile (built in the first steps, cached for later "
                         "runs)")


def test_a_short_last_batch_compiles_nothing_new(tmp_path):
    """Rows and length turn symbolic together at the first change of shape: the short last batch of an epoch (fewer
    rows) reuses the graphs the second shape built, and trains as the eager layers do."""
    from torch._dynamo.utils import counters

    from lowbit.training.loss import lm_loss

    torch._dynamo.reset()
    m, ref = _tiny(tmp_path, True), _tiny(tmp_path, True)
    compile_layers(m)
    graphs = []
    for shape in [(3, 20), (3, 24), (2, 28)]:
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(shape[1]))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        loss, ran = _ran_loss(m, batch)
        graphs.append(counters["stats"]["unique_graphs"])
    assert ran and graphs[2] == graphs[1] > graphs[0], graphs
    assert loss == pytest.approx(lm_loss(ref, batch)[0].item(), rel=1e-5)


def _ran_loss(m, batch):
    from lowbit.training.loss import lm_loss

    from tiny import runs_compiled_layers

    loss, ran = runs_compiled_layers(lambda: lm_loss(m, batch)[0])
    loss.backward()
    return loss.item(), ran
