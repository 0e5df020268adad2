"""Training ingest through Ray Data: each data-parallel rank's exact micro-batches, resumable, shared by pipeline stages."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from raylm.artifacts import stage_output
from raylm.tokenize.bpe import train_tokenizer
from raylm.train.ingest import DataPosition, SequenceOrder, TokenStream
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import TokenSplit, read_token_meta, write_token_data

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    rng = random.Random(3)
    words = "one two three four five six seven eight nine ten".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(400)]
    tokenizer = train_tokenizer([docs], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                                show_progress=False)  # fmt: skip
    path = tmp_path_factory.mktemp("ingest") / "tokens"
    with stage_output(path, "tokenize", {"test": "ingest"}) as out:
        splits = {s: packed_split([tokenizer.encode(d).ids for d in part], 0, SEQ_LEN)
                  for s, part in (("train", docs[:360]), ("validation", docs[360:]))}  # fmt: skip
        out.stats = write_token_data(out.tmp, tokenizer, 0, splits, shard_rows=50).to_stats()
    return path


def test_stream_yields_the_orders_batches_across_epochs_and_resumes_exactly(ray_local, tokens):
    meta = read_token_meta(tokens)
    data = TokenSplit(meta, "train")
    order = SequenceOrder(len(data), micro_batch_size=8, dp_size=2, seed=11)
    bpe = order.batches_per_epoch
    stream = TokenStream(str(tokens), "train", order, dp_rank=1, batches_per_task=3)
    run = list(itertools.islice(stream.iter_torch(), 2 * bpe + 3))  # two epochs and a bit
    for k, (batch, indices, position) in enumerate(run):
        epoch, b = divmod(k, bpe)
        assert position == order.position_after(k + 1)
        assert indices.tolist() == order.epoch_indices(epoch, 1)[b].tolist()
        assert batch.shape == (8, SEQ_LEN + 1) and str(batch.dtype) == "torch.int64"
        assert batch.numpy().tolist() == data.rows(indices.numpy()).tolist()
    # started again from a position inside epoch 1, the stream continues with exactly the batches that followed
    cut = bpe + 2
    resumed = list(itertools.islice(stream.iter_torch(start=run[cut - 1][2]), len(run) - cut))
    assert [i.tolist() for _, i, _ in resumed] == [i.tolist() for _, i, _ in run[cut:]]
    assert run[cut - 1][2] == DataPosition(epoch=1, batch=2)


@pytest.mark.slow  # 4 Ray Train workers: ~1 minute on 2 cores (test_train_pipeline covers the run end to end)
def test_pipeline_stages_of_one_data_parallel_rank_see_the_same_micro_batches(ray_local, tokens, tmp_path):
    """4 Ray Train workers as 2 pipeline stages x 2 data-parallel ranks: stage 0's inputs are stage 1's labels."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):
        import torch.distributed as dist
        import ray.train

        from raylm.train.ingest import SequenceOrder, TokenStream
        from raylm.tokenize.shards import read_token_meta
        from raylm.train.topology import rank_coords

        ctx = ray.train.get_context()
        coords = rank_coords(ctx.get_world_rank(), ctx.get_world_size(), pipeline_stages=2)
        meta = read_token_meta(config["tokens"])
        order = SequenceOrder(meta.num_sequences["train"], 4, coords.dp_size, seed=5)
        seen = []
        for tokens, indices, _ in itertools.islice(TokenStream(config["tokens"], "train", order, coords.dp_rank).iter_torch(), 5):
            # the first stage feeds inputs, the last computes the loss against labels
            part = tokens[:, :-1] if coords.first_stage else tokens[:, 1:]
            seen.append({"indices": indices.tolist(), "part": part.tolist()})
        everyone = [None] * ctx.get_world_size()
        dist.all_gather_object(everyone, {"stage": coords.stage, "dp_rank": coords.dp_rank, "seen": seen})
        if ctx.get_world_rank() == 0:
            Path(config["out"]).write_text(json.dumps(everyone))

    out = tmp_path / "seen.json"
    TorchTrainer(
        loop,
        train_loop_config={"tokens": str(tokens), "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=4, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="pipeline-ingest", storage_path=str(tmp_path / "ray")),
    ).fit()
    workers = json.loads(out.read_text())
    by = {(w["stage"], w["dp_rank"]): w["seen"] for w in workers}
    assert sorted(by) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for dp in (0, 1):
        first, last = by[(0, dp)], by[(1, dp)]
        assert len(first) == len(last) == 5
        for a, b in zip(first, last):
            assert a["indices"] == b["indices"]  # the same sequences, micro-batch by micro-batch
            inputs, labels = np.array(a["part"]), np.array(b["part"])
            np.testing.assert_array_equal(labels[:, :-1], inputs[:, 1:])  # labels are the inputs shifted by one
    # the two pipelines read disjoint shares
    share = [{i for s in by[(0, dp)] for i in s["indices"]} for dp in (0, 1)]
    assert not share[0] & share[1]
