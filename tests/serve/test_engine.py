"""The decoding engine on every tiny architecture: sequences of different lengths arriving at different steps,
joined into one running batch (left-padded, masked), leaving it as they finish — each gets the tokens
``lowbit generate`` gives it alone; a seeded sampled sequence likewise."""

import pytest
import torch

from lowbit.generation import generate
from lowbit.io.loader import load
from lowbit.serve.adapters import AdapterBank
from lowbit.serve.engine import Engine, Params, Sequence

from tiny import ARCHITECTURES, HYBRID_ARCHITECTURES, save_tiny, tiny_tokenizer

PROMPTS = ["hello how are you today", "what", "the capital of france is paris and the capital of", "below is an"]


class _Collect:
    def __init__(self):
        self.text, self.finish = "", None

    def __call__(self, kind, payload):
        if kind == "delta":
            self.text += payload
        else:
            self.finish = payload


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_joined_batches_decode_as_each_sequence_alone(arch, tmp_path):
    save_tiny(tmp_path, arch)
    tok = tiny_tokenizer()
    net = load(tmp_path, compute_dtype=torch.float32)
    engine = Engine(net, AdapterBank(net, str(tmp_path)), max_batch=8, pad_id=0)
    net.eval()
    stops = [tok.eos_token_id]
    sampled = Params(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    plans = [(p, Params(max_tokens=6 + 2 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)] + \
        [(PROMPTS[0], sampled)]
    seqs, sinks = [], []
    for prompt, params in plans:
        sinks.append(_Collect())
        seqs.append(Sequence(tok(prompt)["input_ids"], None, params, tok, stops, sinks[-1]))
    with torch.inference_mode():
        engine.submit(seqs[:2])
        engine._step()  # two rows running
        engine.submit(seqs[2:4])  # a longer and a shorter prompt join them a step later
        engine._step()
        if arch in ("llama", "gpt2", "qwen3_moe"):  # plain key/value caches: one batch of four
            assert len(engine.batches) == 1 and engine.rows == 4
        if arch in HYBRID_ARCHITECTURES:  # recurrent state: a batch per sequence, never padded
            assert not engine.paddable and len(engine.batches) == engine.rows == 4
        engine._step()
        engine.submit(seqs[4:])
        while engine.batches or engine.waiting:
            engine._step()
    for (prompt, params), sink in zip(plans, sinks):
        want = generate(net, tok, prompt, params.max_tokens, params.temperature, params.top_p, chat=False,
                        seed=params.seed, stop_ids=stops)
        assert sink.text == want, (arch, prompt)
        assert sink.finish in ("stop", "length")
