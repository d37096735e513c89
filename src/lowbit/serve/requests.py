"""The bodies of OpenAI's ``/v1/chat/completions`` and ``/v1/completions``, checked field by field.

A bad field is answered in OpenAI's error shape, naming it: ``{"error": {"message", "type", "param", "code"}}``
with status 400 (401 without the key, 404 for an unknown model, 413 for a body or prompt over the limits, 429 when
the queue is full). Fields lowbit does not compute (tools, logprobs, penalties, …) are refused at any value other
than their default rather than ignored; unknown fields are refused as OpenAI's own server does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Params

__all__ = ["ApiError", "Request", "parse_request", "MAX_N"]

MAX_N = 8
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user"}
# fields lowbit does not compute, with the values that mean "not used"
UNUSED = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (False, None),
          "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
          "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, True, False),
          "echo": (False, None), "best_of": (None, 1), "suffix": (None, ""), "service_tier": (None, "auto", "default"),
          "store": (None, False), "metadata": (None, {}), "reasoning_effort": (None,), "modalities": (None, ["text"])}
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETION = COMMON | {"prompt"}
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    model: str
    chat: bool
    messages: list[dict] | None
    prompt: str | None
    max_tokens: int | None
    params: Params
    n: int
    stream: bool
    include_usage: bool


def parse_request(body, chat: bool) -> Request:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    allowed = CHAT if chat else COMPLETION
    for key, value in body.items():
        if key in UNUSED:
            if value not in UNUSED[key]:
                raise ApiError(f"{key} is not supported by lowbit serve (leave it out)", param=key,
                               code="unsupported_parameter")
        elif key not in allowed:
            raise ApiError(f"unrecognized request argument supplied: {key}", param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("model is required: the base's name or base:adapter (GET /v1/models lists them)", param="model")
    messages = _messages(body.get("messages")) if chat else None
    prompt = None if chat else _prompt(body.get("prompt"))
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, None, None)
    params = Params(max_tokens=max_tokens or 0, temperature=_number(body, "temperature", float, 0, 2, 1.0),
                    top_p=_number(body, "top_p", float, 0, 1, 1.0), stop=_stop(body.get("stop")),
                    seed=_number(body, "seed", int, -(2**63), 2**63 - 1, None))
    if params.top_p == 0:
        raise ApiError("top_p must be above 0", param="top_p")
    n = _number(body, "n", int, 1, MAX_N, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError("stream must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
        raise ApiError("stream_options takes include_usage only", param="stream_options")
    return Request(model, chat, messages, prompt, max_tokens, params, n, bool(stream),
                   bool(opts.get("include_usage", False)))


def _number(body: dict, key: str, kind, low, high, default):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (kind is float or float(value).is_integer())
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(f"{key} must be {'an integer' if kind is int else 'a number'} {span}, got {value!r}",
                       param=key)
    return kind(value)


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    return stops


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("prompt must be a string (one prompt a request)", param="prompt")
    return prompt


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(f"{where}: role must be one of {', '.join(ROLES)}", param=where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"{where}.content: only text parts are supported", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string", param=f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out
