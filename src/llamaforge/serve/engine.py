"""The generation engine: one base model in memory, several LoRA adapters on it, continuous batching.

Requests wait in a bounded queue; a single worker thread takes the waiting ones (up to
`max_batch_size`: every adapter at once through peft's per-row `adapter_names`, or with
`mixed_adapter_batches` off only the oldest request's adapter), prefills them together and decodes
them step by step with one forward per step, so N clients cost about one client's forwards. Between
two decode steps, requests that arrived meanwhile are prefilled and join the running batch
(continuous batching, batch.py), so a newcomer never waits for the longest answer in the batch.
Prompts that start alike (a shared system prompt) reuse their prefix's KV (prefix_cache.py).
Each step's tokens go to the asking coroutine through its own asyncio queue (streaming); a
cancelled request (client gone) leaves the batch at the next step. Adapters are loaded and removed
under the same lock as the forwards: a pending swap stops admissions, the batch drains, the swap
runs, so a hot swap never races a forward and is never starved by a steady stream of requests.

One request never harms another: an error is contained to the rows it belongs to. Per-row work
(seeding, sampling, detokenizing) fails only its row; a prefill that fails for several newcomers is
retried for each alone; a decode step that fails rebuilds each row's cache alone from its prompt and
the tokens it has so far, and only the rows that still fail are answered with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from pathlib import Path

import torch

from llamaforge.device import autocast_context
from llamaforge.dtypes import torch_dtype
from llamaforge.errors import ConfigError
from llamaforge.serve.adapters import (
    Adapter,
    attach,
    check_adapter_path,
    check_lora_config,
    detach,
    loaded_names,
    lora_config,
)
from llamaforge.serve.batch import Batch, choose_token, prefill
from llamaforge.serve.config import ServeConfig
from llamaforge.serve.prefix_cache import PrefixCache
from llamaforge.serve.requests import (
    GenRequest,
    QueueFull,
    cut_at_stop_string,
    display_name,
    observe_token,
    take_streamable,
)

log = logging.getLogger(__name__)
_ANY = object()  # `_pop`: any adapter (the oldest waiting request's)


class Engine:
    def __init__(self, cfg: ServeConfig, metrics=None):
        self.cfg, self.metrics = cfg, metrics
        self.model = self.tokenizer = self.template = None
        self.base_name = cfg.served_model_name or display_name(cfg.model)
        self.adapters: dict[str, Adapter] = {}
        self.ready = False
        self.load_error: str | None = None
        self.max_model_len = cfg.max_model_len or 2048
        self._waiting: deque[GenRequest] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._swaps = 0  # adapter loads/unloads waiting for the model: no admissions meanwhile
        self._base_mode: contextlib.ExitStack | None = None  # peft's disable_adapter() held open
        self._stop = False
        self.prefix_cache = (
            PrefixCache(cfg.prefix_cache_tokens, cfg.prefix_block_size) if cfg.prefix_cache_tokens else None
        )
        self._thread: threading.Thread | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes: shows batching at work

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the base (and the run's or configured adapters); then start the worker."""
        from llamaforge.models import load_model
        from llamaforge.registry import METHODS
        from llamaforge.runs import Run, is_run_dir
        from llamaforge.templates import get_template, load_template

        try:
            dtype = torch_dtype(self.cfg.dtype)
            source, startup, run_weights = self.cfg.model, dict(self.cfg.adapters), None
            if is_run_dir(source):
                run = Run.open(source)
                if run.is_adapter and not METHODS.get(run.method).hot_swappable:
                    raise ConfigError(
                        f"{run.dir}: a {run.method} adapter cannot be hot-loaded beside others; "
                        "serve a run trained with a hot-swappable method (lora, qlora, dora)"
                    )
                if run.is_adapter:  # the base loads below; the run's adapter hot-loads like any other
                    startup.setdefault(run.dir.resolve().name, str(run.weights_dir))
                    source = run.base_model
                    shown = display_name(source)
                else:
                    source = run_weights = str(run.weights_dir)
                    shown = run.dir.resolve().name
                if not self.cfg.served_model_name:
                    self.base_name = shown
            self.model, self.tokenizer = load_model(source, dtype=dtype)
            self.template = get_template(self.cfg.template, self.tokenizer)
            if run_weights:  # a fully fine-tuned run: its own template
                self.template = load_template(Path(run_weights), self.tokenizer)
            limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
            self.max_model_len = min(self.cfg.max_model_len or limit, limit)
            config = self.model.config
            if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
                log.warning("sliding-window attention: the prefix cache is off for this model")
                self.prefix_cache = None
            if len(startup) > self.cfg.max_adapters:
                raise ConfigError(
                    f"{len(startup)} adapters to load at start, over serve.max_adapters={self.cfg.max_adapters}"
                )
            for name, path in startup.items():
                self.load_adapter(name, path, check_dirs=False)
            self.start()
            self.ready = True
            log.info("serving %s with adapters: %s", self.base_name, ", ".join(self.adapters) or "none")
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="llamaforge-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str, *, check_dirs: bool = True) -> Adapter:
        from peft import PeftModel

        from llamaforge.templates import load_template

        self._check_room(name)
        real = check_adapter_path(path, self.cfg.adapter_dirs, check_dirs=check_dirs)
        config = lora_config(real, path)
        template = (
            load_template(real, self.tokenizer)
            if (real / "llamaforge_template.json").is_file()
            else self.template
        )
        with self._swapping(name):
            self._check_room(name)  # again, under the lock: two loads at once cannot both take the last place
            base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
            check_lora_config(config, path, base, self.cfg.max_lora_rank)
            self.model = attach(self.model, name, real)  # on failure: nothing of it remains
            self.model.eval()
            adapter = Adapter(
                name, str(real), template, int(config.get("r", 8)), bool(config.get("use_dora"))
            )
            self.adapters[name] = adapter
            self._check_registry()
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.adapters))
        return adapter

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        with self._swapping(name):
            self.model = detach(self.model, name)
            del self.adapters[name]
            self._check_registry()
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.adapters))

    def _check_room(self, name: str) -> None:
        if name == self.base_name or name in self.adapters:
            raise ConfigError(f"a model named '{name}' is already loaded")
        if len(self.adapters) >= self.cfg.max_adapters:
            raise ConfigError(
                f"{len(self.adapters)} adapters are loaded, the most serve.max_adapters allows: unload one first"
            )

    def _check_registry(self) -> None:
        """The adapters peft holds are exactly the ones served (a failed load left none behind)."""
        held = loaded_names(self.model)
        if held != set(self.adapters):
            raise RuntimeError(
                f"adapter registry out of step: peft holds {sorted(held)}, served {sorted(self.adapters)}"
            )

    def _group(self, adapter: str | None):
        """Requests of one group may share a forward. peft cannot mix a DoRA adapter's rows with others."""
        loaded = self.adapters.get(adapter) if adapter is not None else None
        if loaded is not None and loaded.dora:
            return ("dora", adapter)
        return "mixed" if self.cfg.mixed_adapter_batches else adapter

    @contextlib.contextmanager
    def _swapping(self, name: str):
        """Hold the model for an adapter swap: admissions stop so the running batch drains; the adapter's
        cached prefixes go (a name loaded again may be other weights)."""
        with self._cond:
            self._swaps += 1
        try:
            with self._model_lock:
                if self.prefix_cache is not None:
                    self.prefix_cache.drop(name)
                yield
        finally:
            with self._cond:
                self._swaps -= 1
                self._cond.notify_all()

    def template_for(self, model_name: str):
        return self.adapters[model_name].template if model_name in self.adapters else self.template

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    # ------------------------------------------------------------------ submitting
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request (from the event loop); its events arrive on `req.events`."""
        req.loop = asyncio.get_running_loop()
        req.events = asyncio.Queue()
        with self._cond:
            if len(self._waiting) >= self.cfg.max_queue:
                raise QueueFull()
            self._waiting.append(req)
            self._update_gauges()
            self._cond.notify()
        return req

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.set_queue(self._running, len(self._waiting))

    def _emit(self, req: GenRequest, event: tuple) -> None:
        try:
            req.loop.call_soon_threadsafe(req.events.put_nowait, event)
        except RuntimeError:  # the asking event loop is gone (server shutting down)
            req.cancelled = True

    # ------------------------------------------------------------------ worker
    def _pop(self, adapter, room: int) -> list[GenRequest]:
        """Up to `room` waiting requests that may share a forward with `adapter`'s rows (under `_cond`)."""
        while self._waiting and self._waiting[0].cancelled:
            self._finish(self._waiting.popleft(), "cancelled")
        if not self._waiting or room <= 0:
            return []
        group = self._group(self._waiting[0].adapter if adapter is _ANY else adapter)
        taken = [r for r in self._waiting if self._group(r.adapter) == group and not r.cancelled][:room]
        for r in taken:
            self._waiting.remove(r)
        self._running += len(taken)
        self._update_gauges()
        return taken

    def _take_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while (not self._waiting or self._swaps) and not self._stop:
                self._cond.wait(timeout=1.0)
            if self._stop:
                return None
        if self.cfg.batch_wait_ms and len(self._waiting) < self.cfg.max_batch_size:
            time.sleep(self.cfg.batch_wait_ms / 1000)  # let requests arriving together share the batch
        with self._cond:
            return self._pop(_ANY, self.cfg.max_batch_size)

    def _admit(self, batch: Batch) -> list[GenRequest]:
        """Continuous batching: requests that arrived meanwhile join between two decode steps."""
        if not self._waiting or self._swaps or self._stop:
            return []
        with self._cond:
            adapter = batch.rows[0].adapter if batch.rows else _ANY
            return self._pop(adapter, self.cfg.max_batch_size - len(batch))

    def _worker(self) -> None:
        while True:
            pending = self._take_batch()
            if pending is None:
                return
            batch = Batch([])
            try:
                with self._model_lock, torch.inference_mode(), contextlib.ExitStack() as ends:
                    ends.callback(self._base_mode_off)  # the model leaves the lock with its adapters on
                    while pending or batch.rows:
                        with self._cond:
                            self._running = len(batch) + len(pending)
                            self._update_gauges()
                        if pending:
                            batch = batch.merge(self._prefill(pending))
                            self.batch_sizes.append(len(batch))
                        if batch.rows:
                            batch = self._step(batch)
                        pending = self._admit(batch)
            except Exception as exc:  # noqa: BLE001 - last resort: the worker must never die
                log.exception("generation failed")
                for r in [*batch.rows, *pending]:
                    self._fail(r, exc)
            finally:
                with self._cond:
                    self._running = 0
                    self._update_gauges()

    def _fail(self, r: GenRequest, exc: BaseException | str) -> None:
        """This row, and only it, ends with an error."""
        if r.finish_reason is None:
            r.finish_reason = "error"
            self._emit(r, ("error", exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"))

    def _startable(self, rows: list[GenRequest]) -> list[GenRequest]:
        """Rows ready to prefill: their adapter is still loaded and their generator seeds (per row)."""
        now, ready = time.monotonic(), []
        for r in rows:
            if r.adapter is not None and r.adapter not in self.adapters:  # unloaded while it waited
                self._fail(r, f"the adapter '{r.adapter}' was unloaded")
                continue
            if r.generator is None:
                try:
                    r.generator = torch.Generator().manual_seed(r.seed if r.seed is not None else r.id)
                except Exception as exc:  # noqa: BLE001 - e.g. a seed out of range: this row only
                    self._fail(r, exc)
                    continue
                r.started = now
                if self.metrics:
                    self.metrics.queue_time.labels(r.model_name).observe(now - r.arrival)
            ready.append(r)
        return ready

    def _prefill(self, rows: list[GenRequest], *, resume: bool = False) -> Batch:
        """Prefill newcomers (with `resume`: rebuild rows already decoding), choose their next tokens;
        the batch of those still going. A failure shared by several rows is retried for each alone."""
        rows = self._startable(rows)
        if not rows:
            return Batch([])
        device = next(self.model.parameters()).device
        try:
            batch, logits, hits = prefill(
                rows, self._forward, self.tokenizer.pad_token_id, device, self.prefix_cache, resume=resume
            )
        except Exception as exc:  # noqa: BLE001 - find the rows it belongs to
            if len(rows) == 1:
                log.warning("generation failed for request %s: %s", rows[0].id, exc)
                self._fail(rows[0], exc)
                return Batch([])
            alone = Batch([])
            for r in rows:
                alone = alone.merge(self._prefill([r], resume=resume))
            return alone
        if resume:
            self._sample(batch, logits)
            return batch
        for r, hit in zip(rows, hits):
            r.cached_tokens = hit.tokens
            if self.metrics and self.prefix_cache is not None:
                self.metrics.prefix_cache(r.model_name, len(r.prompt_ids), hit.tokens)
        self._sample(batch, logits)
        return batch

    def _step(self, batch: Batch) -> Batch:
        """One decode step; if the forward fails, each row's cache is rebuilt alone (the failure stays
        with the rows that still fail)."""
        try:
            logits = batch.decode(self._forward)
        except Exception as exc:  # noqa: BLE001 - contained below
            log.warning("decode step failed for %d rows (%s): rebuilding each alone", len(batch), exc)
            rows = [r for r in batch.rows if r.finish_reason is None]
            return self._prefill(rows, resume=True) if len(rows) > 1 else self._fail_all(rows, exc)
        self._sample(batch, logits)
        return batch

    def _fail_all(self, rows: list[GenRequest], exc: Exception) -> Batch:
        for r in rows:
            self._fail(r, exc)
        return Batch([])

    def _sample(self, batch: Batch, logits: torch.Tensor) -> None:
        """Choose each row's next token; finished, cancelled and failed rows leave the batch."""
        keep, tokens = [], []
        for k, r in enumerate(batch.rows):
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            try:
                token = choose_token(logits[k], r.temperature, r.top_p, r.generator)
                going = self._accept(r, token)
            except Exception as exc:  # noqa: BLE001 - e.g. a NaN temperature: this row only
                self._fail(r, exc)
                continue
            if going:
                keep.append(k)
                tokens.append(token)
        batch.keep(keep, tokens)

    def _finish(self, req: GenRequest, reason: str) -> None:
        req.finish_reason = reason
        self._emit(req, ("done", reason))

    def _forward(self, rows: list[GenRequest], **inputs):
        extra = self._adapter_mode(rows)
        with autocast_context(inputs["input_ids"].device, self.cfg.precision):
            return self.model(**inputs, use_cache=True, **extra)

    def _adapter_mode(self, rows: list[GenRequest]) -> dict:
        """Set the adapters for a forward over `rows`; returns peft's per-row `adapter_names` for a mix
        ("__base__" for the bare base). Entering and leaving peft's `disable_adapter()` walks every module
        (~50 ms on the default model), so base-only forwards keep it entered until a forward needs an
        adapter or the batch ends (`_base_mode_off`)."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return {}
        wanted = {r.adapter for r in rows}
        if wanted == {None}:
            if self._base_mode is None:
                self._base_mode = contextlib.ExitStack()
                self._base_mode.enter_context(self.model.disable_adapter())
            return {}
        self._base_mode_off()
        if len(wanted) > 1:
            return {"adapter_names": [r.adapter or "__base__" for r in rows]}
        if self.model.active_adapter != (adapter := wanted.pop()):
            self.model.set_adapter(adapter)
        return {}

    def _base_mode_off(self) -> None:
        if self._base_mode is not None:
            self._base_mode.close()
            self._base_mode = None

    def _accept(self, r: GenRequest, token: int) -> bool:
        """Record one token, stream what text is final; False when the request is done."""
        observe_token(r, self.metrics)
        if token in r.stop_ids:
            self._flush(r, final=True)
            self._finish(r, "stop")
            return False
        r.token_ids.append(token)
        r.text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        if cut_at_stop_string(r):
            self._flush(r, final=True)
            self._finish(r, "stop")
            return False
        if len(r.token_ids) >= r.max_tokens:
            self._flush(r, final=True)
            self._finish(r, "length")
            return False
        self._flush(r, final=False)
        return True

    def _flush(self, r: GenRequest, *, final: bool) -> None:
        delta = take_streamable(r, final=final)
        if delta:
            self._emit(r, ("text", delta))
