"""DeepSpeed pipeline parallelism for the GPT of raylm.model.gpt, combined with data parallelism.

The single-device GPT is re-expressed as a flat sequence of DeepSpeed pipeline layers, built from
the same GPTConfig and given the same initial weights as `GPT(cfg)` for the same seed:

    layer 0        TiedLayerSpec "embed": token embedding wte, (B, T) ids -> (B, T, C)
    layer 1        InputPositions: + learned position embedding wpe (none for rotary), dropout
    layers 2..L+1  PipeBlock: one transformer Block each, (B, T, C) -> (B, T, C)
    layer L+2      final LayerNorm ln_f
    layer L+3      TiedLayerSpec "embed" again: the tied lm_head, x @ wte.T -> logits (B, T, V)
    loss           cross-entropy of the logits against the targets, on the last stage

`PipelineModule` cuts the list into `pipeline_stages` contiguous parts of about equal parameter
count (partition_method="parameters"); the first and last stage each hold a copy of wte, and
DeepSpeed all-reduces its gradient between them. World rank = stage * dp_size + dp_rank
(raylm.train.topology), so the stages of one pipeline share a dp_rank and read the same
micro-batches: the first stage uses their inputs, the last stage their targets.

On disk, `engine.save_checkpoint` writes one `layer_NN-model_states.pt` per layer (the tied head
is not written again; it is layer 00's weight); `state_dict_from_checkpoint` turns those files
back into a GPT state dict.
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Iterator

import ray
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from raylm.errors import ConfigError, InputError
from raylm.model.gpt import GPT, Block, GPTConfig, rotary_angles
from raylm.train.config import TrainConfig
from raylm.train.optim import build_optimizer, lr_schedule
from raylm.train.validation import ValidationSet

EMBED_KEY = "embed"
"""TiedLayerSpec key shared by the token embedding (first layer) and the lm_head (last layer)."""
EXTRA_LAYERS = 4
"""Layers besides the blocks: embedding, positions, final norm, head."""
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")


class InputPositions(nn.Module):
    """The rest of GPT's input: + wpe(position) for learned positions (rotary adds nothing here), then dropout."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.size(1), device=x.device))
        return self.drop(x)


class PipeBlock(Block):
    """A transformer Block whose forward takes only the residual stream, as pipeline layers must.

    Rotary angles are recomputed from T in every block: a few hundred flops, cheaper than sending
    them between stages next to the activations.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.rotary = cfg.positions == "rotary"
        self.head_size = cfg.d_model // cfg.n_head
        self.rope_theta = cfg.rope_theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        rope = None
        if self.rotary:
            rope = rotary_angles(torch.arange(x.size(1), device=x.device), self.head_size, self.rope_theta)
        return super().forward(x, None, 0, rope)


def tied_lm_head(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    """The lm_head tied to the token embedding: (B, T, C) -> logits (B, T, V)."""
    return F.linear(x, embedding.weight)


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (-100 ignored), as GPT.forward computes it."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def layer_specs(cfg: GPTConfig) -> list:
    """The GPT as DeepSpeed LayerSpecs, in forward order (see the module docstring for the layout)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # DeepSpeed picks its accelerator on import: only here

    return [
        TiedLayerSpec(EMBED_KEY, nn.Embedding, cfg.vocab_size, cfg.d_model),
        LayerSpec(InputPositions, cfg),
        *(LayerSpec(PipeBlock, cfg) for _ in range(cfg.n_layer)),
        LayerSpec(nn.LayerNorm, cfg.d_model, bias=cfg.bias),
        TiedLayerSpec(EMBED_KEY, nn.Embedding, cfg.vocab_size, cfg.d_model, forward_fn=tied_lm_head),
    ]


def gpt_name(layer: int | str, key: str, cfg: GPTConfig) -> str:
    """The GPT parameter name of `key` in pipeline layer `layer` (an index, or "tied_modules.embed")."""
    if layer == f"tied_modules.{EMBED_KEY}" or layer == 0:
        return f"wte.{key}"
    layer = int(layer)
    if layer == 1:
        return key  # InputPositions.wpe.weight is GPT's wpe.weight
    if 2 <= layer < 2 + cfg.n_layer:
        return f"blocks.{layer - 2}.{key}"
    if layer == 2 + cfg.n_layer:
        return f"ln_f.{key}"
    raise ValueError(f"pipeline layer {layer} holds no GPT parameters (a GPT of {cfg.n_layer} blocks)")


