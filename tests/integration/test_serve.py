"""The serve stage end to end: Ray Serve on a local Ray, queried with the real OpenAI client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")

from raylm.config import load_config  # noqa: E402
from raylm.serve.engine import CompletionJob, Engine  # noqa: E402
from raylm.serve.lifecycle import start_serve, stop_serve  # noqa: E402

API_KEY = "sk-test-raylm"


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory, tiny_gpt, free_port, s3_server):
    """Two tiny models served on a free port, `tiny-b` from the S3 server; yields (base_url, local model dirs)."""
    import boto3

    from raylm import storage

    root = tmp_path_factory.mktemp("serve")
    dirs = {"tiny": tiny_gpt("tiny", block_size=64, seed=0), "tiny-b": tiny_gpt("tiny-b", block_size=32, seed=1)}
    boto3.client("s3").create_bucket(Bucket="serve-models")
    storage.copy_tree(str(dirs["tiny-b"]), "s3://serve-models/tiny-b")
    models = json.dumps({"tiny": str(dirs["tiny"]), "tiny-b": "s3://serve-models/tiny-b"})
    cfg = load_config(
        None,
        [
            f"--run.workdir={root}",
            f"--prepare.input={root}",
            f"--serve.models={models}",
            f"--serve.port={free_port()}",
            f"--serve.api_key={API_KEY}",
            "--serve.max_tokens_limit=40",
            "--serve.num_cpus_per_replica=0.5",
            "--serve.batch_wait_timeout_s=0.05",
            "--serve.autoscaling.min_replicas=1",
            "--serve.autoscaling.max_replicas=1",
        ],
    )
    base_url = start_serve(cfg.serve, cfg.context())
    try:
        yield base_url, dirs
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(base_url: str, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=60)


def test_completion_matches_local_generation(served, client):
    _, dirs = served
    expected = Engine(dirs["tiny"]).complete(CompletionJob(prompt="To be, or", max_tokens=12, temperature=0))
    got = client.completions.create(model="tiny", prompt="To be, or", max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == "tiny"
    assert got.choices[0].text == expected["text"]
    assert got.choices[0].finish_reason == expected["finish_reason"]
    assert got.usage.prompt_tokens == expected["prompt_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_a_model_on_s3_serves_what_it_serves_from_disk(served, client):
    _, dirs = served
    expected = Engine(dirs["tiny-b"]).complete(CompletionJob(prompt="Now is the", max_tokens=10, temperature=0))
    got = client.completions.create(model="tiny-b", prompt="Now is the", max_tokens=10, temperature=0)
    assert got.choices[0].text == expected["text"] and got.usage.prompt_tokens == expected["prompt_tokens"]


def test_seeded_sampling_repeats_and_n_choices(client):
    kwargs = dict(model="tiny", prompt=["Now is the"], max_tokens=10, temperature=1.0, seed=5)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b
    two = client.completions.create(**kwargs, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == a  # choice j samples with seed + j


def test_concurrent_requests_batch_to_the_same_text(client):
    prompts = ["To be", "The slings and arrows of", "Now", "whether 'tis nobler in the mind", "sea", "York"]

    def complete(prompt):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8 + len(prompt) % 5, temperature=0)
        return r.choices[0].text

    alone = [complete(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone


def test_streaming_completion_and_echo(client):
    full = client.completions.create(model="tiny", prompt="To be", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    echoed = client.completions.create(model="tiny", prompt="To be", max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == "To be" + full.choices[0].text


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt="Now is", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="Now is", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_models_listed_and_unknown_model_is_404(served, client):
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "tiny-b"]
    assert client.models.retrieve("tiny").owned_by == "raylm"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi")
    assert err.value.body["code"] == "model_not_found"
    assert err.value.body["param"] == "model"


def test_api_key_is_required(served):
    base_url, _ = served
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = post(base_url, "/v1/completions", {"model": "tiny", "prompt": "hi"}, key=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{not json", None, None),
        ({"model": "tiny", "prompt": ""}, "prompt", "invalid_value"),
        ({"model": "tiny", "prompt": 12}, "prompt", "invalid_value"),
        ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, "temperature", "invalid_value"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 41}, "max_tokens", "invalid_value"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, "max_tokens", "invalid_value"),
        ({"model": "tiny", "prompt": "hi", "bogus": 1}, "bogus", "unknown_parameter"),
        ({"model": "tiny-b", "prompt": "To be " * 30, "max_tokens": 4}, "prompt", "context_length_exceeded"),
        ({"model": "tiny", "prompt": [100000], "max_tokens": 4}, "prompt", "invalid_value"),
    ],
)
def test_bad_completion_requests_get_400_bodies(served, body, param, code):
    r = post(served[0], "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_bad_chat_request_and_unknown_route(served):
    r = post(served[0], "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    too_long = {"model": "tiny-b", "messages": [{"role": "user", "content": "x" * 200}]}
    r = post(served[0], "/v1/chat/completions", too_long)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(served[0], "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()


def test_logprobs_and_top_k_through_the_openai_client(served, client):
    _, dirs = served
    got = client.completions.create(model="tiny", prompt="To be, or", max_tokens=6, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens
    # greedy: each token is the most likely one; a token's own top entry may be absent when two tokens decode
    # to the same text (byte tokens of a partial UTF-8 character all show as U+FFFD), so compare values
    assert all(max(top.values()) == pytest.approx(t) for top, t in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    expected = Engine(dirs["tiny"]).complete(CompletionJob(prompt="To be, or", max_tokens=6, temperature=0, logprobs=2))
    assert lp.tokens == [e["token"] for e in expected["logprobs"]]
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in expected["logprobs"]], abs=1e-5)

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "To be?"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.token == c.top_logprobs[0].token for c in content)  # greedy: the most likely token each time
    # tokens' bytes, joined, are the reply's text (a token's text alone may be part of a UTF-8 character)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace").strip().startswith(chat.choices[0].message.content)

    # top_k is not an OpenAI field: clients send it as vLLM's extra parameter. top_k=1 samples greedily.
    greedy = client.completions.create(model="tiny", prompt="Now is", max_tokens=8, temperature=0).choices[0].text
    top1 = client.completions.create(model="tiny", prompt="Now is", max_tokens=8, temperature=1.5, seed=1, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy


def test_streamed_logprobs_cover_every_token(client):
    chunks = list(client.completions.create(model="tiny", prompt="Now is", max_tokens=8, temperature=0, logprobs=1, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    full = client.completions.create(model="tiny", prompt="Now is", max_tokens=8, temperature=0, logprobs=1)
    assert tokens == full.choices[0].logprobs.tokens


def test_streamed_chat_logprobs_cover_every_token(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "The slings"}], max_tokens=12, temperature=0, logprobs=True)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    kwargs["stop"] = [text[4:6]]  # the tokens of a stop string show no text: their log-probabilities still go out
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    full = client.chat.completions.create(**kwargs)
    assert tokens == [t.token for t in full.choices[0].logprobs.content]


def test_health_and_readiness(served):
    base_url, _ = served
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{base_url}/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": ["tiny", "tiny-b"]}


def test_serving_metrics_reach_the_ray_metrics_endpoint(served, client, ray_local):
    """The dashboard's Grafana panels read Ray's Prometheus endpoint: raylm's serving metrics must be there."""
    import time

    client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0)
    list(client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0, stream=True))
    post(served[0], "/v1/completions", {"model": "tiny", "prompt": ""})  # a 400, counted as an error
    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = [
        "ray_raylm_requests_total", "ray_raylm_request_errors_total", "ray_raylm_time_to_first_token_ms_bucket",
        "ray_raylm_time_per_output_token_ms_bucket", "ray_raylm_generated_tokens_total", "ray_raylm_batch_size_bucket",
        "ray_raylm_queue_depth", "ray_raylm_tokens_per_s",
    ]  # fmt: skip

    def lines(text: str, name: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(name + "{")]

    def counted(text: str) -> bool:  # this test's own 400 and 200s, not only what earlier tests left
        errors, requests = lines(text, "ray_raylm_request_errors_total"), lines(text, "ray_raylm_requests_total")
        return any('status="400"' in line and 'code="invalid_value"' in line for line in errors) and any(
            'route="/v1/completions"' in line and 'status="200"' in line and 'model="tiny"' in line for line in requests
        )

    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(name in text for name in wanted) and counted(text):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported after 90 s: {missing}"
    assert counted(text), lines(text, "ray_raylm_request_errors_total") + lines(text, "ray_raylm_requests_total")


