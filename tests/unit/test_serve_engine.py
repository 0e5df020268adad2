"""The serve stage's generation engine on a tiny exported model (no Ray)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raylm.model.artifact import save_model
from raylm.model.gpt import GPT, build_config
from raylm.serve.engine import CompletionJob, Engine, TextStream
from raylm.serve.openai_api import APIError

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."] * 10


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    torch.manual_seed(0)
    model = GPT(build_config("debug", vocab_size=tok.get_vocab_size(), block_size=40))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    eos = tok.token_to_id("<|endoftext|>")
    d = save_model(tmp_path_factory.mktemp("model"), model, tokenizer_file, eos_token_id=eos)
    return Engine(d, max_tokens_limit=24)


def test_complete_counts_tokens_and_is_deterministic_when_greedy(engine):
    job = CompletionJob(prompt="The quick", max_tokens=10, temperature=0)
    a, b = engine.complete(job), engine.complete(job)
    assert a == b
    assert a["prompt_tokens"] == len(engine.tokenizer.encode("The quick").ids)
    assert a["completion_tokens"] <= 10 and a["finish_reason"] in ("stop", "length")


def test_batch_stream_joins_to_the_same_text_as_alone(engine):
    jobs = [
        CompletionJob(prompt="The quick", max_tokens=10, temperature=0),
        CompletionJob(prompt="Pack my box with five", max_tokens=0, temperature=0),
        CompletionJob(prompt="lazy", max_tokens=6, temperature=0.8, seed=1, echo=True),
    ]
    alone = [engine.complete(j) for j in jobs]
    texts, finals = ["", "", ""], [None, None, None]
    for step in engine.stream_batch([engine.prepare(j) for j in jobs]):
        assert len(step) == 3
        for i, delta in enumerate(step):
            if delta is None:
                assert finals[i] is not None  # None only after the job's final delta
                continue
            assert finals[i] is None
            texts[i] += delta["text"]
            finals[i] = delta["finish_reason"]
    assert texts == [r["text"] for r in alone]
    assert finals == [r["finish_reason"] for r in alone]
    assert alone[1] == {**alone[1], "text": "", "finish_reason": "length", "completion_tokens": 0}
    assert alone[2]["text"].startswith("lazy")


def test_stop_string_ends_the_text_before_it(engine):
    full = engine.complete(CompletionJob(prompt="over the", max_tokens=20, temperature=0))["text"]
    stop = full[4:6]
    cut = engine.complete(CompletionJob(prompt="over the", max_tokens=20, temperature=0, stop=(stop,)))
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    text = "jugs \u20ac\u00e9 fox END more"
    ids = tok.encode(text).ids
    stream = TextStream(tok, ("END",))
    pieces = []
    for n in range(1, len(ids) + 1):
        if stream(ids[:n]):
            break
        piece = stream.take(final=False)
        assert "\ufffd" not in piece and not piece.endswith("E") and not piece.endswith("EN")
        pieces.append(piece)
    pieces.append(stream.take(final=True))
    assert "".join(pieces) == "jugs \u20ac\u00e9 fox "


def test_max_tokens_none_fills_what_the_context_leaves(engine):
    prompt = "The quick brown fox jumps over the lazy dog."
    n_prompt = len(engine.tokenizer.encode(prompt).ids)
    job = engine.prepare(CompletionJob(prompt=prompt, max_tokens=None))
    assert job.params.max_new_tokens == min(24, 40 - n_prompt)


@pytest.mark.parametrize(
    "job, param, code",
    [
        (CompletionJob(prompt="fox " * 40, max_tokens=4), "prompt", "context_length_exceeded"),
        (CompletionJob(prompt="fox " * 40, max_tokens=4, param="messages"), "messages", "context_length_exceeded"),
        (CompletionJob(prompt="fox", max_tokens=25), "max_tokens", "invalid_value"),
        (CompletionJob(prompt=[1, 99999], max_tokens=4), "prompt", "invalid_value"),
        (CompletionJob(prompt=[], max_tokens=4), "prompt", "invalid_value"),
    ],
)
def test_jobs_that_cannot_run_are_400s(engine, job, param, code):
    with pytest.raises(APIError) as err:
        engine.prepare(job)
    assert err.value.status == 400 and (err.value.param, err.value.code) == (param, code)


def test_batch_mixing_a_long_prompt_and_a_long_completion(engine):
    # Each fits the 40-token context alone; padded together they would not, so they run in two groups.
    long_prompt = CompletionJob(prompt="The quick brown fox jumps over the lazy dog. Pack my", max_tokens=2)
    long_completion = CompletionJob(prompt="fox", max_tokens=24)
    assert len(engine.prepare(long_prompt).prompt_ids) + 24 > 40
    long_prompt, long_completion = (replace(j, temperature=0) for j in (long_prompt, long_completion))
    alone = [engine.complete(long_prompt), engine.complete(long_completion)]
    texts = ["", ""]
    for step in engine.stream_batch([engine.prepare(long_prompt), engine.prepare(long_completion)]):
        for i, delta in enumerate(step):
            texts[i] += delta["text"] if delta else ""
    assert texts == [r["text"] for r in alone]


def test_models_that_do_not_exist_are_skipped_and_none_is_an_error(engine, tmp_path, capsys):
    from raylm.errors import InputError
    from raylm.serve.app import available_models
    from raylm.serve.config import ServeConfig

    cfg = ServeConfig(models={"real": str(engine.loaded.path), "gone": str(tmp_path / "gone")})
    assert available_models(cfg) == {"real": str(engine.loaded.path)}
    assert "gone" in capsys.readouterr().err
    with pytest.raises(InputError, match="no exported model found"):
        available_models(ServeConfig(models={"gone": str(tmp_path / "gone")}))


def test_logprobs_are_the_models_own_and_greedy_picks_the_top_one(engine):
    job = CompletionJob(prompt="The quick", max_tokens=5, temperature=0, logprobs=3)
    result = engine.complete(job)
    entries = result["logprobs"]
    assert len(entries) == result["completion_tokens"] == 5  # max_tokens 5, finish "length" unless eos
    ids = engine.tokenizer.encode("The quick").ids
    generated = []
    for entry in entries:
        # Recompute the distribution of each position with a plain forward pass over prompt + tokens so far.
        with torch.no_grad():
            logits, _ = engine.model(torch.tensor([ids + generated]))
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        top = torch.topk(logp, 3)
        assert [a["token"] for a in entry["top"]] == [engine.tokenizer.decode([int(t)]) for t in top.indices]
        assert entry["top"][0]["logprob"] == pytest.approx(float(top.values[0]), abs=1e-4)
        assert entry["token"] == entry["top"][0]["token"]  # greedy
        assert entry["logprob"] == pytest.approx(float(top.values[0]), abs=1e-4)
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        generated.append(int(top.indices[0]))
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") == result["text"]
    assert "logprobs" not in engine.complete(CompletionJob(prompt="The quick", max_tokens=5, temperature=0))


def test_top_k_one_is_greedy_and_top_k_limits_the_choices(engine):
    greedy = engine.complete(CompletionJob(prompt="Pack my", max_tokens=8, temperature=0))
    top1 = engine.complete(CompletionJob(prompt="Pack my", max_tokens=8, temperature=1.5, top_k=1, seed=3))
    assert top1["text"] == greedy["text"]
    for seed in range(5):
        sampled = engine.complete(CompletionJob(prompt="Pack my", max_tokens=6, temperature=2.0, top_k=2, seed=seed, logprobs=2))
        for entry in sampled["logprobs"]:
            assert entry["token"] in [a["token"] for a in entry["top"]]


def test_serve_config_file_is_a_valid_ray_serve_config(engine, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from raylm.config import load_config
    from raylm.serve.deploy import IMPORT_PATH, write_serve_config

    cfg = load_config(None, [
        f"--run.workdir={tmp_path}", f"--prepare.input={tmp_path}", "--run.name=app",
        f'--serve.models={{"real": "{engine.loaded.path}", "gone": "{tmp_path / "gone"}"}}',
        "--serve.autoscaling.max_replicas=3", "--serve.port=8123",
    ])  # fmt: skip
    path = write_serve_config(cfg.serve, cfg.run.name, tmp_path / "deploy" / "serve.yaml")
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)  # Ray's own schema of `serve deploy` files
    app = schema.applications[0]
    assert (app.name, app.import_path, app.route_prefix) == ("app", IMPORT_PATH, "/")
    assert app.args["serve"]["models"] == {"real": str(engine.loaded.path)}  # what exists, as absolute paths
    model = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "model-real")
    assert model["autoscaling_config"]["max_replicas"] == 3 and model["ray_actor_options"] == {"num_cpus": 1.0}
    assert raw["http_options"] == {"host": "127.0.0.1", "port": 8123}


def test_joined_deltas_carry_both_texts_and_the_later_counts(engine):
    from raylm.serve.engine import join_deltas

    job = engine.prepare(CompletionJob(prompt="The quick", max_tokens=6, temperature=0, logprobs=1))
    deltas = [d for (d,) in engine.stream_batch([job]) if d is not None]
    joined = deltas[0]
    for d in deltas[1:]:
        joined = join_deltas(joined, d)
    whole = engine.complete(CompletionJob(prompt="The quick", max_tokens=6, temperature=0, logprobs=1))
    assert joined == whole


def test_an_int8_model_serves_through_the_same_engine(engine, tmp_path):
    """The quantize stage's output is one of the served models: the engine loads it and batches it the same way."""
    from raylm.model.artifact import TOKENIZER
    from raylm.model.quantized import quantize_gpt, save_quantized

    target = tmp_path / "int8"
    save_quantized(target, quantize_gpt(engine.loaded.model), engine.loaded.path / TOKENIZER, source_meta=engine.loaded.meta)
    int8 = Engine(target, max_tokens_limit=24)
    assert int8.info()["quantization"]
    jobs = [CompletionJob(prompt="The quick", max_tokens=8, temperature=0), CompletionJob(prompt="Pack", max_tokens=5, temperature=0)]
    alone = [int8.complete(j) for j in jobs]
    assert all(1 <= r["completion_tokens"] <= j.max_tokens and r["text"] for r, j in zip(alone, jobs))
    finals = [None, None]
    for step in int8.stream_batch([int8.prepare(j) for j in jobs]):
        for i, delta in enumerate(step):
            if delta is not None and delta["finish_reason"]:
                finals[i] = delta
    # Batched, each job still gets its own budget. (Not the same text as alone: dynamic int8 quantizes a
    # layer's input with one scale for the whole batch, so a row's rounding depends on the rows beside it.)
    assert all(f is not None and f["completion_tokens"] <= j.max_tokens for f, j in zip(finals, jobs))


def test_generation_jobs_of_completion_and_chat_requests():
    from raylm.serve.ingress import generation_jobs
    from raylm.serve.openai_api import CHAT_STOP, ChatCompletionRequest, CompletionRequest, chat_prompt

    req = CompletionRequest(model="m", prompt=["a", "b"], n=2, seed=7, stop="x", echo=True, max_tokens=5, top_k=3)
    jobs = generation_jobs(req)
    assert [(j.prompt, j.seed) for j in jobs] == [("a", 7), ("a", 8), ("b", 7), ("b", 8)]  # choice j: seed + j
    assert all(j.stop == ("x",) and j.echo and j.param == "prompt" and (j.max_tokens, j.top_k) == (5, 3) for j in jobs)
    assert generation_jobs(CompletionRequest(model="m", prompt=[5, 6]))[0] == CompletionJob(prompt=[5, 6], seed=None)

    chat = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], n=2, stop=["y"], max_completion_tokens=4,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    jobs = generation_jobs(chat)
    assert [j.seed for j in jobs] == [None, None] and len(jobs) == 2
    assert jobs[0] == CompletionJob(
        prompt=chat_prompt(chat.messages), max_tokens=4, stop=("y", CHAT_STOP), param="messages", logprobs=2
    )
