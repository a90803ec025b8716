"""Turn a base model into what the method trains: all weights, or a peft adapter."""

from __future__ import annotations

from llamaforge.config import MethodConfig
from llamaforge.train.dropout import use_fast_dropout

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_targets(targets: str | list[str]) -> str | list[str]:
    if targets == "attention":
        return ATTENTION
    if isinstance(targets, str) and targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def attach_method(model, method: MethodConfig, *, gradient_checkpointing: bool = False):
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if method.name == "qlora":
        model = _prepare_4bit(model, gradient_checkpointing)
    if method.name == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM", r=method.rank, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=lora_targets(method.targets), use_rslora=method.rslora,
            use_dora=method.name == "dora", modules_to_save=method.modules_to_save or None,
        )
    model = get_peft_model(model, config)
    use_fast_dropout(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


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
