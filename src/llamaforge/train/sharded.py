"""Sharded training (FSDP2, DeepSpeed ZeRO-3): shard on CPU, gather for evaluation and saving.

accelerate 1.15 applies FSDP only to GPU-like launches: `AcceleratorState.__init__` (accelerate/
state.py, the `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch) is the only
place that turns `ACCELERATE_USE_FSDP=true` into `DistributedType.FSDP`, and `MULTI_CPU` is not in
that list, so a CPU launch asking for FSDP silently trains with DDP. DeepSpeed is skipped the same
way (`... ACCELERATE_USE_DEEPSPEED ... and not cpu`). On CPU llamaforge therefore shards the model
itself with torch's FSDP2 (`fully_shard`, one unit per decoder layer plus the root), the same
layout accelerate builds on GPUs, and the rest of the recipe sees one interface for both:

- `prepare_training`: shard (or let accelerate wrap) the loss module and the optimizer;
- `full_weights`: the root unit's weights gathered while evaluation or generation runs outside the
  wrapped forward (every process takes part: the decoder layers gather in their own hooks);
- `gather_model_state` / `gather_optimizer_state`: the full state on rank 0 for saving, through
  torch.distributed.checkpoint's state-dict API (FSDP) or accelerate's (ZeRO-3);
- `load_full_state`: a saved full state back into the shards on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llamaforge.errors import ConfigError

log = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """The launch asked for FSDP (`accelerate launch --use_fsdp`, an FSDP config file, or the variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """The launch asked for DeepSpeed (`accelerate launch --use_deepspeed`, a DeepSpeed config file)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )


def _layer_classes(model: nn.Module) -> set[str]:
    """The decoder-layer classes that become FSDP units: the launch's FSDP_TRANSFORMER_CLS_TO_WRAP,
    or the model's own `_no_split_modules` (LlamaDecoderLayer for Llama)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    if named:
        return {c.strip() for c in named.split(",") if c.strip()}
    for module in model.modules():
        if getattr(module, "_no_split_modules", None):
            return set(module._no_split_modules)
    raise ConfigError("FSDP: set FSDP_TRANSFORMER_CLS_TO_WRAP (the decoder layer class of this model)")


def shard_on_cpu(world: int, loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """FSDP2 over the launch's processes on CPU (gloo): one unit per decoder layer, the loss module
    as root (it holds the embeddings, final norm and head). The optimizer was built on the plain
    parameters; `fully_shard` replaces them with sharded ones, so its groups are pointed at those
    (its state is still empty)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    quantized = [
        (n, type(p.data).__name__)
        for n, p in loss_module.named_parameters()
        if type(p.data) is not torch.Tensor
    ]
    if quantized:
        name, kind = quantized[0]
        raise ConfigError(
            f"QLoRA + FSDP on CPU: {name} is a quantized weight ({kind}). "
            "The 4-bit FSDP recipe needs CUDA GPUs (bitsandbytes with bnb_4bit_quant_storage=bfloat16, "
            "examples/accelerate/fsdp_qlora.yaml); torchao's NF4 tensor is not set up for sharding here. "
            "On CPU, shard LoRA or full fine-tuning of an unquantized model"
        )
    names = {id(p): n for n, p in loss_module.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    classes = _layer_classes(loss_module)
    layers = [m for m in loss_module.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(f"FSDP: no module of class {sorted(classes)} in the model to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(loss_module, mesh=mesh, reshard_after_forward=reshard)
    sharded = dict(loss_module.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    # The root is the module whose forward runs first (FSDP2 picks it lazily); evaluation may run
    # before any training forward and would make a decoder layer the root, so name it now.
    loss_module._get_fsdp_state()._lazy_init()
    return loss_module


# DeepSpeed config key -> the job field it must equal
DEEPSPEED_FIELDS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.batch_size x train.grad_accum x processes",
    "gradient_clipping": "train.max_grad_norm",
}


def reconcile_deepspeed(ds_config: dict, train, world: int, *, resume: bool = False) -> dict:
    """Fill the DeepSpeed config's "auto" (or missing) batch settings from the job, and refuse, before
    anything is loaded onto the devices, any it sets to something else.

    accelerate 1.15 tells DeepSpeed's engine that every backward ends an accumulation window
    (`DeepSpeedEngineWrapper.backward` passes `sync_gradients`, which this loop never lowers), so the
    engine would step its optimizer at every micro-batch: accumulation must be 1 under DeepSpeed.
    """
    if train.grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum={train.grad_accum} under DeepSpeed: accelerate steps DeepSpeed's optimizer "
            "at every backward, so accumulation would silently become 1. Set train.grad_accum=1 and raise "
            "train.batch_size or the process count for the same global batch"
        )
    if resume:
        raise ConfigError(
            "--resume under DeepSpeed: llamaforge's checkpoints hold the whole trainable weights but "
            "DeepSpeed partitions the optimizer states over the processes, so a resume would not repeat "
            "the run; restart it, or resume with FSDP or DDP"
        )
    want = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in want.items():
        have = ds_config.get(key, "auto")
        if have in (None, "auto"):
            ds_config[key] = value
        elif float(have) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={have} but the job has {DEEPSPEED_FIELDS[key]}={value}: "
                f"make them equal, or set {key}: auto in the DeepSpeed config to take the job's"
            )
    return ds_config


def prepare_training(
    accelerator,
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    train,
    *,
    precision: str,
    resume: bool = False,
):
    """What `accelerator.prepare(loss_module, optimizer)` does, plus FSDP on CPU (see the module doc)
    and the DeepSpeed config checked against the job (`train`: the job's train section; `precision`:
    the run's resolved one, which the recipe applies itself, train/amp.py)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        reconcile_deepspeed(
            accelerator.state.deepspeed_plugin.deepspeed_config,
            train,
            accelerator.num_processes,
            resume=resume,
        )
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config "
            "(examples/accelerate/fsdp.yaml), so evaluation, checkpoints and the final save can gather "
            "the sharded weights through torch.distributed.checkpoint"
        )
    if deepspeed_requested() and kind != DistributedType.DEEPSPEED:
        raise ConfigError(
            f"the launch asks for DeepSpeed but accelerate set up {kind.value}: accelerate 1.15 runs DeepSpeed "
            "only on GPUs (a CPU launch would silently train with DDP). On CPU use FSDP "
            "(ACCELERATE_USE_FSDP=true) or plain torchrun"
        )
    if fsdp_requested() and kind == DistributedType.MULTI_CPU:
        if precision != "fp32":
            raise ConfigError(
                f"FSDP on CPU: train.precision resolved to {precision}; use train.precision=fp32 "
                "(no CPU mixed precision with FSDP2 here)"
            )
        log.info("FSDP on CPU: sharding with torch fully_shard over %d processes", accelerator.num_processes)
        return shard_on_cpu(accelerator.num_processes, loss_module, optimizer), optimizer
    return accelerator.prepare(loss_module, optimizer)


@contextmanager
def full_weights(wrapped: nn.Module) -> Iterator[None]:
    """The root unit's weights whole while code outside the wrapped forward (evaluation, generation)
    runs the model; every process must enter it, in the same order. A no-op unless FSDP-sharded."""
    if not is_fsdp(wrapped):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def _is_adapter(model: nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def gather_model_state(accelerator, wrapped: nn.Module, model: nn.Module) -> dict | None:
    """The full state dict of `model` on rank 0 (other ranks: an empty dict), or None when the
    weights are not sharded and `model` can save itself. A collective: every process calls it.

    For an adapter only the trainable weights are gathered (a 70B base is never collected)."""
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=_is_adapter(model)
        )
        return get_model_state_dict(model, options=options)
    if is_zero3(accelerator):
        state = accelerator.get_state_dict(wrapped)  # gathers the ZeRO-3 partitions (16-bit) on rank 0
        return {k.removeprefix("model."): v for k, v in state.items()} if accelerator.is_main_process else {}
    return None


def gather_trainable(accelerator, wrapped: nn.Module, model: nn.Module) -> dict | None:
    """The trainable weights, whole, on rank 0 (the checkpoint's `trainable.safetensors`)."""
    if not is_fsdp(wrapped) and not is_zero3(accelerator):
        return None
    state = gather_model_state(accelerator, wrapped, model) or {}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.contiguous() for k, v in state.items() if k in trainable}


