"""An Ollama ``Modelfile`` beside an exported GGUF, so ``ollama create NAME -f Modelfile`` works.

    FROM ./model.gguf
    TEMPLATE <in triple quotes>  the chat template in Ollama's Go-template form, for the chat formats whose markers
                              lowbit recognises in the tokenizer's Jinja template (ChatML, Llama 3, Gemma);
                              otherwise left out, and Ollama reads the template stored in the GGUF
    PARAMETER stop "…"        the end-of-turn and end-of-text tokens

Jinja templates are programs; translating them in general is not attempted.
"""

from __future__ import annotations

__all__ = ["CHAT_FORMATS", "modelfile"]

CHAT_FORMATS = {
    "chatml": ("<|im_start|>", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
               '{{ end }}<|im_start|>assistant\n', ["<|im_end|>"]),
    "llama3": ("<|start_header_id|>", '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
               '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
               ["<|eot_id|>"]),
    "gemma": ("<start_of_turn>", '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
              '{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n',
              ["<end_of_turn>"]),
}
"""Chat formats with an Ollama template: name → (marker in the Jinja template, Go template, stop tokens)."""


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> tuple[str, str | None]:
    """(the Modelfile text, the chat format recognised or None)."""
    fmt = next((name for name, (marker, _, _) in CHAT_FORMATS.items() if chat_template and marker in chat_template),
               None)
    lines = [f"FROM ./{gguf_name}"]
    stops = []
    if fmt is not None:
        _, template, stops = CHAT_FORMATS[fmt]
        lines.append(f'TEMPLATE """{template}"""')
    for s in [*stops, eos_token]:
        if s and f'PARAMETER stop "{s}"' not in lines:
            lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n", fmt