def _module_param_gpt_name(name: str, cfg: GPTConfig) -> str:
    """'tied_modules.embed.weight' or '<layer>.<key>' (PipelineModule's names) -> the GPT name."""
    if name.startswith(f"tied_modules.{EMBED_KEY}."):
        return gpt_name(f"tied_modules.{EMBED_KEY}", name.removeprefix(f"tied_modules.{EMBED_KEY}."), cfg)
    layer, key = name.split(".", 1)
    return gpt_name(int(layer), key, cfg)


def local_layers(cfg: GPTConfig) -> tuple[nn.ModuleDict, list]:
    """All pipeline layers built in this process, without PipelineModule's process groups.

    Returns (the modules, keyed like PipelineModule's parameter names, and the forward functions in
    order): `run_layers(funcs, idx)` is what a pipeline of any number of stages computes.
    """
    from deepspeed.pipe import TiedLayerSpec  # (as in layer_specs)

    modules, funcs = nn.ModuleDict(), []
    tied = nn.ModuleDict()
    for index, spec in enumerate(layer_specs(cfg)):
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
            module = tied[spec.key]
            funcs.append(module if spec.forward_fn is None else functools.partial(spec.forward_fn, module))
        else:
            module = spec.build()
            modules[str(index)] = module
            funcs.append(module)
    modules["tied_modules"] = tied
    return modules, funcs


def run_layers(funcs: list, idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) through every layer in order -> logits (B, T, V)."""
    x = idx
    for f in funcs:
        x = f(x)
    return x


@torch.no_grad()
def load_gpt_weights(module: nn.Module, gpt: GPT) -> None:
    """Copy GPT's weights into the pipeline layers this process holds (a PipelineModule or `local_layers`)."""
    source = dict(gpt.named_parameters())
    for name, param in module.named_parameters():
        param.copy_(source[_module_param_gpt_name(name, gpt.config)])


def check_pipeline(cfg: TrainConfig, gpt: GPTConfig, section: str = "train", distill: bool = False) -> None:
    """ConfigError (one line naming the key) for settings a DeepSpeed pipeline cannot run; driver side."""
    stages = cfg.pipeline_stages
    if stages == 1:
        return
    if cfg.num_workers % stages:
        raise ConfigError(
            f"{section}.num_workers={cfg.num_workers} is not a multiple of {section}.pipeline_stages={stages}"
            " (workers = pipeline stages x data-parallel size)"
        )
    if cfg.zero_stage >= 2:
        raise ConfigError(
            f"{section}.zero_stage={cfg.zero_stage}: DeepSpeed pipeline parallelism ({section}.pipeline_stages={stages})"
            " runs with ZeRO stage 0 or 1 only"
        )
    if cfg.offload_optimizer or cfg.offload_params:
        key = "offload_optimizer" if cfg.offload_optimizer else "offload_params"
        raise ConfigError(f"{section}.{key}: ZeRO-Offload does not combine with {section}.pipeline_stages={stages}")
    if stages > gpt.n_layer + 2:
        raise ConfigError(
            f"{section}.pipeline_stages={stages} exceeds the model's {gpt.n_layer} blocks + embedding + head"
            f" = {gpt.n_layer + 2} stages ({section}.model.n_layer)"
        )
    if distill:
        raise ConfigError(f"{section}.pipeline_stages={stages}: distillation runs without pipeline stages")
    for key in ("lora", "init_from"):  # fine-tuning builds a plain GPT engine
        if getattr(cfg, key, None) is not None:
            raise ConfigError(f"{section}.{key} does not combine with {section}.pipeline_stages={stages} (yet)")


def check_spread_possible(cfg: TrainConfig, section: str = "train") -> None:
    """ConfigError when pipeline_placement=spread asks for more nodes than the connected Ray cluster has."""
    if cfg.pipeline_stages == 1 or cfg.pipeline_placement != "spread":
        return
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cfg.cpus_per_worker]
    if len(nodes) < cfg.pipeline_stages:
        raise ConfigError(
            f"{section}.pipeline_placement=spread: {cfg.pipeline_stages} stages need {cfg.pipeline_stages} nodes"
            f" with at least {cfg.cpus_per_worker:g} CPUs ({section}.cpus_per_worker); the cluster has {len(nodes)}"
        )


