"""``lowbit serve`` through the official ``openai`` client, over HTTP, on a tiny model with two adapters: answers
equal ``lowbit generate``'s, per adapter; streaming; sampling reproducible by seed whatever shares the batch;
OpenAI's error shapes; adapters added and removed at run time; metrics; cancellation; API key."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from servers import running

from lowbit import cli
from lowbit.cli.serve import make_server
from lowbit.generation import generate
from lowbit.io.adapters import load_adapter, save_adapter
from lowbit.io.loader import load
from lowbit.io.tokenizer import end_token_ids, tokenizer_for
from lowbit.nn.lora import LoRALinear, add_lora
from lowbit.serve.api import build_app

from tiny import randomize_lora, save_tiny_with_tokenizer

openai = pytest.importorskip("openai")

PROMPT = "hello how are you"


def _adapter(model, out, seed):
    m = load(model, compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    randomize_lora(m, seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.mul_(20)  # enough to change a tiny model's greedy answer
    save_adapter(m, out)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_with_tokenizer(root / "model")
    _adapter(root / "model", root / "runs" / "one", 3)
    _adapter(root / "model", root / "runs" / "two", 4)
    _adapter(root / "model", root / "runs" / "three", 5)
    return root


def _server(root, *extra):
    """(a server over the tiny model and adapters one and two, its args); its --port is free (serve checks it)."""
    from servers import free_port

    args = cli.build_parser().parse_args(
        ["serve", "--model", str(root / "model"), "--port", str(free_port()),
         "--adapter", f"one={root / 'runs' / 'one'}", "--adapter", str(root / "runs" / "two"),
         "--adapter-root", str(root / "runs"), "--compute-dtype", "float32", "--max-tokens", "48", *extra])
    return make_server(args), args


@pytest.fixture(scope="module")
def url(root):
    server, _ = _server(root)
    with running(build_app(server)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _reference(root, adapter, prompt, n, chat=True, **sampling):
    """``lowbit generate``'s answer (the function its command calls): greedy unless ``sampling`` says otherwise."""
    net = load(root / "model", compute_dtype=torch.float32)
    if adapter:
        load_adapter(net, root / "runs" / adapter)
    tok = tokenizer_for(root / "model", adapter and root / "runs" / adapter)
    return generate(net, tok, prompt, n, chat=chat, stop_ids=end_token_ids(tok, adapter and root / "runs" / adapter),
                    **{"temperature": 0.0, **sampling})


def test_models_lists_the_base_and_each_adapter(client):
    assert [m.id for m in client.models.list().data] == ["model", "model:one", "model:two"]


def test_each_adapter_answers_as_lowbit_generate_does(client, root):
    answers = {}
    for model, adapter in (("model", None), ("model:one", "one"), ("model:two", "two")):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12, temperature=0)
        answers[model] = r.choices[0].message.content
        assert answers[model] == _reference(root, adapter, PROMPT, 12)
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert len(set(answers.values())) == 3  # the adapters do change the answer
    r = client.completions.create(model="model:one", prompt="the capital of", max_tokens=10, temperature=0)
    assert r.choices[0].text == _reference(root, "one", "the capital of", 10, chat=False)
    assert r.usage.prompt_tokens == len(tokenizer_for(root / "model")("the capital of")["input_ids"])


