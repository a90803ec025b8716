"""Turn a base model into what the method trains: all weights, or a peft adapter. The built-in
training methods are registered here (registry.METHODS)."""

from __future__ import annotations

from llamaforge.registry import METHODS, Method
from llamaforge.schema import MethodConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_targets(targets: str | list[str]) -> str | list[str]:
    if targets == "attention":
        return ATTENTION
    if isinstance(targets, str) and targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def attach_method(model, method: MethodConfig, *, gradient_checkpointing: bool = False):
    """The model as the job's method trains it (METHODS: the registered methods)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return METHODS.get(method.name, field="method.name").attach(model, method, gradient_checkpointing)


def with_peft(model, config, gradient_checkpointing: bool):
    """`model` wrapped in a peft adapter of `config`, with the fast dropout; shared by the adapter methods."""
    from peft import get_peft_model

    from llamaforge.train.dropout import (
        use_fast_dropout,  # torch: this module is read when a job is validated
    )

    model = get_peft_model(model, config)
    use_fast_dropout(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def lora_config(method: MethodConfig, *, dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=lora_targets(method.targets),
        use_rslora=method.rslora,
        use_dora=dora,
        modules_to_save=method.modules_to_save or None,
    )


def _full(model, method: MethodConfig, gradient_checkpointing: bool):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(model, method: MethodConfig, gradient_checkpointing: bool):
    return with_peft(model, lora_config(method), gradient_checkpointing)


def _dora(model, method: MethodConfig, gradient_checkpointing: bool):
    return with_peft(model, lora_config(method, dora=True), gradient_checkpointing)


def _qlora(model, method: MethodConfig, gradient_checkpointing: bool):
    return with_peft(
        _prepare_4bit(model, gradient_checkpointing), lora_config(method), gradient_checkpointing
    )


def _prefix(model, method: MethodConfig, gradient_checkpointing: bool):
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    return with_peft(model, config, gradient_checkpointing)


def _prepare_4bit(model, gradient_checkpointing: bool):
    """Freeze the 4-bit base. peft's prepare_model_for_kbit_training also casts the other weights to
    fp32, which must not happen to torchao NF4 weights (it would dequantise them) nor under FSDP /
    ZeRO-3, where a unit's weights must keep the one dtype the 4-bit storage was given."""
    from peft import prepare_model_for_kbit_training

    from llamaforge.models import keep_4bit_gradients_exact, sharded_launch
    from llamaforge.quant_nf4 import is_nf4_model, prepare_nf4_for_training

    keep_4bit_gradients_exact(model)  # again here: a caller may have loaded the model itself
    if is_nf4_model(model):
        return prepare_nf4_for_training(model)
    if sharded_launch():
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


for _method in (
    Method(
        "lora",
        _lora,
        "adapter",
        mergeable=True,
        hot_swappable=True,
        planner="lora",
        description="LoRA adapter on the frozen base",
    ),
    Method(
        "qlora",
        _qlora,
        "adapter",
        mergeable=True,
        hot_swappable=True,
        planner="qlora",
        base_quantization="4bit",
        description="LoRA on a 4-bit NF4 base (bitsandbytes, or torchao where bitsandbytes does not run)",
    ),
    Method(
        "dora",
        _dora,
        "adapter",
        mergeable=True,
        hot_swappable=True,
        planner="lora",
        description="weight-decomposed LoRA (magnitude + direction)",
    ),
    Method(
        "full",
        _full,
        "model",
        mergeable=False,
        hot_swappable=False,
        planner="full",
        quantized_base=False,
        description="every weight trained; the run saves a whole model",
    ),
    Method(
        "prefix",
        _prefix,
        "adapter",
        mergeable=False,
        hot_swappable=False,
        planner="lora",
        modules_to_save=False,
        packing=False,
        description="prefix tuning: virtual tokens through the cache",
    ),
):
    METHODS.register(_method)