def stage_nodes(coords, placement: str) -> list[list[str]]:
    """The Ray node ids each pipeline stage runs on (index: stage), gathered from every rank.

    With placement "spread", two stages sharing a node is a ConfigError (the cluster could not
    give each stage a node of its own).
    """
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    by_stage = [sorted(set(nodes[s * coords.dp_size : (s + 1) * coords.dp_size])) for s in range(coords.pipeline_stages)]
    if placement == "spread":
        for s in range(coords.pipeline_stages):
            for t in range(s):
                shared = set(by_stage[s]) & set(by_stage[t])
                if shared:
                    raise ConfigError(
                        f"train.pipeline_placement=spread: stages {t} and {s} share node {sorted(shared)[0][:12]};"
                        " the cluster needs one node per stage with room for its workers"
                    )
    return by_stage


def short_nodes(placement: dict) -> str:
    """The stage -> nodes map for a log line: each node id cut to 8 hex digits."""
    return " | ".join(f"stage {s}: {','.join(n[:8] for n in nodes)}" for s, nodes in enumerate(placement["pipeline_stage_nodes"]))


def build_pipeline_engine(cfg: TrainConfig, gpt_cfg: GPTConfig, deepspeed_config: dict, seed: int):
    """(DeepSpeed PipelineEngine, its LR scheduler, parameter count of the whole GPT).

    Every rank builds the whole GPT from the seed and copies its stage's part in, so the run starts
    from the weights a plain run of the same seed starts from (raylm.train.engine.build_engine).
    """
    import deepspeed  # picks its accelerator on import: in the workers, after DS_ACCELERATOR is set
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    torch.manual_seed(seed)
    reference = GPT(gpt_cfg)
    num_params = reference.num_params(non_embedding=False)
    checkpointing = {}
    if cfg.activation_checkpointing:
        # torch's non-reentrant checkpoint, one block at a time: DeepSpeed's default reentrant
        # function needs inputs that require grad and DeepSpeed's own RNG tracker.
        checkpointing = dict(
            activation_checkpoint_interval=1,
            activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
            checkpointable_layers=[PipeBlock.__name__],
        )
    module = PipelineModule(
        layers=layer_specs(gpt_cfg),
        num_stages=cfg.pipeline_stages,
        loss_fn=pipeline_loss,
        partition_method="parameters",
        **checkpointing,
    )
    load_gpt_weights(module, reference)
    del reference
    optimizer = build_optimizer(module, cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg), config=deepspeed_config
    )
    return engine, scheduler, num_params


class PipelineFeed:
    """The iterator `engine.train_batch` pulls a step's micro-batches from: (inputs (B, T), targets (B, T)).

    Only the first and last stage pull. The first stage also adds each micro-batch to the sample
    checksum; the last stage reads the same samples, so it only moves its data position.
    """

    def __init__(self, batches: Iterator, data, window, objective, coords):
        self.batches, self.data, self.window, self.objective, self.coords = batches, data, window, objective, coords
        self.step = self.micro = 0

    def for_step(self, step: int) -> "PipelineFeed":
        self.step, self.micro = step, 0
        return self

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        waited = time.perf_counter()
        tokens, indices, position, *loss_mask = next(self.batches)
        self.window.data_wait += time.perf_counter() - waited
        if self.coords.first_stage:
            self.data.consume(indices, position)
        else:
            self.data.position = position
        # dp_rank, not the world rank: both ends of one pipeline must draw the same (masked) pairs
        mask = loss_mask[0] if loss_mask else None  # SFT data: only completion tokens are targets
        inputs, targets = self.objective.train_pair(tokens, self.coords.dp_rank, self.step, self.micro, loss_mask=mask)
        self.micro += 1
        return inputs, targets


def reads_data(coords) -> bool:
    """Whether this stage reads micro-batches (the first its inputs, the last its targets)."""
    return coords.first_stage or coords.last_stage


