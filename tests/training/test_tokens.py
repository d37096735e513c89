"""What trains beside LoRA: new tokens' rows (tokens:, special_tokens), modules trained whole (lora_modules_to_save),
unfrozen parameters — saved the way peft loads them (trainable_token_indices, modules_to_save), with the run's
tokenizer beside the adapter."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.adapters import load_adapter, read_adapter
from lowbit.io.loader import load
from lowbit.io.tokenizer import tokenizer_for
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

from tiny import save_tiny_with_tokenizer

F32 = torch.float32


def _data(path, n=32):
    rows = [{"messages": [{"role": "user", "content": f"call the tool {i % 4}"},
                          {"role": "assistant", "content": "<tool> paris <tool>"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model, data, out, **kw):
    base = dict(base_model=str(model), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                micro_batch_size=4, sequence_len=64, max_steps=8, learning_rate=1e-2, warmup_steps=0, eval_steps=8,
                save_steps=4, val_set_size=4, output_dir=str(out), load_in_4bit=False)
    base.update(kw)
    return recipe.train(TrainConfig(**base), progress=False, log=lambda *a: None)


def _logits(net, ids):
    with torch.no_grad():
        return net.eval()(ids).logits.float()


def _peft_logits(model_dir, adapter, ids, vocab):
    """peft on transformers' own (float) model, grown to the adapter's vocabulary as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    base.resize_token_embeddings(vocab, mean_resizing=False)
    return _logits(PeftModel.from_pretrained(base, adapter), ids)


@pytest.mark.parametrize("tied", [True, False])
def test_new_tokens_train_and_round_trip_through_peft(tmp_path, tied):
    model = tmp_path / "model"
    save_tiny_with_tokenizer(model, tie_word_embeddings=tied)
    out = tmp_path / "run"
    res = _train(model, _data(tmp_path / "d.jsonl"), out, tokens=["<tool>"], special_tokens={"pad_token": "<pad>"})
    tok = tokenizer_for(model, out)  # the run's tokenizer, saved beside its adapter
    new = [tok.convert_tokens_to_ids(t) for t in ("<tool>", "<pad>")]
    assert len(tok) == len(tokenizer_for(model)) + 2 and tok.pad_token == "<pad>"
    cfg, tensors, _ = read_adapter(out)
    rows = {"embed_tokens": sorted(new)} if tied else {"embed_tokens": sorted(new), "lm_head": sorted(new)}
    assert cfg["trainable_token_indices"] == rows and cfg["modules_to_save"] is None
    delta = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    trained = res["model"].get_input_embeddings().weight
    assert delta.shape == (2, trained.shape[1]) and torch.equal(trained[sorted(new)].float(), delta)
    ids = torch.tensor([[5, 9, new[0], 17, new[0], 3]])
    want = _logits(res["model"], ids)
    mine = load_adapter(load(model, None, compute_dtype=F32), out)  # grows the vocabulary itself
    assert torch.allclose(_logits(mine, ids), want, atol=1e-5)
    assert torch.allclose(_peft_logits(model, out, ids, len(tok)), want, atol=1e-5)
    # only the new rows moved
    fresh = load(model, None, compute_dtype=F32).get_input_embeddings().weight
    assert torch.equal(mine.get_input_embeddings().weight[: fresh.shape[0]], fresh)


def test_existing_special_token_is_named_not_added(setup, tmp_path):
    _, model, data = setup
    res = _train(model, data, tmp_path / "run", special_tokens={"pad_token": "<|endoftext|>"}, max_steps=2)
    assert len(res["tokenizer"]) == len(tokenizer_for(model)) and res["tokenizer"].pad_token == "<|endoftext|>"
    assert read_adapter(tmp_path / "run")[0]["trainable_token_indices"] is None


def test_modules_to_save_and_unfrozen_parameters_round_trip_through_peft(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "run"
    res = _train(model, data, out, lora_modules_to_save=["embed_tokens", "lm_head"],
                 unfrozen_parameters=[r"layers\.0\.input_layernorm"])
    cfg, tensors, _ = read_adapter(out)
    assert set(cfg["modules_to_save"]) == {"lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"}
    net = res["model"]
    assert net.get_input_embeddings().weight.dtype == F32 and net.get_input_embeddings().weight.requires_grad
    assert net.lm_head.weight is net.get_input_embeddings().weight  # the tie holds: one trained matrix
    base = load(model, None, compute_dtype=F32)
    assert not torch.equal(tensors["base_model.model.model.embed_tokens.weight"], base.get_input_embeddings().weight)
    assert not torch.equal(tensors["base_model.model.model.layers.0.input_layernorm.weight"],
                           base.model.layers[0].input_layernorm.weight)
    ids = torch.randint(4, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    want = _logits(net, ids)
    assert torch.allclose(_logits(load_adapter(base, out), ids), want, atol=1e-5)
    assert torch.allclose(_peft_logits(model, out, ids, len(res["tokenizer"])), want, atol=1e-5)


def test_a_quantized_weight_cannot_be_unfrozen(setup, tmp_path):
    _, model, data = setup
    with pytest.raises(LowbitError, match=r"q_proj\.base\.codes, which belongs to .*q_proj\.base; it is a quantized "
                                          "layer"):
        _train(model, data, tmp_path / "run", load_in_4bit=True, unfrozen_parameters=[r"layers\.0\..*q_proj"])
    with pytest.raises(LowbitError, match="lora_modules_to_save: .*q_proj is a quantized layer"):
        _train(model, data, tmp_path / "run2", load_in_4bit=True, lora_modules_to_save=["q_proj"],
               lora_target_modules=["v_proj"])
    with pytest.raises(LowbitError, match="unfrozen_parameters: 'nothing_here' match no parameter"):
        _train(model, data, tmp_path / "run3", unfrozen_parameters=["nothing_here"])


def test_eot_tokens_are_added_and_stop_generation(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "run"
    _train(model, data, out, chat_template="gemma3", eot_tokens=["<end_of_turn>"], max_steps=2, sequence_len=128)
    tok = tokenizer_for(model, out)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot == len(tokenizer_for(model)) and tok.encode("<end_of_turn>", add_special_tokens=False) == [eot]
    assert "<start_of_turn>" in tok.chat_template  # the template is saved with the tokenizer
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, eot]
    with pytest.raises(LowbitError, match="eot_tokens: '<eot>' does not appear in the chat template"):
        _train(model, data, tmp_path / "bad", chat_template="chatml", eot_tokens=["<eot>"], max_steps=1)
