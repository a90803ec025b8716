"""The serve engine's shared-prefix KV cache and continuous batching, on the tiny random Llama with two
real peft adapters: greedy outputs must be the same with the cache as without it, alone or batched."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")

from llamaforge.data.types import Message  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.config import ServeConfig  # noqa: E402
from llamaforge.serve.engine import Engine, GenRequest  # noqa: E402
from llamaforge.serve.prefix_cache import Hit, PrefixCache  # noqa: E402
from test_serve import adapters, local, metric, serve_config  # noqa: E402, F401 - the tiny model and its adapters

SYSTEM = (
    "You are the support assistant of a small bakery. Answer briefly, politely and only about bread, "
    "opening hours and orders; never invent prices."
)
QUESTIONS = [
    "When do you open?",
    "Do you sell rye bread on Sundays?",
    "Can I order a cake?",
    "Where are you?",
]


def make_engine(tiny_llama_dir, root, **kw) -> Engine:
    cfg = serve_config(tiny_llama_dir, root).model_dump()
    cfg.update(adapters={"a1": str(root / "a1"), "a2": str(root / "a2")}, prefix_block_size=8)
    engine = Engine(ServeConfig.model_validate({**cfg, **kw}))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def cached(tiny_llama_dir, adapters):  # noqa: F811
    engine = make_engine(tiny_llama_dir, adapters, prefix_cache_tokens=4096)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def plain(tiny_llama_dir, adapters):  # noqa: F811
    engine = make_engine(tiny_llama_dir, adapters, prefix_cache_tokens=0)
    yield engine
    engine.shutdown()


def prompt(engine: Engine, question: str, system: str = SYSTEM) -> list[int]:
    return engine.template.encode_prompt([Message("system", system), Message("user", question)])


async def _done(r: GenRequest) -> None:
    while (await r.events.get())[0] not in ("done", "error"):
        pass
    assert r.finish_reason == "length", r.finish_reason


def run(engine: Engine, jobs: list[tuple[str | None, list[int]]], *, together: bool, max_tokens: int = 6):
    """Greedy requests (no stop tokens: every row decodes `max_tokens`), all at once or one by one."""

    async def go() -> list[GenRequest]:
        reqs = [GenRequest(ids, adapter, max_tokens, model_name=adapter or "tiny") for adapter, ids in jobs]
        if together:
            for r in reqs:
                engine.submit(r)
            await asyncio.gather(*map(_done, reqs))
        else:
            for r in reqs:
                engine.submit(r)
                await _done(r)
        return reqs

    return asyncio.run(go())


def test_greedy_outputs_match_without_cache(cached, plain):
    jobs = [(a, prompt(plain, q)) for q in QUESTIONS[:3] for a in (None, "a1", "a2")]
    reference = [r.token_ids for r in run(plain, jobs, together=False)]
    assert reference[0] != reference[1] != reference[2] != reference[0]  # the adapters really differ
    cached.prefix_cache.clear()
    one_by_one = run(cached, jobs, together=False)
    assert [r.token_ids for r in one_by_one] == reference
    a, b = prompt(plain, QUESTIONS[0]), prompt(plain, QUESTIONS[1])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    system_tokens = shared // 8 * 8  # the whole blocks of the system prompt and the user header
    hits = [r.cached_tokens for r in one_by_one]
    assert hits[:3] == [0, 0, 0]  # the base's cached system prompt is not the adapters' KV
    assert all(h >= system_tokens for h in hits[3:]), hits
    cached.batch_sizes.clear()
    batched = run(cached, jobs, together=True)
    assert [r.token_ids for r in batched] == reference and max(cached.batch_sizes) >= 3
    assert all(r.cached_tokens >= system_tokens for r in batched)
    # a batch mixing rows with and without cached prefixes (hole layout) and longer cached rests
    mixed = [(a, prompt(plain, q)) for a, q in zip((None, "a1", "a2", None), QUESTIONS[3:] * 4)]
    mixed += [("a1", prompt(plain, "Something else entirely", system="Be terse.")), (None, jobs[0][1] * 2)]
    reference = [r.token_ids for r in run(plain, mixed, together=False)]
    batched = run(cached, mixed, together=True)
    assert [r.token_ids for r in batched] == reference
    assert batched[0].cached_tokens > 0 and batched[4].cached_tokens == 0


def test_repeated_prompt_reuses_all_but_the_last_token(cached, plain):
    ids = prompt(plain, QUESTIONS[0])
    ids = ids[: len(ids) - len(ids) % 8]  # a whole number of blocks: the last block is still prefilled
    first, again = run(cached, [("a2", ids), ("a2", ids)], together=False)
    assert first.token_ids == again.token_ids == run(plain, [("a2", ids)], together=False)[0].token_ids
    assert again.cached_tokens == len(ids) - 8


def test_unloading_an_adapter_drops_its_prefixes(cached, plain, adapters):  # noqa: F811
    cache = cached.prefix_cache
    ids = prompt(plain, QUESTIONS[1])
    cached.load_adapter("swap", str(adapters / "a2"))
    try:
        run(cached, [("swap", ids), (None, ids)], together=False)
        base_tokens = cache.tokens_for(None)
        assert cache.tokens_for("swap") > 0 and cache.lookup("swap", ids).tokens > 0
    finally:
        cached.unload_adapter("swap")
    assert cache.tokens_for("swap") == 0 and cache.tokens_for(None) == base_tokens
    cached.load_adapter("swap", str(adapters / "a1"))  # the same name, other weights
    try:
        (out,) = run(cached, [("swap", ids)], together=False)
    finally:
        cached.unload_adapter("swap")
    assert out.cached_tokens == 0
    assert out.token_ids == run(plain, [("a1", ids)], together=False)[0].token_ids


def test_the_cache_bound_holds(tiny_llama_dir, adapters, plain):  # noqa: F811
    engine = make_engine(tiny_llama_dir, adapters, adapters={}, prefix_cache_tokens=48)
    try:
        names = ["Alpha", "Bravo", "Charlie", "Delta"]  # differ in the first block
        prompts = [prompt(plain, q, system=f"{n} rules. {SYSTEM}") for n, q in zip(names, QUESTIONS)]
        assert all(len(p) > 48 for p in prompts)  # each prompt alone is longer than the cache
        for ids in prompts:
            (r,) = run(engine, [(None, ids)], together=False)
            assert r.cached_tokens == 0 and engine.prefix_cache.tokens <= 48
        assert engine.prefix_cache.tokens == 48
        (again,) = run(engine, [(None, prompts[-1])], together=False)
        assert again.cached_tokens == 48  # the newest prompt's first blocks survived
        assert engine.prefix_cache.lookup(None, prompts[0]).tokens == 0  # the oldest were evicted
    finally:
        engine.shutdown()


def test_eviction_takes_chain_tails_first():
    def block(value: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((2, 1, 4, 3), value), torch.full((2, 1, 4, 3), -value)

    cache = PrefixCache(max_tokens=24, block_size=4)  # six blocks
    a, b = list(range(100, 117)), list(range(200, 217))  # four full blocks each (+1 token)
    for ids in (a, b):
        hit = cache.lookup(None, ids)
        assert hit.tokens == 0 and len(hit.chain) == 4
        cache.store(None, hit, {i: block(ids[0] + i) for i in cache.missing(hit)})
        assert cache.tokens <= 24
    hit_a, hit_b = cache.lookup(None, a), cache.lookup(None, b)
    assert (hit_a.tokens, hit_b.tokens) == (8, 16)  # a lost its last two blocks, not its first ones
    assert hit_a.keys.shape == (2, 1, 8, 3) and hit_a.keys[0, 0, 4:, 0].eq(101).all()
    assert cache.lookup("a1", a).tokens == 0  # the same tokens under an adapter: other keys
    assert cache.lookup(None, a[:8]).tokens == 4  # the prompt's last token is always prefilled
    assert cache.lookup(None, [7, *a[1:]]).tokens == 0  # blocks never match out of context
    assert cache.missing(Hit(chain=cache.chain(None, list(range(40))))) == list(range(6))


def test_prefix_cache_metrics(cached):
    client = local(create_app(cached.cfg, cached))
    body = {"model": "a1", "max_tokens": 2, "temperature": 0}
    for q in QUESTIONS[:2]:
        messages = [{"role": "system", "content": SYSTEM + " Metrics."}, {"role": "user", "content": q}]
        assert client.post("/v1/chat/completions", json={**body, "messages": messages}).status_code == 200
    text = client.get("/metrics").text
    queries = metric(text, 'vllm:prefix_cache_queries_total{model_name="a1"}')
    hits = metric(text, 'vllm:prefix_cache_hits_total{model_name="a1"}')
    assert 0 < hits < queries


def test_continuous_batching_admits_newcomers_between_steps(cached, plain):
    """A newcomer joins a running batch between decode steps, and with a longer prompt than the running
    row's cache: the running row is padded at the merge and trimmed again when the newcomer leaves."""
    first_ids, newcomer_ids = prompt(plain, "Hi", system="Be terse."), prompt(plain, QUESTIONS[2] * 3)
    assert len(newcomer_ids) > len(first_ids) + 8
    reference = [
        run(plain, [(None, first_ids)], together=False, max_tokens=24)[0].token_ids,
        run(plain, [("a1", newcomer_ids)], together=False, max_tokens=4)[0].token_ids,
    ]

    async def go():
        first = GenRequest(first_ids, None, 24, model_name="tiny")
        newcomer = GenRequest(newcomer_ids, "a1", 4, model_name="a1")
        cached.submit(first)
        while len(first.token_ids) < 2:  # the first answer is decoding
            await asyncio.sleep(0.002)
        cached.submit(newcomer)
        finished = []

        async def watch(r):
            await _done(r)
            finished.append(r)

        await asyncio.gather(watch(first), watch(newcomer))
        return first, newcomer, finished

    first, newcomer, finished = asyncio.run(go())
    assert finished == [newcomer, first]  # the newcomer did not wait for the first answer to end
    assert [first.token_ids, newcomer.token_ids] == reference