def gather_optimizer_state(wrapped: nn.Module, model: nn.Module, optimizer) -> dict | None:
    """The optimizer state keyed by parameter name, whole, on rank 0; None when not FSDP-sharded."""
    if not is_fsdp(wrapped):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_weights(model: nn.Module, weights: dict) -> None:
    """Saved whole (trainable) weights into an FSDP-sharded model; each process keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, weights, options=options)
    if result.unexpected_keys:
        raise ValueError(
            f"weights do not match the model: unknown tensors {sorted(result.unexpected_keys)[:3]}"
        )


def load_full_state(model: nn.Module, optimizer, optimizer_state: dict) -> None:
    """A saved whole optimizer state (keyed by parameter name) into the shards' optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
    )


def gathered(method):
    """Decorator for a recipe method that runs the model outside the wrapped forward (evaluation,
    generation samples): the method runs inside `full_weights(self.train_loss)`."""
    from functools import wraps

    @wraps(method)
    def run(self, *args, **kwargs):
        wrapped = getattr(self, "train_loss", None)
        if wrapped is None:
            return method(self, *args, **kwargs)
        with full_weights(wrapped):
            return method(self, *args, **kwargs)

    return run


def save_gathered(accelerator, wrapped: nn.Module, model: nn.Module, optimizer) -> dict:
    """The keyword arguments checkpoint.save_checkpoint takes for a sharded run (empty otherwise):
    the trainable weights and the optimizer state, gathered whole. Every process calls it."""
    weights = gather_trainable(accelerator, wrapped, model)
    if weights is None:
        return {}
    return {"weights": weights, "optimizer_state": gather_optimizer_state(wrapped, model, optimizer)}
