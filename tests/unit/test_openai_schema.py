"""OpenAI request validation and the bodies raylm answers with (no Ray, no HTTP)."""

from __future__ import annotations

import json

import pytest

from raylm.serve.openai_api import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    chat_body,
    chat_logprobs,
    chat_prompt,
    completion_body,
    completion_logprobs,
    invalid_api_key,
    model_not_found,
    parse_request,
    sse,
    usage,
)


def parse(body, schema=CompletionRequest):
    return parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), schema)


def error_of(body, schema=CompletionRequest) -> APIError:
    with pytest.raises(APIError) as err:
        parse(body, schema)
    return err.value


def test_completion_defaults_follow_openai():
    req = parse({"model": "m", "prompt": "Hello"})
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.stream, req.echo) == (16, 1.0, 1.0, 1, False, False)
    assert req.prompts == ["Hello"] and req.stops == []


@pytest.mark.parametrize(
    "prompt, prompts",
    [("a", ["a"]), (["a"], ["a"]), (["a", "b"], ["a", "b"]), ([5, 6, 7], [[5, 6, 7]])],
)
def test_prompt_forms(prompt, prompts):
    assert parse({"model": "m", "prompt": prompt}).prompts == prompts


def test_stop_accepts_a_string_or_a_list():
    assert parse({"model": "m", "prompt": "a", "stop": "\n"}).stops == ["\n"]
    assert parse({"model": "m", "prompt": "a", "stop": ["x", "yz"]}).stops == ["x", "yz"]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "m", "prompt": ""}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": []}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": 3}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": "a", "temperature": -1}, "temperature", "invalid_value"),
        ({"model": "m", "prompt": "a", "temperature": "hot"}, "temperature", "invalid_value"),
        ({"model": "m", "prompt": "a", "top_p": 0}, "top_p", "invalid_value"),
        ({"model": "m", "prompt": "a", "max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"model": "m", "prompt": "a", "max_tokens": "5"}, "max_tokens", "invalid_value"),
        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens", "invalid_value"),
        ({"model": "m", "prompt": "a", "n": 0}, "n", "invalid_value"),
        ({"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"model": "m", "prompt": "a", "stop": [""]}, "stop", "invalid_value"),
        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs", "invalid_value"),
        ({"model": "m", "prompt": "a", "logprobs": 2, "echo": True}, None, "invalid_value"),
        ({"model": "m", "prompt": "a", "top_k": -2}, "top_k", "invalid_value"),
        ({"model": "m", "prompt": "a", "top_k": 2.5}, "top_k", "invalid_value"),
        ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "invalid_value"),
        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of", "invalid_value"),
        ({"model": "m", "prompt": "a", "temprature": 1}, "temprature", "unknown_parameter"),
        ({"prompt": "a"}, "model", "missing_required_parameter"),
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": "a", "stream": True, "n": 2}, None, "invalid_value"),
        ({"model": "m", "prompt": ["a", "b"], "stream": True}, None, "invalid_value"),
    ],
)
def test_invalid_completion_requests_name_the_field(body, param, code):
    e = error_of(body)
    assert e.status == 400
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": code}}
    assert e.message and "\n" not in e.message
    if param:
        assert param in e.message


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_a_400(raw):
    e = error_of(raw)
    assert e.status == 400 and e.type == "invalid_request_error"


def test_chat_request_and_transcript():
    req = parse(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 9,
        },
        ChatCompletionRequest,
    )
    assert req.token_budget == 9
    assert chat_prompt(req.messages) == "System: Be brief.\nUser: Hi there\nAssistant:"
    plain = parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}, ChatCompletionRequest)
    assert plain.token_budget is None


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "robot", "content": "x"}], "messages"),
        ([{"role": "user"}], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
    ],
)
def test_invalid_chat_messages(messages, param):
    e = error_of({"model": "m", "messages": messages}, ChatCompletionRequest)
    assert e.status == 400 and e.param == param


def test_error_helpers():
    assert model_not_found("x").status == 404
    assert model_not_found("x").body()["error"]["code"] == "model_not_found"
    assert invalid_api_key().status == 401
    e = APIError.from_body(model_not_found("x").body(), 404)
    assert e.body() == model_not_found("x").body()


def test_response_bodies():
    choices = [{"text": "hi", "finish_reason": "length"}, {"text": "yo", "finish_reason": "stop"}]
    body = completion_body("cmpl-1", "m", choices, usage(3, 4), created=7)
    assert body["object"] == "text_completion"
    assert body["choices"][1] == {"text": "yo", "index": 1, "logprobs": None, "finish_reason": "stop"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chat = chat_body("chatcmpl-1", "m", choices, usage(3, 4), created=7)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


def test_chat_message_roles():
    assert ChatMessage(role="developer", content="x").role == "developer"


def test_top_k_and_logprobs_fields():
    req = parse({"model": "m", "prompt": "a", "top_k": 5, "logprobs": 2})
    assert (req.top_k, req.logprobs) == (5, 2)
    assert parse({"model": "m", "prompt": "a", "top_k": -1}).top_k == 0  # vLLM's "all tokens"
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse(chat, ChatCompletionRequest).logprobs_k is None
    assert parse({**chat, "logprobs": True}, ChatCompletionRequest).logprobs_k == 0
    assert parse({**chat, "logprobs": True, "top_logprobs": 3}, ChatCompletionRequest).logprobs_k == 3
    e = error_of({**chat, "top_logprobs": 3}, ChatCompletionRequest)
    assert e.status == 400 and "logprobs" in e.message
    assert error_of({**chat, "logprobs": True, "top_logprobs": 21}, ChatCompletionRequest).param == "top_logprobs"


def test_logprobs_bodies():
    tokens = [
        {"token": "To", "bytes": [84, 111], "logprob": -0.5, "top": [{"token": "To", "bytes": [84, 111], "logprob": -0.5}]},
        {"token": " be", "bytes": [32, 98, 101], "logprob": -1.25, "top": [{"token": " be", "bytes": [32, 98, 101], "logprob": -1.25}]},
    ]  # fmt: skip
    legacy = completion_logprobs(tokens, offset=3)
    assert legacy == {
        "tokens": ["To", " be"], "token_logprobs": [-0.5, -1.25],
        "top_logprobs": [{"To": -0.5}, {" be": -1.25}], "text_offset": [3, 5],
    }  # fmt: skip
    body = completion_body("c", "m", [{"text": "To be", "finish_reason": "length", "logprobs": tokens}], usage(1, 2))
    assert body["choices"][0]["logprobs"]["tokens"] == ["To", " be"]
    chat = chat_logprobs(tokens)
    assert chat["content"][1] == {
        "token": " be", "logprob": -1.25, "bytes": [32, 98, 101],
        "top_logprobs": [{"token": " be", "logprob": -1.25, "bytes": [32, 98, 101]}],
    }  # fmt: skip
    assert completion_logprobs(None) is None and chat_logprobs(None) is None


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"[" * 100_000, 400),  # json.loads recurses: RecursionError, not a JSONDecodeError
        (b'{"model": "m", "prompt": "\\ud800 lone surrogate"}', 400),
        (b'{"model": "m", "prompt": "' + b"x" * (1 << 20) + b'"}', 413),
        (json.dumps({"model": "m", "prompt": "a", "seed": 2**70}).encode(), 400),
        (json.dumps({"model": "m", "prompt": "a", "stop": "x" * 300}).encode(), 400),
    ],
)
def test_hostile_bodies_are_4xx(raw, status):
    e = error_of(raw)
    assert e.status == status and e.body()["error"]["message"]
