"""The plan table: `llamaforge plan`'s memory estimate and recommendation for shipped architectures
(8B, 70B, ...) on common GPUs, side by side, computed by the planner itself (llamaforge.planning.plan)."""

from __future__ import annotations

DEFAULT_MODELS = ("llama3-8b", "llama3-70b")
DEFAULT_GPUS = ("H100", "A100-80GB", "A100-40GB", "L40S", "RTX4090", "L4")


def plan_rows(
    models: list[str],
    gpus: list[str],
    *,
    batch: int | None = None,
    seq: int | None = None,
    tokens: float | None = None,
) -> list[dict]:
    """One row per (model, GPU): each method's lowest peak GiB (checkpointing on), whether it fits,
    the recommendation and, with `tokens`, hours per epoch of the recommended method."""
    from llamaforge.config import JobConfig
    from llamaforge.planning.arch import load_arch
    from llamaforge.planning.plan import base_setup, gpu_hardware, make_plan, weights_dtypes

    config = JobConfig()  # the schema's defaults: batch, sequence length, LoRA rank and targets
    rows = []
    for model in models:
        arch = load_arch(model)
        for gpu in gpus:
            hw = gpu_hardware(gpu)
            base = base_setup(config, device=hw.device, batch=batch, seq=seq)
            plan = make_plan(arch, base, hw, dtypes=weights_dtypes(config, hw.device), tokens=tokens)
            peaks = {}
            for method, info in plan["methods"].items():
                row = info["rows"][1]  # with gradient checkpointing: the smallest footprint
                peaks[method] = {"peak_gib": min(row["peak_gib"].values()), "fits": bool(row["fits"])}
            rec = plan["recommendation"]
            timing = plan["time"].get(rec["method"] or "", {})
            rows.append(
                {
                    "model": model,
                    "params": plan["model"].get("params"),
                    "gpu": hw.name,
                    "memory_gib": hw.memory_gib,
                    "peaks": peaks,
                    "method": rec["method"],
                    "reason": rec["reason"],
                    "epoch_hours": timing.get("epoch_hours"),
                    "batch": base.batch,
                    "seq": base.seq,
                }
            )
    return rows
