"""The memory lines of `llamaforge train --dry-run`: the planner applied to the job exactly as the
recipe will run it (its method, model dtype, micro-batch, sequence length, precision, gradient
checkpointing and optimizer) on the device it would train on, against that device's free memory.

`llamaforge plan` compares methods and machines; this answers "will this job fit here, now?".
"""

from __future__ import annotations

from llamaforge.errors import ConfigError
from llamaforge.hardware import allocator_in_use
from llamaforge.planning.arch import Arch
from llamaforge.planning.memory import GiB, Setup, estimate, largest_fitting
from llamaforge.planning.plan import available_ram_gib, base_setup
from llamaforge.registry import METHODS


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def job_setup(cfg, device: str, precision: str) -> tuple[Setup, list[str]]:
    """The planner's Setup for the recipe's step, and notes on what it approximates."""
    notes = []
    method = METHODS.get(cfg.method.name).planner
    if method != cfg.method.name:
        notes.append(f"{cfg.method.name} estimated as {method} (the planner's nearest profile)")
    t = cfg.train
    packed = bool(getattr(t, "packing", False))
    seq = (getattr(t, "pack_length", None) or cfg.data.max_length) if packed else cfg.data.max_length
    if not packed:
        notes.append("rows are padded to the longest of their batch: data.max_length is the worst case")
    optimizer = getattr(t, "optimizer", "adamw")
    if optimizer == "sgd":
        notes.append("sgd keeps one state per parameter: about half the optimizer figure")
    # The recipe keeps the job's model.dtype; a 4-bit base has its other weights cast to fp32 (peft).
    dtype = "float32" if method == "qlora" else cfg.model.dtype
    setup = base_setup(cfg, device=device).with_(
        method=method,
        seq=seq,
        weights_dtype=dtype,
        precision=precision,
        optimizer="adamw8bit" if "8bit" in optimizer else "adamw",
        adam_impl="fused" if optimizer == "adamw" else "auto",
        release_memory=getattr(t, "release_memory", "off"),
        allocator=allocator_in_use(getattr(t, "allocator", "system")) if device == "cpu" else "glibc",
    )
    return setup, notes


def device_memory(device) -> tuple[float, str]:
    """(bytes free for training, a description) on the device the job would train on."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, f"{free / GiB:.1f} of {total / GiB:.1f} GiB free on {torch.cuda.get_device_name()}"
    available = available_ram_gib()
    return available * GiB, f"{available:.1f} GiB of RAM available"


def memory_lines(cfg, hf_config) -> list[str]:
    from llamaforge.device import choose_precision, default_device

    device = default_device()
    try:
        choice = choose_precision(cfg.train.precision, device)
    except ConfigError as exc:
        return [f"# memory estimate: none, this job would stop at setup on {device.type}: {exc}"]
    precision = choice.precision
    arch = Arch.from_config(hf_config.to_dict(), name=getattr(hf_config, "name_or_path", "") or "model")
    setup, notes = job_setup(cfg, device.type, precision)
    notes.insert(0, choice.line() + (f"; warning: {choice.warning}" if choice.warning else ""))
    capacity, where = device_memory(device)
    t = cfg.train
    if t.batch_size == "auto":
        from llamaforge.planning.autobatch import choose_batch, micro_tokens_for

        batch = choose_batch(
            arch,
            setup,
            per_device_batch=t.target_effective_batch(),
            budget_bytes=t.memory_fraction * capacity,
            mean_tokens=setup.seq / 2,
            checkpointing=None if t.gradient_checkpointing == "auto" else t.gradient_checkpointing,
            micro_tokens=micro_tokens_for(cfg, device.type),
        )
        setup = setup.with_(batch=batch.micro_batch, checkpointing=batch.checkpointing)
        notes.append(
            f"batch_size auto, planned at rows of data.max_length: {batch.line()}; training decides on "
            "the real lengths"
        )
    est = estimate(arch, setup)
    fits = est.peak <= capacity
    quant = "NF4 + " if setup.method == "qlora" else ""
    lines = [
        f"# memory estimate ({cfg.method.name}, micro-batch {setup.batch} x {setup.seq} tokens, {precision}"
        f"{' autocast' if precision != 'fp32' else ''}, gradient checkpointing "
        f"{'on' if setup.checkpointing else 'off'}, {getattr(cfg.train, 'optimizer', 'adamw')}, on {device.type}):",
        f"#   weights {_gib(est.weights)} GiB ({quant}{setup.weights_dtype}), gradients {_gib(est.gradients)}, "
        f"optimizer {_gib(est.optimizer)}, activations {_gib(est.activations)}, autocast weight copies "
        f"{_gib(est.weight_copies)}, loss-chunk logits {_gib(est.logits)}"
        + (
            f", {'CUDA' if setup.device == 'cuda' else 'allocator'} overhead {_gib(est.overhead)}"
            if est.overhead
            else ""
        ),
        f"#   peak {_gib(est.peak)} GiB (at {est.peak_phase.replace('_', ' ')}); {where}: "
        + ("fits" if fits else "DOES NOT FIT"),
    ]
    if not fits:
        advice = []
        if not setup.checkpointing:
            ckpt = estimate(arch, setup.with_(checkpointing=True)).peak
            advice.append(f"train.gradient_checkpointing=true (peak {_gib(ckpt)} GiB)")
        batch = largest_fitting(arch, setup, capacity, what="batch", limit=setup.batch)
        if batch:
            advice.append(f"train.batch_size={batch} with a larger train.grad_accum")
        if setup.method != "qlora":
            qlora = estimate(arch, setup.with_(method="qlora", weights_dtype="float32")).peak
            advice.append(f"method.name=qlora (peak {_gib(qlora)} GiB)")
        advice = advice or ["a smaller data.max_length; see `llamaforge plan`"]
        lines.append("#   try: " + "; ".join(advice))
    lines += [f"#   note: {n}" for n in notes]
    return lines


def batch_planning_inputs(
    cfg, model, device, precision: str, lengths
) -> tuple[Arch, Setup, float, float, float]:
    """What `batch_size: auto` plans with, for a loaded model and tokenized data: the planner's setup at
    the data's longest row, the memory budget (train.memory_fraction of what this process can have),
    the memory already resident beyond the planner's tensors, and the mean row length."""
    import torch

    from llamaforge.hardware import available_memory_bytes, process_rss_bytes, running_allocator

    lengths = list(lengths)
    arch = Arch.from_config(model.config.to_dict(), name=getattr(model.config, "name_or_path", "") or "model")
    setup, _ = job_setup(cfg, device.type, precision)
    t = cfg.train
    if t.packing:
        seq = t.pack_length or cfg.data.max_length
        mean_tokens = float(seq)  # packed rows run nearly full
    else:
        seq = max(lengths, default=cfg.data.max_length)
        mean_tokens = sum(lengths) / max(1, len(lengths))
    setup = setup.with_(seq=seq, allocator=running_allocator() if device.type == "cpu" else "glibc")
    fraction = t.memory_fraction
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return arch, setup, fraction * free, 0.0, mean_tokens
    rss = process_rss_bytes()
    weights = estimate(arch, setup.with_(batch=1)).weights  # loaded already: in the RSS, counted once
    return arch, setup, fraction * (available_memory_bytes() + rss), max(0.0, rss - weights), mean_tokens
