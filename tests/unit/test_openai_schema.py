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
    chat_prompt,
    completion_body,
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
        ({"model": "m", "prompt": "a", "logprobs": 3}, "logprobs", "invalid_value"),
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
