"""Config of the train stage: the model, the optimizer and the distributed run."""

from typing import Literal

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection
from raylm.model.config import PRESETS, GPTConfig, build_config


class ModelConfig(ConfigSection):
    preset: str = "debug"
    """Size preset from raylm.model.config.PRESETS (debug, demo, 10m, 125m, 350m, 1b)."""
    n_layer: int | None = Field(None, ge=1)
    """Overrides the preset's number of blocks."""
    n_head: int | None = Field(None, ge=1)
    """Overrides the preset's number of attention heads."""
    d_model: int | None = Field(None, ge=8)
    """Overrides the preset's width."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    block_size: int | None = Field(None, ge=8)
    """The model's context in tokens; unset: the token data's seq_len. Must be at least that seq_len."""
    positions: Literal["learned", "rotary"] = "learned"
    """Learned position embeddings (GPT-2) or rotary positions (RoPE)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """GELU MLP of width 4d (GPT-2) or SwiGLU of width ~8d/3."""

    @model_validator(mode="after")
    def _known_preset(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        return self

    def gpt_config(self, vocab_size: int, block_size: int) -> GPTConfig:
        """The GPTConfig of this preset and its overrides, for a vocabulary and context; ValueError if inconsistent."""
        return build_config(
            self.preset,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            dropout=self.dropout,
            vocab_size=vocab_size,
            block_size=self.block_size or block_size,
            positions=self.positions,
            mlp=self.mlp,
        )


class OptimizerConfig(ConfigSection):
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The decay ends at lr * min_lr_ratio."""
    decay: Literal["cosine", "linear"] = "cosine"
    """Shape of the decay from the peak after warmup down to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay, applied to matrices only (not to norms, biases)."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 turns clipping off)."""


class LoraConfig(ConfigSection):
    """Low-rank adapters (raylm.model.lora): only they train; the export merges them into the base weights."""

    rank: int = Field(8, ge=1)
    """Rank r of each adapter's A (r x in) and B (out x r)."""
    alpha: float = Field(16.0, gt=0.0)
    """The update B @ A is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input (training only)."""
    targets: tuple[Literal["attn.qkv", "attn.proj", "mlp.fc", "mlp.gate", "mlp.proj"], ...] = (
        "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj",
    )  # fmt: skip
    """The Linear layers of every block that get an adapter (mlp.gate only in a SwiGLU MLP)."""

    @model_validator(mode="after")
    def _some_targets(self):
        if not self.targets:
            raise ValueError("targets needs at least one layer name")
        return self


class TrainConfig(ConfigSection):
    data: str
    """The tokenize stage's output directory."""
    output: str
    """Directory for checkpoints (Ray Train storage), metrics, the loss curve and the exported model (model/)."""
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    init_from: str | None = None
    """Start from a trained model instead of random weights: an exported raylm model directory (model.safetensors,
    config.json, tokenizer.json) or a train stage output (its model/). The model's shape comes from it; the token
    data must be made with its tokenizer."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the (frozen) model instead of all its weights; unset: full fine-tuning."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers: pipeline_stages x data-parallel size."""
    pipeline_stages: int = Field(1, ge=1)
    """DeepSpeed pipeline stages the model is cut into (by parameter count); 1: no pipeline, every worker holds
    the whole model. Pipelines run with ZeRO 0 or 1; num_workers must be a multiple of it."""
    pipeline_placement: Literal["any", "spread"] = "any"
    """Where pipeline stages run: "any" (Ray packs the workers), or "spread": every stage on a node of its own,
    checked inside the workers (a stage sharing a node with another stage is an error)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs each worker reserves from Ray."""
    torch_threads: int | None = Field(None, ge=1)
    """Intra-op threads per CPU worker; unset: cpus_per_worker rounded down (at least 1), so workers do not oversubscribe cores."""
    keep_freed_memory: bool = True
    """CPU workers: glibc's malloc keeps the memory a step frees for the next step instead of handing it back to the
    OS (raylm.train.trainer.KEEP_FREED_MEMORY_ENV). Each step frees and allocates the same large tensors again, and
    memory handed back returns as fresh zeroed pages, one page fault each. Peak resident memory grows by what
    fragmentation holds (about half on the demo model); false: glibc's defaults."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo (and DS_ACCELERATOR=cpu)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states and the update on the host CPU (GPU runs, ZeRO 1-3)."""
    offload_params: bool = False
    """ZeRO-Infinity style parameter offload to host memory (GPU runs, ZeRO 3 only)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, or bf16 / fp16 mixed precision with fp32 master weights (fp16 needs GPUs; bf16 is also fast on recent CPUs)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them:
    activation memory of one block input per layer, for about a third more compute."""
    objective: Literal["causal", "masked"] = "causal"
    """"causal": next-token prediction with causal attention (a GPT that generates); "masked": masked-language
    modelling with bidirectional attention (a BERT-style encoder; it does not generate, so it is not served)."""
    mask_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    """Masked objective: fraction of tokens selected per row (80% become mask_token, 10% a random token, 10% stay)."""
    mask_token: str = "<|mask|>"
    """Masked objective: the tokenizer's mask token; add it to tokenize.special_tokens."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    train_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all workers. Optional: when set, it must equal
    micro_batch_size x grad_accum_steps x data-parallel size, checked before any worker starts."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train for."""
    shuffle: bool = True
    """Shuffle the training sequences globally, a new order every epoch, drawn from run.seed (false: file order)."""
    prefetch_batches: int = Field(4, ge=0)
    """Micro-batches each worker's Ray Data stream reads ahead of the training step."""
    log_interval_steps: int = Field(10, ge=1)
    """Training figures are printed and recorded (history, TensorBoard, Ray gauges) every this many steps, as means
    over the steps since the last: loss, learning rate, gradient norm, tokens/s, MFU, step time and its split, peak memory."""
    eval_interval_steps: int = Field(50, ge=1)
    """Validation loss, perplexity and bits per byte every this many steps (and at the end); each evaluation is
    reported to Ray Train."""
    eval_batches: int = Field(8, ge=1)
    """Micro-batches per worker in one validation pass (the same batches every time)."""
    checkpoint_interval_steps: int = Field(50, ge=1)
    """Save a DeepSpeed checkpoint through ray.train.Checkpoint every this many steps (and at the end)."""
    checkpoint_interval_s: float | None = Field(None, gt=0.0)
    """Also save a checkpoint once this many seconds have passed since the last one (whichever of this and
    checkpoint_interval_steps comes first); rank 0's clock decides for every rank. Unset: by steps only."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Ray Train keeps this many of the latest checkpoints."""
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the exported model's weights (model.safetensors); bfloat16 halves its size."""
    memory_per_worker_gb: float | None = Field(None, gt=0.0)
    """Memory one worker may use (GiB, host RAM on CPU workers, GPU memory on GPU workers): the driver refuses a run
    whose estimate (raylm.train.memory) exceeds it, before any worker starts. Unset: checked against the Ray nodes'
    memory (CPU) or the GPU's memory when known."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train allows after a crash (-1: unlimited); each restart resumes from the latest checkpoint."""
    tensorboard: bool = True
    """Write TensorBoard event files (rank 0) next to the checkpoints."""
    peak_flops_per_worker: float | None = Field(None, gt=0.0)
    """Peak FLOP/s of one worker, the denominator of MFU. Unset: the datasheet dense bf16/fp16 peak of a known GPU
    (bf16/fp16 runs), else the best of a few large matmuls in the training dtype measured on each worker at start."""
    synchronize_timing: bool = False
    """GPU runs: synchronize the device around each forward/backward and optimizer step, so that their times
    (forward_backward_s, optimizer_s) are real, at the cost of the host running ahead of the GPU. Off: GPU runs report
    step time and data wait only. CPU runs always report the split (their work is synchronous)."""

    @model_validator(mode="after")
    def _hardware_fits(self):
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu=true (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
        if (self.offload_optimizer or self.offload_params) and not self.use_gpu:
            raise ValueError("offload_optimizer/offload_params move state from GPU to host memory: they need use_gpu=true")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora with zero_stage 3 is not supported: ZeRO-3 partitions the frozen base weights, which the "
                             "LoRA export does not gather; LoRA's optimizer state is small: use zero_stage 0, 1 or 2")  # fmt: skip
        return self

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks: pipelines of pipeline_stages workers each (num_workers when there is no pipeline)."""
        return max(1, self.num_workers // self.pipeline_stages)

    @property
    def threads_per_worker(self) -> int:
        """Torch intra-op threads for one CPU worker."""
        return self.torch_threads or max(1, int(self.cpus_per_worker))