def _fuzz_bodies():
    """Request bodies a hostile or broken client sends: raw bytes, wrong JSON shapes, fields of every type."""
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=60), st.sampled_from(["tiny", "tiny-b", "", "nope", "\ud800", "To be", "\x00"]),
    )  # fmt: skip
    json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    keys = st.sampled_from([
        "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
        "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "user", "best_of", "bogus",
    ])  # fmt: skip
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 3]), "content": json_value}), max_size=3)
    base = st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "tiny-b", "nope", 7])},
        optional={"prompt": json_value | st.lists(st.integers(-5, 400), max_size=80), "messages": messages | json_value},
    )
    body = st.tuples(base, st.dictionaries(keys, json_value, max_size=5)).map(lambda b: {**b[1], **b[0]})
    raw = st.one_of(
        body.map(lambda b: json.dumps(b, allow_nan=True).encode()),
        st.binary(max_size=200),
        st.sampled_from([b"", b"null", b"[]", b"{", b"[" * 5000, b'{"model": "tiny", "prompt": "\\ud800"}',
                         json.dumps({"model": "tiny", "prompt": "x" * 5000, "max_tokens": 1}).encode()]),
    )  # fmt: skip
    return st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nothing"]), raw)


def test_fuzzed_requests_get_no_5xx_and_the_server_keeps_serving(served, client):
    from hypothesis import HealthCheck, given, settings

    base_url, _ = served
    seen = {}
    http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(_fuzz_bodies())
    def send(case):
        path, raw = case
        r = http.post(f"{base_url}{path}", content=raw)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["type"], r.text[:300]

    send()
    http.close()
    assert sum(seen.values()) >= 300 and any(code >= 400 for code in seen), seen
    ok = client.completions.create(model="tiny", prompt="To be", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
