"""The DeepSpeed JSON config, derived from TrainConfig in one place.

Nothing else in raylm writes DeepSpeed settings: the driver calls `deepspeed_config`
once (which also checks the batch arithmetic before any worker starts) and hands the
dict to every worker, which passes it to `deepspeed.initialize` unchanged.
"""

from __future__ import annotations

from raylm.errors import ConfigError
from raylm.train.config import TrainConfig

# DeepSpeed prints its own step lines every `steps_per_print` steps; raylm prints its own.
_QUIET_STEPS = 1_000_000_000


def check_batch_arithmetic(cfg: TrainConfig, data_parallel_size: int, section: str = "train") -> int:
    """Sequences per optimizer step (micro_batch_size x grad_accum_steps x data-parallel size).

    Raises ConfigError when `train_batch_size` is set and disagrees, naming every factor.
    """
    if data_parallel_size < 1:
        raise ConfigError(f"{section}: data-parallel size must be at least 1, got {data_parallel_size}")
    product = cfg.micro_batch_size * cfg.grad_accum_steps * data_parallel_size
    if cfg.train_batch_size is not None and cfg.train_batch_size != product:
        # under pipeline parallelism the stages of one pipeline share their batch: dp = workers / stages
        dp = f" (num_workers {cfg.num_workers} / pipeline_stages {cfg.pipeline_stages})" if cfg.pipeline_stages > 1 else ""
        raise ConfigError(
            f"{section}.train_batch_size={cfg.train_batch_size} != micro_batch_size {cfg.micro_batch_size}"
            f" x grad_accum_steps {cfg.grad_accum_steps} x data-parallel size {data_parallel_size}{dp} = {product}"
        )
    return product


def effective_zero_stage(cfg: TrainConfig, data_parallel_size: int) -> int:
    """The ZeRO stage a run uses: `zero_stage`, except that ZeRO 1 and 2 with one data-parallel rank run as ZeRO 0.

    Stages 1 and 2 partition optimizer states and gradients across the data-parallel ranks; with one
    rank they partition nothing, while DeepSpeed's ZeRO optimizer still copies every gradient into
    its flat buffers (benchmarks/bench_train.py measured a 1-worker run at 0.83-0.86 of a bare loop
    at ZeRO 1 against 0.87-0.95 at ZeRO 0). Kept as asked: optimizer offload (a ZeRO feature) and
    pipelines. A checkpoint then has ZeRO 0's layout, so resuming it with more workers (ZeRO 1
    partitions) is not possible; exporting it is.
    """
    if (
        data_parallel_size == 1
        and cfg.zero_stage in (1, 2)
        and not cfg.offload_optimizer
        and cfg.pipeline_stages == 1
    ):
        return 0
    return cfg.zero_stage


def deepspeed_config(cfg: TrainConfig, data_parallel_size: int, section: str = "train") -> dict:
    """The config dict for `deepspeed.initialize(config=...)`, for `data_parallel_size` ranks.

    The optimizer and LR schedule are built by raylm (torch AdamW, warmup + cosine) and handed
    to DeepSpeed as objects, so this dict holds batch sizes, precision, clipping and ZeRO only.
    """
    train_batch = check_batch_arithmetic(cfg, data_parallel_size, section)
    stage = effective_zero_stage(cfg, data_parallel_size)
    zero: dict = {"stage": stage}
    if stage >= 1:
        # Overlapping reduction with backward helps on GPUs; with gloo on a CPU it only adds buffers.
        zero["overlap_comm"] = cfg.use_gpu
        zero["contiguous_gradients"] = True
    if stage == 3:
        # Lets rank 0 gather the full 16-bit weights into one state dict (engine.save_16bit_model).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        # raylm passes torch AdamW (DeepSpeedCPUAdam when offloading); DeepSpeed asks for this flag
        # before it lets ZeRO wrap an optimizer it did not build itself.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "fp16":
        # Dynamic loss scaling from 2^16, halving on overflow.
        config["fp16"].update(
            loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1
        )
    return config
