"""Training ingest: each data-parallel rank's micro-batches, streamed from the token shards through Ray Data.

Which sequences a rank reads is decided by `SequenceOrder`, from numbers every rank knows:

    epoch e:  perm = permutation of the split's N sequences drawn from (seed, e)   (identity when not shuffling)
              the first B * M * D of them, as B micro-batches of M sequences for each of the D ranks:
              micro-batch b of data-parallel rank r = perm[(b * D + r) * M : (b * D + r + 1) * M]

(B = N // (M * D) batches per epoch; the N mod (M * D) left over differ from epoch to epoch.)
Nothing depends on the world rank itself, so under pipeline parallelism every stage of one
pipeline, which shares one data-parallel rank, gets the same micro-batches: the first stage
its inputs, the last stage its labels.

A position (epoch, batch) says how many micro-batches of the epoch every rank has consumed;
saved with a checkpoint, it restarts the stream exactly there, so a resumed run repeats and
skips nothing. `TokenStream` turns the order into a Ray Data pipeline per epoch (the rank's
index chunks -> tasks gathering those rows from the memory-mapped shards, on the rank's own
node), read ahead by Ray Data's streaming executor and `iter_torch_batches(prefetch_batches)`.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import ray
import torch

from raylm.errors import InputError
from raylm.runtime import IDLE_WORKERS_KEPT
from raylm.tokenize.shards import TokenSplit, read_token_meta

INDEX_COLUMN, TOKENS_COLUMN, MASK_COLUMN = "index", "tokens", "loss_mask"


@dataclass(frozen=True)
class DataPosition:
    """Micro-batches consumed: `batch` of epoch `epoch`, by every data-parallel rank."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SequenceOrder:
    """Which sequences go to which data-parallel rank, micro-batch by micro-batch, epoch after epoch."""

    num_sequences: int
    micro_batch_size: int
    dp_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.batches_per_epoch == 0:
            raise InputError(
                f"{self.num_sequences} sequences are fewer than micro_batch_size x data-parallel size = "
                f"{self.micro_batch_size} x {self.dp_size}: no rank would get a whole micro-batch"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_sequences // (self.micro_batch_size * self.dp_size)

    def epoch_indices(self, epoch: int, dp_rank: int) -> np.ndarray:
        """Sequence indices of rank `dp_rank` in `epoch`: shape (batches_per_epoch, micro_batch_size)."""
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {self.dp_size})")
        n = self.batches_per_epoch * self.micro_batch_size * self.dp_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)[:n]
        else:
            order = np.arange(n, dtype=np.int64)
        return order.reshape(self.batches_per_epoch, self.dp_size, self.micro_batch_size)[:, dp_rank]

    def position_after(self, micro_batches: int) -> DataPosition:
        """The position after `micro_batches` micro-batches from the start of epoch 0."""
        return DataPosition(*divmod(micro_batches, self.batches_per_epoch))

    def consumed(self, position: DataPosition) -> int:
        """Micro-batches from the start of epoch 0 to `position` (inverse of position_after)."""
        return position.epoch * self.batches_per_epoch + position.batch

    def to_dict(self) -> dict:
        """What must not change between a checkpoint and its resumption for a data position to mean the same."""
        return asdict(self)


@dataclass
class DataState:
    """Where one rank's data stream stands, and a checksum of every sample it has trained on."""

    position: DataPosition
    order: SequenceOrder
    checksum: int = 0

    def consume(self, indices: torch.Tensor, position: DataPosition) -> None:
        """Account for a micro-batch of sequence `indices`, after which the stream is at `position`."""
        self.checksum = (self.checksum + sample_checksum(indices.cpu().numpy(), self.position.epoch)) % _MERSENNE61
        self.position = position

    def to_state(self, global_checksum: int) -> dict:
        """For state.json: the position (the same on every rank), the order it refers to, all ranks' checksum."""
        return {"position": self.position.to_dict(), "order": self.order.to_dict(), "sample_checksum": global_checksum}


@functools.lru_cache(maxsize=8)
def _open_split(path: str, split: str) -> TokenSplit:
    """The memory-mapped split, opened once per process (Ray reuses worker processes across tasks)."""
    return TokenSplit(read_token_meta(path), split)


@functools.lru_cache(maxsize=4)
def _rank_epoch(order: SequenceOrder, epoch: int, dp_rank: int) -> np.ndarray:
    """order.epoch_indices, computed once per process for the tasks of one epoch."""
    return order.epoch_indices(epoch, dp_rank)


def gather_rows(
    batch: dict, *, path: str, split: str, order: SequenceOrder, dp_rank: int, loss_mask: bool = False
) -> dict:
    """Ray Data UDF: rows (epoch, first, stop) naming runs of micro-batches -> their sequences (and loss masks), in order."""
    indices = np.concatenate([
        _rank_epoch(order, int(e), dp_rank)[int(a) : int(b)].reshape(-1)
        for e, a, b in zip(batch["epoch"], batch["first"], batch["stop"])
    ])  # fmt: skip
    data = _open_split(path, split)
    out = {TOKENS_COLUMN: data.rows(indices), INDEX_COLUMN: indices}
    if loss_mask:
        out[MASK_COLUMN] = data.mask_rows(indices)
    return out


