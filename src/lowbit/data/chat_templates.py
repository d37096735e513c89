"""Named chat templates: the conversation formats model families publish, written here as one table of turn
markers and built into Jinja (what ``tokenizer.chat_template`` holds). Torch-free.

    chat_template: tokenizer_default                 the tokenizer's own template (lowbit's default)
    chat_template: tokenizer_default_fallback_NAME   the tokenizer's own, or NAME when it has none
    chat_template: NAME                              a format of ``FORMATS`` (Axolotl's names)
    chat_template: jinja  +  chat_template_jinja     a template of your own (the text, or a file holding it)

A vision-language model keeps its own template (its processor's: it places the images) whatever format is named.

A format is: whether it starts with the BOS token; for each role the text before and after its content
(``{role}`` stands for the role's name in the format; ``{eos}`` for the tokenizer's EOS token); where a system
message goes (its own turn, or in front of the first user message); an optional default system message; the
generation prompt; and whether contents are stripped of surrounding whitespace. Every template renders a
conversation incrementally (the text of the first k messages is a prefix of the text of k + 1), which is how
``data/formats.py`` finds the turns to learn.

``default_system_message`` puts a system turn in front of conversations that have none; ``chat_template_kwargs``
are passed to the template (``enable_thinking: false`` for the Qwen3 formats: an empty thinking block after the
generation prompt and before every answer without reasoning of its own).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LowbitError

__all__ = ["FORMATS", "ChatFormat", "resolve_chat_template", "build", "check_chat_template"]


@dataclass(frozen=True)
class ChatFormat:
    turn: dict[str, tuple[str, str]]       # role → (before, after) its content; "*" for any other role
    generation: str                        # the generation prompt (what comes before an assistant's answer)
    bos: bool = False                      # starts with the tokenizer's BOS token
    system: str = "turn"                   # "turn": a turn of its own; "first_user": before the first user message
    system_sep: str = "\n\n"               # between a system message and the first user message
    names: dict[str, str] = field(default_factory=dict)  # role → its name in the format ("assistant" → "model")
    default_system: str = ""
    strip: bool = False
    thinking: bool = False                 # Qwen3-style <think> blocks (enable_thinking, reasoning_content)
    generation_no_thinking: str = ""       # appended to the generation prompt when enable_thinking is false


_CHATML = {"*": ("<|im_start|>{role}\n", "<|im_end|>\n")}
_LLAMA3 = {"*": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")}
_GEMMA = {"*": ("<start_of_turn>{role}\n", "<end_of_turn>\n")}
_PHI3 = {"*": ("<|{role}|>\n", "<|end|>\n")}


def _mistral(inst_open: str, inst_close: str, answer_gap: str, system: tuple[str, str] | None = None) -> ChatFormat:
    turn = {"user": (inst_open, inst_close), "assistant": (answer_gap, "{eos}")}
    if system:
        turn["system"] = system
    return ChatFormat(turn, "", bos=True, system="turn" if system else "first_user")


FORMATS: dict[str, ChatFormat] = {
    "chatml": ChatFormat(_CHATML, "<|im_start|>assistant\n"),
    "qwen_25": ChatFormat(_CHATML, "<|im_start|>assistant\n",
                          default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": ChatFormat(_CHATML, "<|im_start|>assistant\n", thinking=True,
                        generation_no_thinking="<think>\n\n</think>\n\n"),
    "qwen3_5": ChatFormat(_CHATML, "<|im_start|>assistant\n", thinking=True,
                          generation_no_thinking="<think>\n\n</think>\n\n"),
    "nemotron_h": ChatFormat(_CHATML, "<|im_start|>assistant\n"),
    "falcon_h1": ChatFormat(_CHATML, "<|im_start|>assistant\n", bos=True),
    "llama3": ChatFormat(_LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=True, strip=True),
    "llama3_2": ChatFormat(_LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=True, strip=True,
                           default_system="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"),
    "llama4": ChatFormat({"*": ("<|header_start|>{role}<|header_end|>\n\n", "<|eot|>")},
                         "<|header_start|>assistant<|header_end|>\n\n", bos=True, strip=True),
    "gemma": ChatFormat(_GEMMA, "<start_of_turn>model\n", bos=True, system="first_user",
                        names={"assistant": "model"}, strip=True),
    "gemma3": ChatFormat(_GEMMA, "<start_of_turn>model\n", bos=True, system="first_user",
                         names={"assistant": "model"}, strip=True),
    "gemma3n": ChatFormat(_GEMMA, "<start_of_turn>model\n", bos=True, system="first_user",
                          names={"assistant": "model"}, strip=True),
    "gemma4": ChatFormat({"*": ("<|turn>{role}\n", "<turn|>\n")}, "<|turn>model\n", bos=True,
                         names={"assistant": "model"}, strip=True),
    "phi_3": ChatFormat(_PHI3, "<|assistant|>\n"),
    "phi_35": ChatFormat(_PHI3, "<|assistant|>\n"),
    "phi_4": ChatFormat({"*": ("<|im_start|>{role}<|im_sep|>", "<|im_end|>")}, "<|im_start|>assistant<|im_sep|>"),
    "cohere": ChatFormat({"*": ("<|START_OF_TURN_TOKEN|><|{role}_TOKEN|>", "<|END_OF_TURN_TOKEN|>")},
                         "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", bos=True, strip=True,
                         names={"system": "SYSTEM", "user": "USER", "assistant": "CHATBOT"}),
    "mistral_v1": _mistral("[INST] ", " [/INST]", " "),
    "mistral_v2v3": _mistral("[INST] ", "[/INST]", " "),
    "mistral_v3_tekken": _mistral("[INST]", "[/INST]", ""),
    "mistral_v7_tekken": _mistral("[INST]", "[/INST]", "", system=("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")),
    "deepseek_v2": ChatFormat({"system": ("", "\n\n"), "user": ("User: ", "\n\n"),
                               "assistant": ("Assistant: ", "{eos}")}, "Assistant:", bos=True),
    "deepseek_v3": ChatFormat({"system": ("", ""), "user": ("<｜User｜>", ""),
                               "assistant": ("<｜Assistant｜>", "{eos}")}, "<｜Assistant｜>", bos=True),
    "jamba": ChatFormat({"*": ("<|bom|><|{role}|> ", "<|eom|>")}, "<|bom|><|assistant|>", bos=True),
    "exaone": ChatFormat({"system": ("[|system|]", "[|endofturn|]\n"), "user": ("[|user|]", "\n"),
                          "assistant": ("[|assistant|]", "[|endofturn|]\n")}, "[|assistant|]"),
    "metharme": ChatFormat({"system": ("<|system|>", ""), "user": ("<|user|>", ""),
                            "assistant": ("<|model|>", "{eos}")}, "<|model|>", bos=True),
    "alpaca": ChatFormat({"system": ("", "\n\n"), "user": ("### Instruction: ", "\n\n"),
                          "assistant": ("### Response: ", "{eos}")}, "### Response: "),
}
# Axolotl's names for formats of images or audio: refused (text models only)
VISION = ("llava", "pixtral", "qwen2_vl", "llama3_2_vision", "gemma4_unified", "command_a", "command_a_tool_use",
          "command_a_rag", "aya", "exaone4")


def _text(s: str) -> str:
    """A Jinja expression for a piece of marker text ({eos} → the EOS token)."""
    parts = [repr(p) for p in s.split("{eos}")]
    return " + eos_token + ".join(parts) if "{eos}" in s else repr(s)


def _marker(fmt: ChatFormat, side: int) -> str:
    """Jinja expression for the text before (side 0) or after (side 1) a message of role ``m.role``."""
    roles = [r for r in fmt.turn if r != "*"]
    expr = ""
    for r in roles:
        expr += f"{_text(fmt.turn[r][side])} if m.role == {r!r} else "
    default = fmt.turn.get("*")
    if default is None:
        return f"({expr}'')" if expr else "''"
    before, after = default[side].split("{role}") if "{role}" in default[side] else (default[side], None)
    name = "(names[m.role] if m.role in names else m.role)"
    tail = f"{_text(before)} + {name} + {_text(after)}" if after is not None else _text(before)
    return f"({expr}{tail})"


def build(fmt: ChatFormat) -> str:
    """The Jinja text of ``fmt`` (see the module docstring)."""
    content = "(m.content | trim)" if fmt.strip else "m.content"
    if fmt.thinking:  # reasoning under reasoning_content (or thinking: Axolotl's template_thinking_key)
        content = (f"(('<think>\\n' + ns.think + '\\n</think>\\n\\n') if ns.think else "
                   f"({_text(fmt.generation_no_thinking)} if m.role == 'assistant' and enable_thinking is defined "
                   f"and enable_thinking is false else '')) + {content}")
    out = [f"{{%- set names = {fmt.names!r} -%}}"]
    out.append("{%- set msgs = messages -%}")
    if fmt.default_system:
        out.append("{%- if not msgs or msgs[0].role != 'system' -%}"
                   f"{{%- set msgs = [{{'role': 'system', 'content': {fmt.default_system!r}}}] + msgs -%}}"
                   "{%- endif -%}")
    out.append("{%- set ns = namespace(prefix='', think='') -%}")
    if fmt.system == "first_user":
        out.append("{%- if msgs and msgs[0].role == 'system' -%}"
                   f"{{%- set ns.prefix = msgs[0].content + {fmt.system_sep!r} -%}}"
                   "{%- set msgs = msgs[1:] -%}{%- endif -%}")
    if fmt.bos:
        out.append("{{- bos_token -}}")
    out.append("{%- for m in msgs -%}")
    if fmt.thinking:
        out.append("{%- set ns.think = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content "
                   "else (m.thinking if m.thinking is defined and m.thinking else '') -%}")
    out.append(f"{{{{- {_marker(fmt, 0)} -}}}}")
    out.append("{%- if m.role == 'user' and ns.prefix -%}{{- ns.prefix -}}{%- set ns.prefix = '' -%}{%- endif -%}")
    out.append(f"{{{{- {content} -}}}}")
    out.append(f"{{{{- {_marker(fmt, 1)} -}}}}")
    out.append("{%- endfor -%}")
    gen = _text(fmt.generation)
    if fmt.generation_no_thinking:
        gen += (f" + ({_text(fmt.generation_no_thinking)} if enable_thinking is defined and enable_thinking is false "
                "else '')")
    out.append(f"{{%- if add_generation_prompt -%}}{{{{- {gen} -}}}}{{%- endif -%}}")
    return "".join(out)


@functools.cache
def _built(name: str) -> str:
    return build(FORMATS[name])


def resolve_chat_template(choice: str, jinja: str = "", tokenizer=None, where: str = "chat_template") -> str | None:
    """The template text for ``choice`` (None: the tokenizer's own, which it may lack)."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if choice in (None, "", "tokenizer_default"):
        return own
    if choice.startswith("tokenizer_default_fallback_"):
        if own:
            return own
        choice = choice[len("tokenizer_default_fallback_"):]
    if choice == "jinja":
        if not jinja:
            raise LowbitError(f"{where}: jinja needs the template in chat_template_jinja (its text or a file)")
        p = Path(jinja)
        if "{" not in jinja and len(jinja) < 4096 and p.is_file():
            return p.read_text(encoding="utf-8")
        if "{" not in jinja:
            raise LowbitError(f"chat_template_jinja: {jinja!r} is neither a template nor a file")
        return jinja
    if own and getattr(tokenizer, "lowbit_processor", None) is not None and (choice in FORMATS or choice in VISION):
        return own  # a vision-language model: its own template, which places the images (named formats are text)
    if choice in FORMATS:
        return _built(choice)
    if choice in VISION:
        raise LowbitError(f"{where}: {choice!r} is a format for images or audio: with a vision-language model lowbit "
                          f"uses the model's own template; for a text model use one of {', '.join(FORMATS)}")
    import difflib

    near = difflib.get_close_matches(choice, list(FORMATS), n=1)
    raise LowbitError(f"{where}: unknown template {choice!r}; choose tokenizer_default, jinja or one of "
                      f"{', '.join(FORMATS)}" + (f" — did you mean {near[0]!r}?" if near else ""))


def check_chat_template(choice: str, jinja: str = "") -> None:
    """Refuse a ``chat_template`` choice that names no template (before any tokenizer is read; a format for images
    waits for the tokenizer: a vision-language model keeps its own)."""
    name = choice[len("tokenizer_default_fallback_"):] if choice.startswith("tokenizer_default_fallback_") else choice
    if name not in ("tokenizer_default", *VISION) and not (name == "jinja" and choice != name):
        resolve_chat_template(name, jinja, None)
