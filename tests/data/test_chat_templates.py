"""Named chat templates: each renders conversations incrementally (what finding the learned turns needs), puts system
messages where its family does, and ends answers the way the family's tokenizer learns them."""

import pytest

from lowbit.data.chat_templates import FORMATS, check_chat_template, resolve_chat_template
from lowbit.errors import LowbitError

from tiny import CHATML, tiny_tokenizer

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _render(tok, name, msgs, **kw):
    return tok.apply_chat_template(msgs, tokenize=False, chat_template=resolve_chat_template(name), **kw)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_renders_incrementally(tok, name):
    prev = ""
    for i in range(1, len(CONVERSATION) + 1):
        text = _render(tok, name, CONVERSATION[:i])
        assert text.startswith(prev), (name, i)
        if CONVERSATION[i - 1]["role"] == "assistant":  # the generation prompt is what precedes an answer
            head = _render(tok, name, CONVERSATION[: i - 1], add_generation_prompt=True)
            assert text.startswith(head) and CONVERSATION[i - 1]["content"] in text[len(head):], name
        prev = text
    assert "be brief" in prev and "see you" in prev


def test_chatml_is_the_chatml_format(tok):
    assert _render(tok, "chatml", CONVERSATION) == tok.apply_chat_template(CONVERSATION, tokenize=False,
                                                                           chat_template=CHATML)


@pytest.mark.parametrize("name,expected", [
    ("llama3", "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
               "\n\nhello<|eot_id|>"),
    ("gemma3", "<|im_start|><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\nhello"
               "<end_of_turn>\n"),
    ("mistral_v2v3", "<|im_start|>[INST] be brief\n\nhi[/INST] hello<|im_end|>"),
    ("mistral_v7_tekken", "<|im_start|>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]hi[/INST]hello<|im_end|>"),
    ("phi_3", "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"),
    ("cohere", "<|im_start|><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>be brief<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
               "hello<|END_OF_TURN_TOKEN|>"),
    ("deepseek_v3", "<|im_start|>be brief<｜User｜>hi<｜Assistant｜>hello<|im_end|>"),
])
def test_family_formats(tok, name, expected):
    assert _render(tok, name, CONVERSATION[:3]) == expected


def test_defaults_and_thinking(tok):
    assert _render(tok, "qwen_25", [{"role": "user", "content": "hi"}]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    prompt = _render(tok, "qwen3", [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                     enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    reasoned = _render(tok, "qwen3", [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}])
    assert "<|im_start|>assistant\n<think>\ngreet back\n</think>\n\nhello<|im_end|>" in reasoned


def test_choices_and_their_errors(tok, tmp_path):
    own = tiny_tokenizer()
    assert resolve_chat_template("tokenizer_default", tokenizer=own) == own.chat_template
    own.chat_template = None
    assert resolve_chat_template("tokenizer_default_fallback_chatml", tokenizer=own) == resolve_chat_template("chatml")
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert resolve_chat_template("jinja", str(f)) == f.read_text()
    assert resolve_chat_template("jinja", "{{ messages[0].content }}") == "{{ messages[0].content }}"
    for choice, jinja, msg in (("llama33", "", "unknown template 'llama33'; .* did you mean 'llama3'"),
                               ("jinja", "", "jinja needs the template in chat_template_jinja"),
                               ("jinja", str(tmp_path / "none.jinja"), "neither a template nor a file")):
        with pytest.raises(LowbitError, match=msg):
            check_chat_template(choice, jinja)
    check_chat_template("qwen2_vl")  # a format for images waits for the tokenizer: a vision model keeps its own
    with pytest.raises(LowbitError, match="a format for images or audio: with a vision-language model"):
        resolve_chat_template("qwen2_vl", tokenizer=tiny_tokenizer())