def test_streaming_gives_the_same_text_in_chunks(client):
    kw = dict(model="model:two", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []
    streamed = client.completions.create(model="model", prompt="the capital", max_tokens=8, temperature=0, stream=True)
    plain = client.completions.create(model="model", prompt="the capital", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_sampling_follows_the_seed_whatever_shares_the_batch(client, root):
    kw = dict(model="model:one", prompt="what is the", max_tokens=12, temperature=0.9, top_p=0.95, n=3)
    alone = [c.text for c in client.completions.create(**kw, seed=11).choices]
    assert len(alone) == 3 and len(set(alone)) > 1  # each choice draws its own tokens
    for i in range(3):  # choice i draws as lowbit generate does with seed + i
        assert alone[i] == _reference(root, "one", "what is the", 12, chat=False, temperature=0.9, top_p=0.95,
                                      seed=11 + i)
    assert [c.text for c in client.completions.create(**kw, seed=11).choices] == alone
    assert [c.text for c in client.completions.create(**kw, seed=12).choices] != alone
    out = {}

    def ask(i):
        model = ["model", "model:one", "model:two"][i % 3]
        out[i] = [c.text for c in client.completions.create(**{**kw, "model": model}, seed=11 if i % 3 == 1 else i)
                  .choices]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (1, 4, 7):  # decoded beside eight other requests and two other adapters: the same tokens
        assert out[i] == alone
    assert out[0] != out[3]  # other seeds, other answers


def test_concurrent_greedy_requests_are_not_mixed_up(client, root):
    prompts = ["hello", "what is the capital of france", "the answer is", "hello how are you today", "below is"]
    want = {(p, a): _reference(root, a, p, 10) for p in prompts for a in (None, "one")}
    got = {}

    def ask(p, a):
        r = client.chat.completions.create(model="model" + (f":{a}" if a else ""), max_tokens=10, temperature=0,
                                           messages=[{"role": "user", "content": p}])
        got[(p, a)] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=key) for key in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_stop_strings_cut_the_text(client):
    kw = dict(model="model:two", prompt="hello", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[5:7]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_errors_come_in_openais_shape(client):
    msgs = [{"role": "user", "content": PROMPT}]
    status, body = _error(lambda: client.chat.completions.create(model="nope", messages=msgs))
    assert status == 404 and body["code"] == "model_not_found" and "model:one" in body["message"]
    status, body = _error(lambda: client.chat.completions.create(model="model", messages=msgs, temperature=3))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = _error(lambda: client.chat.completions.create(model="model", messages=msgs, max_tokens=100))
    assert status == 400 and body["param"] == "max_tokens"
    status, body = _error(lambda: client.chat.completions.create(model="model", messages=msgs, max_tokens=40,
                                                                 extra_body={"bogus": 1}))
    assert status == 400 and body["param"] == "bogus"
    status, body = _error(lambda: client.chat.completions.create(model="model", messages=msgs, logprobs=True))
    assert status == 400 and body["code"] == "unsupported_parameter"
    status, body = _error(lambda: client.completions.create(model="model", prompt="the capital " * 40, max_tokens=40))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = _error(lambda: client.completions.create(model="model", prompt="the capital " * 8, max_tokens=48))
    assert status == 400 and body["code"] == "context_length_exceeded" and "max_tokens" in body["message"]
    status, body = _error(lambda: client.chat.completions.create(model="model", messages=[{"role": "x"}]))
    assert status == 400 and body["param"] == "messages[0]"


def _http(url, method="GET", body=None, headers=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_adapters_are_added_and_removed_at_run_time_from_the_root_only(client, url, root):
    status, text = _http(url + "/v1/adapters", "POST", {"name": "three"})
    assert status == 200, text
    r = client.chat.completions.create(model="model:three", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content == _reference(root, "three", PROMPT, 8)
    status, text = _http(url + "/v1/adapters", "POST", {"name": "evil", "path": "../model"})
    assert status == 400 and "outside the adapter root" in json.loads(text)["error"]["message"]
    status, text = _http(url + "/v1/adapters", "POST", {"name": "bad/name"})
    assert status == 400
    assert _http(url + "/v1/adapters/three", "DELETE")[0] == 200
    assert "model:three" not in [m.id for m in client.models.list().data]
    assert _http(url + "/v1/adapters/three", "DELETE")[0] == 404


def test_body_limits_and_bad_json(url):
    status, text = _http(url + "/v1/completions", "POST", b"{not json")
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]
    status, text = _http(url + "/v1/completions", "POST", {"model": "model", "prompt": "x" * (2 << 20)})
    assert status == 413 and json.loads(text)["error"]["code"] == "request_too_large"


def test_an_oversized_body_still_being_sent_gets_its_413(url):
    """The refusal comes after the body is read: a client still sending (here: the second half a moment later) gets
    the 413, not a connection reset mid-send."""
    import socket
    import time
    from urllib.parse import urlparse

    where = urlparse(url)
    body = b"x" * (2 << 20)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[: len(body) // 2])
        time.sleep(0.5)  # the server has the headers: without reading the rest it would answer and close now
        sock.sendall(body[len(body) // 2:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply


def test_metrics_count_requests_and_tokens(client, url):
    client.completions.create(model="model", prompt="hello", max_tokens=3, temperature=0)
    status, text = _http(url + "/metrics")
    assert status == 200
    assert 'lowbit_requests_total{route="/v1/completions",status="200"}' in text
    assert "lowbit_completion_tokens_total" in text and "lowbit_request_seconds_bucket" in text
    assert "lowbit_queue_depth" in text and "lowbit_running_sequences" in text


def test_a_client_that_goes_away_cancels_its_sequences(root):
    server, _ = _server(root, "--max-tokens", "100")
    with running(build_app(server)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with server.engine.model_lock:  # the engine waits: the request is in flight when the client leaves
            stream = c.completions.create(model="model", prompt="hello", max_tokens=100, temperature=0, stream=True,
                                          timeout=0.5)
            with pytest.raises(openai.APITimeoutError):
                next(iter(stream))
            stream.close()
        for _ in range(200):
            if server.engine.queued() == 0:
                break
            threading.Event().wait(0.05)
        assert server.engine.queued() == 0
        status, text = _http(url + "/metrics")
        assert 'status="499"' in text


def test_a_full_queue_answers_429(root):
    server, _ = _server(root, "--max-queue", "1")
    with running(build_app(server)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with server.engine.model_lock:
            first = threading.Thread(target=lambda: c.completions.create(model="model", prompt="hi", max_tokens=3))
            first.start()
            for _ in range(200):
                if server.engine.queued():
                    break
                threading.Event().wait(0.05)
            status, body = _error(lambda: c.completions.create(model="model", prompt="hi", max_tokens=3))
        first.join()
        assert status == 429 and body["code"] == "queue_full"


def test_api_key_is_required_when_given(root):
    server, _ = _server(root, "--api-key", "s3cret")
    with running(build_app(server, "s3cret")) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        status, body = _error(lambda: bad.models.list())
        assert status == 401 and body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.models.list().data) == 3
        assert _http(url + "/health")[0] == 200


def test_shutdown_lets_a_request_in_flight_finish(root):
    server, _ = _server(root)
    got = {}
    with running(build_app(server)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = c.completions.create(model="model:one", prompt="hello", max_tokens=40, temperature=0, stream=True)
        it = iter(stream)
        got["first"] = next(it)
    got["rest"] = list(it)  # the server was told to stop after the first chunk; the answer still ends properly
    assert got["rest"][-1].choices[0].finish_reason == "length"


def test_serve_refuses_a_public_host_without_a_key_a_busy_port_and_a_missing_adapter(root, capsys, monkeypatch):
    import socket

    from lowbit.cli import options

    monkeypatch.setattr(options, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the checks"))
    rc = cli.main(["serve", "--model", str(root / "model"), "--host", "0.0.0.0"])
    assert rc == 2 and "needs --api-key" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc = cli.main(["serve", "--model", str(root / "model"), "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen there" in err and len(err.strip().splitlines()) == 1
    from servers import free_port

    rc = cli.main(["serve", "--model", str(root / "model"), "--adapter", f"x={root / 'nothing'}", "--port",
                   str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and "not a PEFT adapter folder" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_an_adapter_that_trains_more_than_lora(root, tmp_path, capsys):
    m = load(root / "model", compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    m.get_input_embeddings().weight.requires_grad_(True)
    save_adapter(m, tmp_path / "rows")
    rc = cli.main(["serve", "--model", str(root / "model"), "--adapter", f"x={tmp_path / 'rows'}"])
    assert rc == 2 and "merged model" in capsys.readouterr().err


def test_the_serve_command_serves_until_ctrl_c(root):
    import signal
    import subprocess
    import sys
    import time

    from servers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--model", str(root / "model"), "--adapter",
                             f"one={root / 'runs' / 'one'}", "--port", str(port), "--compute-dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < end, "the server did not start"
            try:
                if _http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="model:one", messages=[{"role": "user", "content": PROMPT}],
                                      max_tokens=8, temperature=0)
        assert r.choices[0].message.content == _reference(root, "one", PROMPT, 8)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "models: model, model:one" in out and f"127.0.0.1:{port}" in out
