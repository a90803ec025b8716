"""Peak memory of one training step per device, for full fine-tuning, LoRA and QLoRA.

The step is the plain one of our recipe: forward under bf16 autocast, a fused chunked cross-entropy
(each chunk of `loss_chunk` tokens has its gradient computed in forward, so only one chunk's logits
live at a time and none in backward), backward, gradient clipping, AdamW step, `zero_grad(set_to_none=True)`. The peak is the
largest of four moments of a steady-state step (optimizer state already allocated):

    forward end     static + weight copies + saved activations + loss-chunk forward (+ lm_head grad)
    backward start  static + weight copies + saved activations (+ lm_head grad)
    backward end    static + gradients (+ the dense embedding gradient added into a tied lm_head's)
    optimizer step  static + gradients + AdamW temporaries

static = weights + optimizer state (+ DDP buckets); weight copies = the bf16 casts autocast makes of
fp32 weights, which autograd keeps for backward. Between the two ends of backward, memory moves
linearly layer by layer (activations freed, gradients added), so the peak is at one end.
With gradient checkpointing each layer keeps only its input, and backward re-runs one layer at a
time (its activations and weight copies come back for that layer only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llamaforge.planning.activations import Precision, checkpointed_layer_bytes, final_bytes, layer_bytes
from llamaforge.planning.arch import Arch

GiB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks
NF4_BYTES_NO_DQ = 0.5 + 4 / 64
ADAM8BIT_BYTES = 2 + 2 * 4 / 256  # two 8-bit states + fp32 absmax per 256-block each (bitsandbytes)
CUDA_CONTEXT = 0.6 * GiB  # CUDA context + cuBLAS workspace with torch 2.x lazy module loading
NCCL_BUFFERS = 0.5 * GiB  # communicator buffers when more than one process
FRAGMENTATION = 1.05  # caching allocator: reserved / allocated at peak
# CPU (glibc malloc): (peak RSS - what was resident before) / the step's planned tensor peak, by
# train.release_memory, measured on the quickstart's worst micro-batch (SmolLM2-135M LoRA, fp32, 4 x 377
# tokens, AMD EPYC, planned 3.28 GB): the heap keeps freed activations' holes within a step ("step":
# 6.09 GB after one step; "off" the same, then it grows: 9.0 GB after two), while "eager" maps the large
# blocks on their own and unmaps them when freed (4.1 GB after one step).
# jemalloc (train.allocator auto when installed): the whole quickstart (23 steps of micro-batch 4, rows up to
# 384 tokens, planned 3.05 GiB of tensors) peaked at 4.01 GiB, ~1.0 GiB of it resident before training (the
# model and libraries: `generate` alone peaks at 1.03 GiB): (4.01 - 1.0) / 3.05 = 0.99;
# 1.1 leaves room for the freed extents jemalloc keeps for its decay time (10 s) before returning them.
CPU_SLACK = {"eager": 1.2, "step": 1.8, "off": 2.7, "jemalloc": 1.1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "fsdp", "zero3")


@dataclass(frozen=True)
class Setup:
    method: str = "lora"  # full | lora | qlora | dora
    batch: int = 4  # micro-batch per device
    seq: int = 1024
    checkpointing: bool = False
    loss_chunk: int = 1024
    weights_dtype: str = "float32"  # base weights (full: the master weights that AdamW updates)
    precision: str = "bf16"  # bf16 | fp16 (autocast) | fp32
    rank: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.05
    optimizer: str = "adamw"  # adamw | adamw8bit
    device: str = "cuda"  # cuda | cpu
    adam_impl: str = (
        "auto"  # auto (cpu: single-tensor, cuda: foreach, torch's defaults) | single | foreach | fused
    )
    double_quant: bool = True
    modules_to_save: tuple[str, ...] = ()
    objective: str = "sft"  # sft | dpo | kto | orpo (method.objective)
    precompute_reference: bool = False
    release_memory: str = "off"  # train.release_memory: the CPU allocator's slack (CPU_SLACK)
    allocator: str = "glibc"  # glibc | jemalloc (train.allocator, hardware.allocator_in_use)

    @property
    def tokens(self) -> int:
        """Tokens the step trains on (backward): a DPO/ORPO row is two sequences, chosen and rejected."""
        return self.batch * self.seq * objective_passes(self.objective, self.precompute_reference)[0]

    @property
    def forward_only_tokens(self) -> int:
        """Tokens run forward without backward in one pass: the reference (the adapter-disabled base)
        on both answers of a DPO row, and for KTO each of the reference, its KL batch and the policy's
        KL estimate, one micro-batch at a time."""
        trained, extra = objective_passes(self.objective, self.precompute_reference)
        return self.batch * self.seq * (trained if extra else 0)

    def prec(self) -> Precision:
        autocast = self.precision in ("bf16", "fp16")
        return Precision(DTYPE_BYTES[self.weights_dtype], 2 if autocast else 4, autocast, self.device)

    def with_(self, **changes) -> Setup:
        return Setup(**{**asdict(self), **changes})


@dataclass
class Estimate:
    """Bytes per device. `peak` is the number to compare with free memory (overhead included)."""

    weights: float
    trainable_params: int
    gradients: float
    optimizer: float
    weight_copies: float
    activations: float
    logits: float
    optimizer_temp: float
    overhead: float
    phases: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    peak_phase: str = ""


def objective_passes(objective: str, precompute_reference: bool = False) -> tuple[int, int]:
    """(sequences per row trained with backward, forward-only passes per row) of a training objective
    (train/preference.py): DPO trains chosen and rejected and runs the reference on both; ORPO has no
    reference; KTO trains one completion and runs its reference, the mismatched-pair KL batch through
    the policy (no grad) and through the reference. Precomputed references leave only the KL policy pass."""
    if objective == "dpo":
        return 2, 0 if precompute_reference else 2
    if objective == "orpo":
        return 2, 0
    if objective == "kto":
        return 1, 1 if precompute_reference else 3
    return 1, 0


def _targets(setup: Setup):
    return list(setup.targets) if isinstance(setup.targets, tuple) else setup.targets


def param_groups(arch: Arch, setup: Setup) -> dict[str, float]:
    """Bytes of stored weights (frozen and trainable) and the trainable parameter count."""
    wb = DTYPE_BYTES[setup.weights_dtype]
    extra = arch.embed_params + arch.lm_head_params + arch.layers * 2 * arch.hidden + arch.hidden
    adapters = 0
    if setup.method != "full":
        adapters = arch.lora_params(setup.rank, _targets(setup), dora=setup.method == "dora")
    saved = sum(
        arch.embed_params if m == "embed_tokens" else arch.vocab * arch.hidden
        for m in setup.modules_to_save
        if m in ("embed_tokens", "lm_head")
    )
    quantized = 0.0
    if setup.method == "full":
        frozen_plain = 0
    elif setup.method == "qlora":
        quantized = arch.decoder_linear_params * (NF4_BYTES if setup.double_quant else NF4_BYTES_NO_DQ)
        frozen_plain = extra
    else:
        frozen_plain = arch.total_params
    trainable = arch.total_params if setup.method == "full" else adapters + saved
    # peft keeps adapters in fp32 (autocast_adapter_dtype); modules_to_save are copies in the base dtype.
    trainable_bytes = trainable * wb if setup.method == "full" else adapters * 4 + saved * wb
    return {
        "frozen_bytes": quantized + frozen_plain * wb,
        "quantized_bytes": quantized,
        "frozen_plain": frozen_plain,
        "trainable_bytes": trainable_bytes,
        "weights": quantized + frozen_plain * wb + trainable_bytes,
        "adapters": adapters,
        "saved": saved,
        "trainable": trainable,
    }


def _grad_bytes(setup: Setup, groups: dict) -> float:
    return groups["trainable_bytes"]  # gradients and AdamW states take the parameter's dtype


def _optimizer_bytes(setup: Setup, groups: dict) -> float:
    if setup.optimizer == "adamw8bit":
        return groups["trainable"] * ADAM8BIT_BYTES
    return 2 * _grad_bytes(setup, groups)  # exp_avg, exp_avg_sq in the parameter's dtype


def _adam_impl(setup: Setup) -> str:
    if setup.adam_impl != "auto":
        return setup.adam_impl
    return "single" if setup.device == "cpu" else "foreach"


def estimate(arch: Arch, setup: Setup, *, strategy: str = "ddp", gpus: int = 1) -> Estimate:
    """Peak bytes per device of one steady-state training step (see the module docstring)."""
    prec = setup.prec()
    groups = param_groups(arch, setup)
    tok, h, V = setup.tokens, arch.hidden, arch.vocab
    full = setup.method == "full"
    quant = setup.method == "qlora"
    fp32_weights_cast = prec.autocast and prec.weights == 4
    lora_modules = [] if full else arch.lora_modules(_targets(setup))

    # ---- model states (sharded under FSDP / ZeRO-3)
    weights = groups["weights"]
    grads = _grad_bytes(setup, groups)
    optim = _optimizer_bytes(setup, groups)
    shard = gpus if strategy in ("fsdp", "zero3") else 1
    if strategy == "zero3":
        # DeepSpeed keeps bf16 params + fp32 master + fp32 grad partitions: its "18 bytes per parameter".
        # Frozen weights are partitioned in bf16 (4-bit ones as they are).
        trainable = groups["trainable"]
        weights = groups["quantized_bytes"] + groups["frozen_plain"] * 2 + trainable * 6
        grads = trainable * 4
        optim = trainable * (ADAM8BIT_BYTES if setup.optimizer == "adamw8bit" else 8)
    weights, grads, optim = weights / shard, grads / shard, optim / shard

    # ---- weight copies kept for backward
    layer_lin = arch.layer_linear_params
    adapter_copies = 2 * groups["adapters"] if prec.autocast else 0  # cached casts of fp32 adapter leaves
    if strategy in ("fsdp", "zero3") and gpus > 1:
        # Unsharded working set: the layer being computed and the prefetched one, plus the root unit
        # (embeddings, lm_head) that FSDP keeps gathered through forward and backward.
        per = NF4_BYTES if quant else prec.compute
        copies_fwd = 2 * layer_lin * per + adapter_copies / gpus
        if strategy == "fsdp":
            copies_fwd += (arch.embed_params + arch.lm_head_params) * prec.compute
        else:
            copies_fwd = 4 * max(arch.layer_params, arch.embed_params)  # DeepSpeed: 4 x largest layer
        copies_layer = 0.0
    elif fp32_weights_cast and full:
        copies_fwd = 2 * (arch.decoder_linear_params + V * h)  # autocast cache of trainable leaves
        copies_layer = 2 * layer_lin
    elif fp32_weights_cast and not quant:
        copies_fwd = (0 if setup.checkpointing else 2 * arch.decoder_linear_params) + adapter_copies
        copies_layer = 2 * layer_lin
    else:
        copies_fwd = adapter_copies
        copies_layer = 0.0

    # ---- activations
    per_layer = sum(
        layer_bytes(
            arch, setup.method, prec, lora_modules=lora_modules, rank=setup.rank, dropout=setup.dropout
        ).values()
    )
    outside = final_bytes(arch, setup.method, prec) * tok
    if setup.checkpointing:
        saved = arch.layers * checkpointed_layer_bytes(arch, prec) * tok + outside
        recompute = per_layer * tok  # one layer re-run in backward
    else:
        saved = arch.layers * per_layer * tok + outside
        recompute = 0.0
    # In-layer backward working set: gradients of the MLP intermediate and of the residual stream.
    work = tok * (4 * prec.compute * arch.intermediate + 3 * 4 * h)

    # ---- fused chunked loss (losses.LinearCrossEntropy): in forward one chunk's fp32 logits, turned into
    # their gradient in place, plus its cast under autocast; nothing vocabulary-sized in backward. The
    # head's cast under autocast (frozen fp32 lm_head) lives through the forward loop.
    chunk = min(setup.loss_chunk, tok)
    head_cast = 2 * V * h if (fp32_weights_cast and not full) else 0
    loss_fwd = (4 + (prec.compute if prec.autocast else 0)) * chunk * V + head_cast
    loss_bwd = 0.0
    # A trained lm_head's fp32 gradient is accumulated in forward and handed to autograd in backward.
    lm_grad = 4 * V * h / shard if full else 0

    # ---- optimizer temporaries
    impl = _adam_impl(setup)
    if setup.optimizer == "adamw8bit" or impl == "fused":
        opt_temp = 0.0
    elif impl == "foreach":
        opt_temp = grads  # _foreach_sqrt(exp_avg_sq): one copy of the (local) states
    else:
        largest = (
            arch.largest_param
            if full
            else max([setup.rank * max(arch.linears()[m]) for m in lora_modules] or [0])
        )
        opt_temp = 2 * largest * (DTYPE_BYTES[setup.weights_dtype] if full else 4)

    ddp_buckets = grads if (strategy == "ddp" and gpus > 1) else 0.0
    static = weights + optim + ddp_buckets
    emb_grad = 4 * V * h / shard if (full and arch.tie_embeddings) else 0.0
    phases = {
        "forward_end": static + copies_fwd + saved + loss_fwd + lm_grad,
        # With checkpointing nothing holds the autocast cache's copies once forward has ended.
        "backward_start": static
        + (0 if setup.checkpointing else copies_fwd)
        + saved
        + loss_bwd
        + lm_grad
        + (0 if setup.checkpointing else work),
        "backward_end": static + grads + emb_grad + work,
        "optimizer_step": static + grads + opt_temp,
    }
    if setup.forward_only_tokens:
        # The reference (and KTO's KL) forward under no_grad, before the policy's: one layer's
        # activations live at a time, plus the loss chunk's logits; the autocast casts are not cached.
        ref_tok = setup.forward_only_tokens
        ref_loss = 8 * min(setup.loss_chunk, ref_tok) * V + head_cast
        phases["reference_forward"] = static + per_layer * ref_tok + ref_loss
    if setup.checkpointing:
        # Bound over the whole backward: every layer input still saved, the gradients all there.
        phases["backward_recompute"] = (
            static + saved + recompute + copies_layer + adapter_copies + work + grads
        )
    tensors_peak_phase = max(phases, key=phases.get)
    tensor_peak = phases[tensors_peak_phase]
    overhead = 0.0
    if setup.device == "cuda":
        overhead = tensor_peak * (FRAGMENTATION - 1) + CUDA_CONTEXT + (NCCL_BUFFERS if gpus > 1 else 0)
    else:
        slack = CPU_SLACK["jemalloc" if setup.allocator == "jemalloc" else setup.release_memory]
        overhead = tensor_peak * (slack - 1)
    return Estimate(
        weights=weights,
        trainable_params=int(groups["trainable"]),
        gradients=grads,
        optimizer=optim,
        weight_copies=copies_fwd,
        activations=saved + recompute,
        logits=max(loss_fwd, loss_bwd),
        optimizer_temp=opt_temp,
        overhead=overhead,
        phases=phases,
        peak=tensor_peak + overhead,
        peak_phase=tensors_peak_phase,
    )


def largest_fitting(
    arch: Arch,
    setup: Setup,
    capacity: float,
    *,
    what: str,
    strategy: str = "ddp",
    gpus: int = 1,
    limit: int | None = None,
) -> int:
    """Largest micro-batch (what='batch') or sequence length (what='seq', multiple of 64) that fits."""
    step = 64 if what == "seq" else 1
    hi = (limit or (arch.max_positions if what == "seq" else 4096)) // step

    def fits(n: int) -> bool:
        return estimate(arch, setup.with_(**{what: n * step}), strategy=strategy, gpus=gpus).peak <= capacity

    if hi < 1 or not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * step
