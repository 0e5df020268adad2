"""The serve stage end to end: Ray Serve on a local Ray, queried with the real OpenAI client."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from raylm.config import load_config  # noqa: E402
from raylm.model.artifact import save_model  # noqa: E402
from raylm.model.gpt import GPT, build_config  # noqa: E402
from raylm.serve.engine import CompletionJob, Engine  # noqa: E402

API_KEY = "sk-test-raylm"
TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 20


def export_tiny_model(directory: Path, tokenizer_file: Path, block_size: int, seed: int) -> Path:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(seed)
    model = GPT(build_config("debug", vocab_size=vocab, block_size=block_size))
    with torch.no_grad():  # a wider spread than GPT-2's init, so greedy choices are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    eos = Tokenizer.from_file(str(tokenizer_file)).token_to_id("<|endoftext|>")
    return save_model(directory, model, tokenizer_file, eos_token_id=eos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """Two tiny models served on a free port; yields (base_url, model dirs)."""
    from tokenizers import ByteLevelBPETokenizer

    from raylm.serve.app import start_serve, stop_serve

    root = tmp_path_factory.mktemp("serve")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXT, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save(str(root / "tokenizer.json"))
    dirs = {
        "tiny": export_tiny_model(root / "tiny", root / "tokenizer.json", block_size=64, seed=0),
        "tiny-b": export_tiny_model(root / "tiny-b", root / "tokenizer.json", block_size=32, seed=1),
    }
    models = json.dumps({name: str(d) for name, d in dirs.items()})
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
    base_url = start_serve(cfg)
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
