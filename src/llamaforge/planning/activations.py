"""What autograd keeps alive for one Llama decoder layer: a bill of saved tensors, in bytes per token.

Source: derived op by op from transformers' `LlamaDecoderLayer` (RMSNorm in fp32, SDPA attention,
SwiGLU MLP) and peft's LoRA `Linear`, under torch autocast, and checked tensor for tensor with
`torch.autograd.graph.saved_tensors_hooks` on a real model (tests/test_plan.py). It is the
Llama/SDPA counterpart of the per-layer formula of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", s*b*h*(34 + 5*a*s/h) bytes for GPT): SDPA (flash /
memory-efficient kernels, no mask) keeps no s x s scores, so the a*s/h term is gone.

With h = hidden, q = heads*head_dim, kv = kv_heads*head_dim, i = intermediate, n = heads,
c = compute bytes (2 under bf16 autocast), f = bytes of fp32 = 4, R = bytes of the residual stream
(= the weights' dtype: embeddings and residual adds keep it), per token and layer:

    two RMSNorms      2 * (f*h + 4)             fp32 copy of the input (the input itself if fp32) + rsqrt
                      + 2 * R*h                 the normalised input, only if the norm weight trains (full)
    attention (SDPA)  c*(2q + 2kv) + f*n        q, k, v (GQA without repeat_kv), output, logsumexp
    SwiGLU            3 * m*i                   gate, silu(gate), up; m = dtype of the MLP projections' outputs
    full fine-tuning  the input of every linear (its weight gradient needs it), cast once per consumer
                      when autocast casts an fp32 input (q/k/v: 3 copies of c*h, gate/up: 2), shared
                      otherwise; o_proj's input is the SDPA output (already counted); down_proj: m*i
    LoRA, per module  c*in (the input cast for lora_A) + c*r (lora_A's output, kept for lora_B)
                      + with dropout: the bool dropout mask * in (train/dropout.py on CPU, fused on CUDA)
                      QLoRA's frozen 4-bit base keeps only the packed weight (dequantised again in backward)

Examples (q = h): full fine-tuning, fp32 weights under autocast: 30h + 4kv + 8i + 4n bytes, i.e.
236 KiB per token per layer on Llama 3 8B (h=4096, kv=1024, i=14336); pure bf16: 20h + 4kv + 8i + 4n.
LoRA on all linears, bf16 base, no dropout: 24h + 4kv + 8i + 4n + 14r (212 KiB on 8B at r=16);
with dropout add 6h + i bytes (bool masks; torch's own CPU dropout would keep fp32 masks: 24h + 4i).
"""

from __future__ import annotations

from dataclasses import dataclass

from llamaforge.planning.arch import Arch


@dataclass(frozen=True)
class Precision:
    """Byte widths that decide what a saved tensor costs."""

    weights: int  # bytes of the (base / master) weights: 4 fp32, 2 bf16
    compute: int  # bytes of matmul inputs/outputs: 2 under bf16/fp16 autocast, 4 in fp32
    autocast: bool  # True when autocast casts fp32 tensors for the matmuls
    device: str  # "cpu" | "cuda"

    @property
    def resid(self) -> int:
        return self.weights if self.autocast else max(self.weights, self.compute)


def layer_bytes(
    arch: Arch,
    method: str,
    prec: Precision,
    *,
    lora_modules: list[str] = (),
    rank: int = 0,
    dropout: float = 0.0,
) -> dict[str, float]:
    """Bytes per token saved for backward by one decoder layer, by part (see the module docstring)."""
    h, i, q, kv, n = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim, arch.heads
    c, f, R = prec.compute, 4, prec.resid
    full = method == "full"
    quant_fp32_out = method == "qlora" and prec.weights == 4 and prec.autocast
    # bitsandbytes casts the 4-bit layer's output back to the input dtype: fp32 in an fp32 model.
    m = f if quant_fp32_out or not prec.autocast else c
    parts: dict[str, float] = {}
    parts["norms"] = 2 * (f * h + 4) + (2 * R * h if full else 0)
    parts["attention"] = c * (2 * q + 2 * kv) + f * n
    parts["mlp"] = 3 * m * i
    if full:
        # Inputs saved for weight gradients: an fp32 input under autocast is cast once per consumer.
        per_consumer = prec.autocast and c != R
        parts["linear_inputs"] = (
            (3 if per_consumer else 1) * c * h + (2 if per_consumer else 1) * c * h + m * i
        )
    if lora_modules:
        mask = 1 if dropout > 0 else 0  # bool masks: train/dropout.py on CPU, torch's fused dropout on CUDA
        total = 0.0
        for module in lora_modules:
            fi, _ = arch.linears()[module]
            total += (c + mask) * fi + c * rank
        parts["lora"] = total
    return parts


def checkpointed_layer_bytes(arch: Arch, prec: Precision) -> float:
    """With gradient checkpointing a layer keeps only its input hidden states."""
    return prec.resid * arch.hidden


def final_bytes(arch: Arch, method: str, prec: Precision) -> float:
    """Per token, outside the layers: the final RMSNorm and the hidden states the chunked loss keeps."""
    h = arch.hidden
    return (4 * h + 4) + (prec.resid * h if method == "full" else 0) + prec.resid * h + 16  # + ids, labels
