"""Distill: train a smaller student against a frozen teacher, on the train stage's Ray Train + DeepSpeed loop.

The loop is raylm.train's; only the loss differs. `DistillationLoss` is a loss hook that each
worker builds once: it loads the teacher (frozen, eval mode, no gradients) and returns

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, data)

(Hinton et al. 2015; the T^2 keeps the soft-target gradients on the scale of the hard ones).
Validation measures the student's plain cross-entropy, so its perplexity compares with the
teacher's. The student takes the teacher's vocabulary and block size.

    <distill.output>/model/     the exported student (raylm-gpt), loadable by evaluate and serve
    <distill.output>/metrics.json, loss_curve.png, ray/, manifest.json   as for train
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from raylm.artifacts import stage_output
from raylm.compress.config import DistillConfig
from raylm.context import RunContext
from raylm.errors import ConfigError, InputError
from raylm.model.artifact import TOKENIZER, load_model, read_model_meta
from raylm.model.config import GPTConfig
from raylm.storage import join
from raylm.tokenize.shards import check_same_tokenizer, read_token_meta
from raylm.train.config import TrainConfig
from raylm.train.trainer import build_trainer, fit_to_output, ray_storage, stage_config


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for logits (B, T, V) and targets (B, T); kl and ce are per-token means, computed in fp32."""
    vocab = student_logits.size(-1)
    student = student_logits.float().reshape(-1, vocab)  # (B*T, V)
    teacher = teacher_logits.float().reshape(-1, vocab)
    ce = F.cross_entropy(student, targets.reshape(-1))
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",  # sum over the vocabulary, mean over tokens
    )
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, kl, ce


@dataclass(frozen=True)
class DistillationLoss:
    """Loss hook for raylm.train.loop: the teacher is loaded in each worker by `build`."""

    teacher: str
    """Exported teacher model directory (an absolute path: workers may run elsewhere)."""
    temperature: float
    alpha: float

    def build(self, device: torch.device, dtype: torch.dtype):
        teacher = load_model(self.teacher, device=device).model.to(dtype).eval().requires_grad_(False)

        def loss_fn(engine, inputs: torch.Tensor, targets: torch.Tensor):
            with torch.no_grad():
                teacher_logits, _ = teacher(inputs)  # (B, T, V)
            student_logits, _ = engine(inputs)
            loss, kl, ce = distillation_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)
            return loss, {"kl": kl, "ce": ce}

        return loss_fn


def student_train_config(dc: DistillConfig) -> TrainConfig:
    """The TrainConfig the shared loop runs for the student, from the distill section."""
    try:
        return TrainConfig(
            data=dc.data,
            output=dc.output,
            model=dc.student,
            optimizer=dc.optimizer,
            num_workers=dc.num_workers,
            cpus_per_worker=dc.cpus_per_worker,
            use_gpu=dc.use_gpu,
            zero_stage=dc.zero_stage,
            precision=dc.precision,
            micro_batch_size=dc.micro_batch_size,
            grad_accum_steps=dc.grad_accum_steps,
            max_steps=dc.max_steps,
            log_interval_steps=dc.log_interval_steps,
            eval_interval_steps=dc.eval_interval_steps,
            eval_batches=dc.eval_batches,
            checkpoint_interval_steps=dc.checkpoint_interval_steps,
            max_failures=dc.max_failures,
        )
    except ValidationError as e:
        raise ConfigError(f"distill: {e.errors()[0]['msg']}") from None


def student_model_config(dc: DistillConfig, teacher: GPTConfig) -> GPTConfig:
    """The student's GPTConfig: its own size preset, the teacher's vocabulary and block size."""
    try:
        return dc.student.gpt_config(vocab_size=teacher.vocab_size, block_size=teacher.block_size)
    except ValueError as e:
        raise ConfigError(f"distill.student: {e}") from None


def _check_teacher(dc: DistillConfig, teacher: GPTConfig) -> None:
    meta = read_token_meta(dc.data)
    check_same_tokenizer(meta, join(dc.teacher, TOKENIZER), "the teacher")
    if teacher.vocab_size < meta.vocab_size:
        raise InputError(
            f"{dc.teacher}: teacher vocab_size {teacher.vocab_size} < the token data's {meta.vocab_size} ({dc.data})"
        )
    if teacher.block_size < meta.seq_len:
        raise InputError(
            f"{dc.teacher}: teacher block_size {teacher.block_size} < the token data's seq_len {meta.seq_len}"
        )


def run_distill(dc: DistillConfig, ctx: RunContext) -> dict:
    """The distill stage: train `dc.student` against `dc.teacher`; export `<distill.output>/model`."""
    teacher_meta = read_model_meta(dc.teacher)
    if teacher_meta.get("quantization"):
        raise InputError(f"{dc.teacher}: a quantized model cannot teach; point distill.teacher at a float model")
    teacher = GPTConfig.from_dict(teacher_meta["model"])
    train_cfg = student_train_config(dc)
    _check_teacher(dc, teacher)
    student = student_model_config(dc, teacher)
    run_name = f"{ctx.name}-distill"
    inputs = [dc.teacher, dc.data]
    with stage_output(dc.output, "distill", stage_config(dc, ctx.seed), inputs, ctx.overwrite) as out:
        if out.done:
            return {**out.manifest.get("stats", {}), "output": out.path}
        run_storage = ray_storage(dc.output, out.manifest["fingerprint"])
        teacher_dir = ctx.path(dc.teacher)
        trainer = build_trainer(
            train_cfg,
            run_name=run_name,
            storage_path=run_storage,
            seed=ctx.seed,
            model=student,
            loss_hook=DistillationLoss(teacher_dir, dc.temperature, dc.alpha),
            export_extra={"distilled_from": teacher_dir, "temperature": dc.temperature, "alpha": dc.alpha},
            section="distill",
            reads=[teacher_dir],
        )
        title = f"{run_name}: student {dc.student.preset} from teacher {teacher.n_layer}x{teacher.d_model}"
        extra = {"teacher": dc.teacher, "teacher_params": teacher_meta.get("num_params")}
        summary = fit_to_output(trainer, out, run_storage=run_storage, run_name=run_name, title=title, extra=extra)
        out.stats = summary
    return summary