@torch.no_grad()
def evaluate_pipeline(engine, validation: ValidationSet, objective) -> float:
    """Mean cross-entropy per target token over every pipeline's validation batches (engine.eval_batch)."""
    pairs = validation.pairs(objective, engine.grid.data_parallel_id)
    # The stages agreed on the training activation shape once; validation rows may differ in count.
    engine.reset_activation_shape()
    losses = engine.eval_batch(iter(pairs), reduce_output=None, bcast_loss=False, num_micro_batches=len(pairs))
    engine.reset_activation_shape()
    device = validation.batches[0].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens), last stage only
    if engine.is_last_stage():
        for loss, (_, targets) in zip(losses, pairs):
            tokens = int((targets != -100).sum())
            if tokens:
                totals += torch.tensor([float(loss) * tokens, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    engine.train()
    return float(totals[0] / totals[1])


def full_state_dict(engine, cfg: GPTConfig) -> dict[str, torch.Tensor] | None:
    """The whole GPT's fp32 weights on world rank 0 (None elsewhere), gathered from every stage.

    Within a stage, `safe_get_full_fp32_param` assembles each parameter from the ZeRO-1 / bf16
    optimizer's fp32 master copy (a collective over the stage's data-parallel group); each stage's
    dp_rank 0 then sends its part to rank 0. The tied embedding is taken from stage 0.
    """
    from deepspeed.utils import safe_get_full_fp32_param  # in the workers only, after DS_ACCELERATOR is set

    part = {}
    for name, param in engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None:  # ZeRO 0 in fp32: the module holds the whole fp32 weight itself
            value = param.detach()
        part[_module_param_gpt_name(name, cfg)] = value.detach().float().cpu().clone()
    sends = engine.grid.data_parallel_id == 0
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part if sends else None, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    full = {}
    for p in parts:  # rank order is stage order: stage 0's wte wins
        for name, value in (p or {}).items():
            full.setdefault(name, value)
    return full


@torch.no_grad()
def probe_logits(engine, probe: torch.Tensor) -> torch.Tensor | None:
    """The engine's logits (1, T, V) on one probe row, on world rank 0 (None elsewhere)."""
    engine.reset_activation_shape()
    # compute_loss=False would add the logits to the engine's running loss; a loss against the probe itself is harmless
    _, logits = engine.eval_batch(
        iter([(probe, probe)]), return_logits=True, reduce_output=None, bcast_loss=False, num_micro_batches=1
    )
    engine.reset_activation_shape()
    engine.train()
    src = engine.grid.stage_to_global(engine.num_stages - 1, data=0)  # the last stage of pipeline 0
    rank = dist.get_rank()
    if rank == src == 0:
        return logits.float().cpu()
    if rank == src:
        dist.send(logits.float().contiguous(), dst=0)
    elif rank == 0:
        vocab = engine.module.tied_modules[EMBED_KEY].num_embeddings
        out = torch.empty(probe.size(0), probe.size(1), vocab, device=probe.device)  # (1, T, V)
        dist.recv(out, src=src)
        return out.cpu()
    return None


def _checkpoint_tag_dir(deepspeed_dir: Path, tag: str | None) -> Path:
    if tag is None:
        latest = deepspeed_dir / "latest"
        if not latest.is_file():
            raise InputError(f"{latest}: no 'latest' file in the DeepSpeed checkpoint directory; pass a tag")
        tag = latest.read_text().strip()
    directory = deepspeed_dir / tag
    if not directory.is_dir():
        raise InputError(f"{directory}: no such DeepSpeed checkpoint tag directory")
    return directory


def state_dict_from_checkpoint(deepspeed_dir: str | Path, cfg: GPTConfig, tag: str | None = None) -> dict[str, torch.Tensor]:
    """A GPT state dict (fp32, `GPT(cfg).load_state_dict` strict) from a pipeline checkpoint on disk.

    Reads the `layer_NN-model_states.pt` files of `tag` (default: the one `latest` names) with
    torch.load(weights_only=True): tensors only, never pickled code. They hold the module's
    weights: exactly the trained fp32 weights in an fp32 run, their bf16 copy in a bf16 run.
    """
    directory = _checkpoint_tag_dir(Path(deepspeed_dir), tag)
    files = sorted(p for p in directory.iterdir() if _LAYER_FILE.search(p.name))
    if not files:
        raise InputError(f"{directory}: no layer_*-model_states.pt files (not a pipeline checkpoint)")
    state = {}
    for path in files:
        layer = int(_LAYER_FILE.search(path.name).group(1))
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{path}: unreadable layer file ({type(e).__name__}: {e})") from None
        for key, value in weights.items():
            try:
                name = gpt_name(layer, key, cfg)
            except ValueError as e:
                raise InputError(f"{path}: {e}") from None
            state[name] = value.float()
    expected = set(GPT(cfg).state_dict())
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # tied
    missing = sorted(expected - set(state))
    if missing:
        raise InputError(f"{directory}: parameters missing from the layer files: {missing}")
    unknown = sorted(set(state) - expected)
    if unknown:
        raise InputError(f"{directory}: layer files hold parameters this GPT config has not: {unknown}")
    return state
