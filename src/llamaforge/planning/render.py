"""`llamaforge plan`'s table: a plan (planning/plan.make_plan's dict) as the terminal shows it."""

from __future__ import annotations


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _fmt_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def render(plan: dict) -> str:
    m, hw, st = plan["model"], plan["hardware"], plan["settings"]
    strategies = st["strategies"]
    where = (
        f"{hw['count']} x {hw['memory_gib']:g} GiB ({hw['name']}, {hw['tflops']:g} TFLOP/s {hw['precision']})"
        if hw["device"] == "cuda"
        else f"{hw['name']}, {hw['memory_gib']:.1f} GiB RAM available"
    )
    lines = [
        f"plan: {m['name']} ({_fmt_params(m['params'])} params) on {where}",
        f"      batch {st['batch_size']} x seq {st['seq_len']}, {st['precision']} autocast, "
        f"LoRA r={st['lora_rank']} {st['lora_targets']}, {st['optimizer']}, memory in GiB per device",
        "",
    ]
    peak_cols = [("peak" if s == "ddp" and len(strategies) == 1 else s.upper()) for s in strategies]
    head = (
        f"{'method':6} {'ckpt':4} {'trainable':>9} {'weights':>7} {'grads':>6} {'optim':>6} {'copies':>6} "
        f"{'activ':>6} {'logits':>6} "
        + " ".join(f"{c:>7}" for c in peak_cols)
        + f" {'fits':>5} {'max batch':>9} {'max seq':>7}"
    )
    if hw["device"] == "cuda":
        head += f" {'GPUs (FSDP)':>11}"
    lines += [head, "-" * len(head)]
    for method, info in plan["methods"].items():
        label = {"full": "full", "lora": "lora", "qlora": "qlora"}[method]
        for r in info["rows"]:
            fits = "yes" if r["fits"] else "no"
            line = (
                f"{label:6} {'on' if r['checkpointing'] else 'off':4} {_fmt_params(info['trainable_params']):>9} "
                f"{r['weights_gib']:7.1f} {r['gradients_gib']:6.1f} {r['optimizer_gib']:6.1f} "
                f"{r['weight_copies_gib']:6.1f} {r['activations_gib']:6.1f} {r['logits_gib']:6.1f} "
                + " ".join(f"{r['peak_gib'][s]:7.1f}" for s in strategies)
                + f" {fits:>5} {r['max_batch'] or '-':>9} {r['max_seq'] or '-':>7}"
            )
            if hw["device"] == "cuda":
                line += f" {r.get('min_gpus_fsdp') or '-':>11}"
            lines.append(line)
    lines.append("")
    lines.append(
        f"weights: full {plan['methods']['full']['weights_dtype']} master + bf16 copies; LoRA base "
        f"{plan['methods']['lora']['weights_dtype']}; QLoRA NF4 + {plan['methods']['qlora']['weights_dtype']}"
        " embeddings. peak = the largest moment of a training step (not the column sum), CUDA "
        "context included; max batch at this seq, max seq at this batch (best strategy)."
    )
    if hw["device"] == "cuda":
        lines.append(
            "GPUs (FSDP): fewest GPUs of this size that fit with FSDP ('-': the per-GPU activations alone "
            "do not fit)."
        )
    data = plan["data"]
    if data["tokens_per_epoch"]:
        lines.append(f"time per epoch for {data['tokens_per_epoch'] / 1e6:.2f}M tokens ({data['note']}):")
    else:
        lines.append(f"throughput (no token count: {data['note'] or 'pass --tokens'}):")
    for method, t in plan["time"].items():
        text = f"  {method:6} {t['tokens_per_second']:>10,.0f} tokens/s at {t['mfu']:.0%} MFU"
        if "epoch_hours" in t:
            text += f"  -> {_fmt_hours(t['epoch_hours'])} per epoch, {_fmt_hours(t['total_hours'])} for {data['epochs']:g}"
            if "cost" in t:
                text += f", ${t['cost']:,.2f} at ${data['price_per_gpu_hour']:g}/GPU-hour"
        lines.append(text)
    if hw["note"]:
        lines.append(f"  ({hw['note']})")
    rec = plan["recommendation"]
    lines.append("")
    if rec["method"]:
        strategy = "" if len(strategies) == 1 else f", {rec['strategy'].upper()}"
        lines.append(
            f"recommended: {rec['method']}{' + gradient checkpointing' if rec['checkpointing'] else ''}"
            f"{strategy} - {rec['reason']}"
        )
    else:
        lines.append(f"recommended: none - {rec['reason']}")
    if rec.get("overrides"):
        lines.append(f"job overrides: {' '.join(rec['overrides'])}")
    return "\n".join(lines)
