"""``lowbit serve`` on the built-in SmolLM2-135M-Instruct (4-bit) through the official ``openai`` client: the chat
answer equals ``lowbit generate``'s, streamed or not, and requests decoded together get the answers they get
alone."""

import threading

import pytest
from servers import free_port, running

from lowbit import cli
from lowbit.cli.serve import make_server
from lowbit.generation import generate
from lowbit.io.tokenizer import end_token_ids, tokenizer_for
from lowbit.serve.api import build_app

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish."]


def test_smollm2_answers_as_lowbit_generate_does_alone_and_together():
    port = free_port()
    args = cli.build_parser().parse_args(["serve", "--model", "smollm2-135m", "--compute-dtype", "float32",
                                          "--port", str(port)])
    server = make_server(args)
    tok = tokenizer_for("smollm2-135m")
    want = [generate(server.net, tok, q, 24, stop_ids=end_token_ids(tok)) for q in QUESTIONS]
    with running(build_app(server), port) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        model = c.models.list().data[0].id
        assert model == "smollm2-135m"
        ask = lambda q, **kw: c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                        max_tokens=24, temperature=0, **kw)
        assert [ask(q).choices[0].message.content for q in QUESTIONS] == want
        streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(QUESTIONS[0], stream=True) if ch.choices)
        assert streamed == want[0]
        together = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(QUESTIONS[i]))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [together[i].choices[0].message.content for i in range(4)] == want
    assert "Paris" in want[0]