class TokenStream:
    """One data-parallel rank's endless stream of micro-batches of one split, through Ray Data.

        stream = TokenStream(path, "train", order, dp_rank=r)
        for tokens, indices, position in stream.iter_torch(start=DataPosition(), device=device):
            ...   # tokens: (micro_batch_size, seq_len + 1) int64; position: after this batch

    With `loss_mask=True` (token data with loss masks, e.g. SFT) each item also carries the rows'
    loss masks, (micro_batch_size, seq_len + 1) int64 0/1, as a fourth element.

    Runs wherever Ray is initialized (a Ray Train worker): the read tasks run on the calling
    node (its page cache holds the memory-mapped shards) and reserve no CPU, so they never
    wait for the CPUs the trainers hold.
    """

    def __init__(
        self,
        path: str,
        split: str,
        order: SequenceOrder,
        dp_rank: int,
        *,
        prefetch_batches: int = 4,
        batches_per_task: int = 16,
        read_tasks: int = IDLE_WORKERS_KEPT,
        loss_mask: bool = False,
    ):
        self.path, self.split, self.order, self.dp_rank = str(path), split, order, dp_rank
        self.loss_mask = loss_mask
        self.prefetch_batches = prefetch_batches
        self.batches_per_task = batches_per_task
        self.read_tasks = read_tasks

    def epoch_dataset(self, epoch: int, first_batch: int = 0):
        """A Ray Dataset of this rank's rows of `epoch` from micro-batch `first_batch` on, in order."""
        # One task per run of batches_per_task micro-batches. from_items puts the rows in the object
        # store without a task, so nothing here needs a CPU that the trainers might all hold.
        bounds = range(first_batch, self.order.batches_per_epoch, self.batches_per_task)
        runs = [{"epoch": epoch, "first": a, "stop": min(a + self.batches_per_task, self.order.batches_per_epoch)}
                for a in bounds]  # fmt: skip
        ds = ray.data.from_items(runs, override_num_blocks=len(runs)).map_batches(
            gather_rows,
            fn_kwargs={"path": self.path, "split": self.split, "order": self.order, "dp_rank": self.dp_rank,
                       "loss_mask": self.loss_mask},  # fmt: skip
            batch_size=None,
            batch_format="numpy",
            # No CPU reserved, so at most `read_tasks` at a time: otherwise Ray starts a worker process per task.
            compute=ray.data.TaskPoolStrategy(size=self.read_tasks),
            num_cpus=0,
            label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()},  # this node: its page cache
        )
        # Settings of this dataset's own copy of the DataContext. No progress bars: a training run makes one such
        # dataset per epoch and rank, whose bars would be redrawn under the run's progress lines, through the
        # driver (tqdm_ray); how well the stream keeps up is the loop's data_wait_frac.
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False
        return ds

    def iter_torch(self, start: DataPosition = DataPosition(), device=None) -> Iterator[tuple]:
        """(tokens, indices, position after[, loss mask]) for every micro-batch from `start` on, epoch after epoch."""
        epoch, first = start.epoch, start.batch
        micro = self.order.micro_batch_size
        dtypes = {TOKENS_COLUMN: torch.int64, INDEX_COLUMN: torch.int64}
        if self.loss_mask:
            dtypes[MASK_COLUMN] = torch.int64
        while True:
            if first < self.order.batches_per_epoch:
                batch = first
                for b in self.epoch_dataset(epoch, first).iter_torch_batches(
                    batch_size=micro,
                    dtypes=dtypes,
                    device=device or "cpu",
                    prefetch_batches=self.prefetch_batches,
                    drop_last=False,
                ):
                    batch += 1
                    after = DataPosition(epoch + 1, 0) if batch == self.order.batches_per_epoch else DataPosition(epoch, batch)
                    if self.loss_mask:
                        yield b[TOKENS_COLUMN], b[INDEX_COLUMN], after, b[MASK_COLUMN]
                    else:
                        yield b[TOKENS_COLUMN], b[INDEX_COLUMN], after
                if batch != self.order.batches_per_epoch:
                    raise RuntimeError(f"{self.path}/{self.split}: epoch {epoch} ended after {batch} micro-batches")
            epoch, first = epoch + 1, 0

    def numpy_batches(self, epoch: int, count: int) -> list[np.ndarray]:
        """The first `count` micro-batches of `epoch` as int64 arrays, read directly (for small validation sets)."""
        indices = self.order.epoch_indices(epoch, self.dp_rank)[:count]
        data = _open_split(self.path, self.split)
        return [data.rows(i).astype(np.int64) for i in indices]

    def numpy_mask_batches(self, epoch: int, count: int) -> list[np.ndarray]:
        """The loss masks of `numpy_batches(epoch, count)`, as int64 0/1 arrays."""
        indices = self.order.epoch_indices(epoch, self.dp_rank)[:count]
        data = _open_split(self.path, self.split)
        return [data.mask_rows(i).astype(np.int64) for i in indices]


class BackgroundIterator:
    """Pulls from `source` in a daemon thread, up to `depth` items ahead; its errors surface in `next()`.

    The training loop starts the data stream this way before building its engine, so that
    Ray Data's start-up (and each new epoch's) overlaps with work instead of stalling a step.
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(source,), name="raylm-data", daemon=True)
        self._thread.start()

    def _pump(self, source: Iterator) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put((None, e))

    def __iter__(self):
        return self

    def __next__(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()


def sample_checksum(indices: np.ndarray, epoch: int) -> int:
    """An order-independent fingerprint of (epoch, sequence index) pairs, summed mod 2**61 - 1.

    Two runs with equal checksums trained on the same multiset of samples (up to a 2**-61 chance).
    """
    x = np.asarray(indices, dtype=np.uint64).reshape(-1) + np.full(1, epoch, dtype=np.uint64) * _GOLDEN  # array ops wrap
    # splitmix64 finalizer: spreads every bit of the input over the output
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    x = x ^ (x >> np.uint64(31))
    return int(sum(int(v) % _MERSENNE61 for v in x.tolist()) % _MERSENNE61)


_GOLDEN, _MIX1, _MIX2 = (np.full(1, c, dtype=np.uint64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_MERSENNE61 = 2**61 - 1
