"""Curation steps one by one: normalise, filters, PII, dedup, contradictions, decontamination, split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llamaforge.data.curate.config import (
    ContradictionsConfig,
    DecontamConfig,
    DedupConfig,
    FiltersConfig,
    NormalizeConfig,
    PIIConfig,
    SplitConfig,
)
from llamaforge.data.curate.contradictions import Contradictions
from llamaforge.data.curate.decontam import Decontaminator
from llamaforge.data.curate.dedup import Dedup
from llamaforge.data.curate.filters import Filters, TokenCounter
from llamaforge.data.curate.minhash import LSHIndex, MinHasher
from llamaforge.data.curate.normalize import Normalizer, fix_mojibake
from llamaforge.data.curate.pii import PIIDetector, PIIStep, iban_ok, luhn_ok
from llamaforge.data.curate.records import Item, make_conversation
from llamaforge.data.curate.split import stratified_assignment
from llamaforge.data.split import content_unit, split_of

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "assets" / "llama3-tokenizer"
ALPACA = SHARED / "data" / "alpaca_en_demo.json"


def items(*pairs: tuple[str, str]) -> list[Item]:
    return [Item(i, make_conversation(p, a, source="t", line=i + 1)) for i, (p, a) in enumerate(pairs)]


def alpaca_items(n: int | None = None) -> list[Item]:
    if not ALPACA.is_file():
        pytest.skip("../shared/data/alpaca_en_demo.json not present")
    data = json.loads(ALPACA.read_text(encoding="utf-8"))[:n]
    return items(
        *((r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]) for r in data)
    )


# ------------------------------------------------------------------ normalise


def test_normalize_unicode_whitespace_html_mojibake():
    norm = Normalizer(NormalizeConfig())
    its = items(
        (
            "Cafe\u0301  menu\u00a0 please  ",
            "It\u00e2\u20ac\u2122s <b>great</b>&amp; cheap<br>really\n\n\n\nok",
        ),
        ("Write an HTML page", "<html><body><p>Hi</p></body></html>"),
    )
    norm(its)
    assert its[0].conv.messages[0].content == "Caf\u00e9 menu please"
    assert its[0].conv.messages[1].content == "It\u2019s great& cheap\nreally\n\nok"
    # a record about HTML keeps its tags
    assert its[1].conv.messages[1].content == "<html><body><p>Hi</p></body></html>"
    assert fix_mojibake("na\u00c3\u00afve") == "na\u00efve"


def test_normalize_keeps_code_indentation_and_rejects_undecodable():
    norm = Normalizer(NormalizeConfig())
    code = "```python\ndef f(x):\n    return  x\n```"
    its = items(("Show code", code), ("Broken", "bad \ufffd byte"))
    norm(its)
    assert its[0].conv.messages[1].content == code
    assert its[1].reject is not None and "U+FFFD" in its[1].reject[1] and "character 4" in its[1].reject[1]


# ------------------------------------------------------------------ filters


def test_filters_reasons():
    f = Filters(FiltersConfig(max_answer_tokens=50, min_answer_tokens=2))
    its = items(
        ("q1", "   "),
        ("q2", "As an AI language model, I cannot have opinions."),
        ("q3", "word " * 60),
        ("q4", "A perfectly fine answer with enough words."),
        ("q5", "This is fucking great."),
        ("q6", "ok"),
        ("q7", "line a\nline a\nline a\nline a\nline b"),
        ("q8", "Wow this is great" + "!" * 60),
        ("q9", "yes"),
    )
    f(its)
    reasons = [it.reject[1] if it.reject else None for it in its]
    assert reasons[0] == "empty answer"
    assert reasons[1].startswith("refusal")
    assert reasons[2].startswith("length: answer has 60 words (max 50)")
    assert reasons[3] is None
    assert reasons[4].startswith("profanity")
    assert reasons[5].startswith("length: answer has 1 words (min 2)")
    assert reasons[6].startswith("repetition")
    assert reasons[7].startswith("repetition: a run of")
    assert reasons[8].startswith("length: answer has 1 words (min 2)")
    assert "whitespace" in f.warnings[0]


def test_filters_word_boundaries():
    f = Filters(FiltersConfig())
    its = items(
        ("Tell me about Scunthorpe", "Scunthorpe is a town; the assessment of cocktails was a classic.")
    )
    f(its)
    assert its[0].reject is None


def test_filters_classifier_hook(tmp_path, monkeypatch):
    mod = tmp_path / "toxmod.py"
    mod.write_text("def score(texts):\n    return [1.0 if 'idiot' in t else 0.0 for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = Filters(FiltersConfig(classifier="toxmod:score"))
    its = items(("q", "you idiot"), ("q", "you genius"))
    f(its)
    assert its[0].reject[1].startswith("classifier") and its[1].reject is None


def test_token_lengths_with_llama3_tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip("Llama 3 tokenizer not present")
    counter = TokenCounter(str(TOKENIZER))
    assert counter.counts(["Hello world"]) == [2]
    f = Filters(FiltersConfig(tokenizer=str(TOKENIZER), max_answer_tokens=3))
    its = items(("q", "Hello world"), ("q", "Hello world, how are you?"))
    f(its)
    assert its[0].reject is None and "tokens (max 3)" in its[1].reject[1]
    # bounds mode makes the same decisions
    f2 = Filters(FiltersConfig(tokenizer=str(TOKENIZER), max_answer_tokens=3, lengths="bounds"))
    its2 = items(("q", "Hello world"), ("q", "Hello world, how are you?"))
    f2(its2)
    assert [it.reject is None for it in its2] == [True, False]


def test_filters_on_real_data():
    its = alpaca_items()
    Filters(FiltersConfig())(its)
    rejected = [it for it in its if it.reject]
    assert 0 < len(rejected) < len(its) * 0.05
    assert all(
        it.reject[1].split(":")[0] in ("refusal", "repetition", "profanity", "length") for it in rejected
    )


# ------------------------------------------------------------------ PII


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.roe+news@mail.example.org today", "EMAIL"),
        ("call +44 20 7946 0958 now", "PHONE"),
        ("phone: (415) 555-0132", "PHONE"),
        ("card 4539 1488 0343 6467 exp 09/27", "CREDIT_CARD"),
        ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN"),
        ("SSN 078-05-1120 on file", "SSN"),
        ("server at 10.20.30.40 is down", "IP_ADDRESS"),
        ("use redis://user:s3cr3t@cache.internal:6379/0", "URL_CREDENTIALS"),
        ("AWS key AKIAIOSFODNN7EXAMPLE leaked", "API_KEY"),
        ("export TOKEN=ghp_" + "a1B2c3D4e5" * 4, "API_KEY"),
        ("password=Tr0ub4dor&3", "SECRET"),
    ],
)
def test_pii_detects(text, kind):
    spans = PIIDetector().detect(text)
    assert [s.kind for s in spans] == [kind], spans


@pytest.mark.parametrize(
    "text",
    [
        "Order #1234567890 ships on 2023-04-12.",
        "Upgrade to version 1.2.3.4 of the library.",
        "ISBN 978-3-16-148410-0 is on the cover.",
        "The card-like 4539 1488 0343 6468 fails Luhn.",
        "The meeting is at 12:30:45 on 12/05/2023.",
        "Population grew from 1,234,567 to 2,345,678.",
        "const apiKey = 'API_KEY';",
        "commit 3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39",
    ],
)
def test_pii_hard_negatives(text):
    assert PIIDetector().detect(text) == []


def test_checksums():
    assert luhn_ok("4539148803436467") and not luhn_ok("4539148803436468")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_pii_step_redact_and_drop():
    its = items(("mail bob@example.com", "ok, 4539 1488 0343 6467 noted"))
    step = PIIStep(PIIConfig())
    step(its)
    assert its[0].conv.messages[0].content == "mail <EMAIL>"
    assert its[0].conv.messages[1].content == "ok, <CREDIT_CARD> noted"
    assert step.summary()["counts"] == {"CREDIT_CARD": 1, "EMAIL": 1}
    its = items(("mail bob@example.com", "fine"))
    PIIStep(PIIConfig(action="drop"))(its)
    assert its[0].reject[1].startswith("pii: EMAIL x1")
    assert "bob@example.com" not in json.dumps(its[0].conv.to_dict())  # rejects never leak it


# ------------------------------------------------------------------ MinHash / dedup


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = list(rng.choice(vocab, 300))
    for scheme in ("oph", "classic"):
        mh = MinHasher(256, 1, scheme=scheme)
        other = base[:200] + list(rng.choice(vocab, 100))
        a, b = set(base), set(other)
        true = len(a & b) / len(a | b)
        sig = mh.signatures_batch([" ".join(base), " ".join(other)])
        est = float((sig[0] == sig[1]).mean())
        assert abs(est - true) < 0.1, (scheme, est, true)


def test_lsh_finds_near_duplicates():
    mh = MinHasher(128, 3)
    idx = LSHIndex(0.7, 128)
    text = "the quick brown fox jumps over the lazy dog " * 5 + "and then it runs far away into the forest"
    near = text.replace("forest", "woods")
    far = "completely different content about the theory of relativity and physics experiments"
    sig = mh.signatures_batch([text, near, far])
    keys = idx.band_keys(sig)
    idx.insert(0, sig[0], keys[0])
    assert idx.best_match(sig[1], keys[1])[0] == 0
    assert idx.best_match(sig[2], keys[2]) is None


def test_dedup_exact_near_and_keep_longest():
    retracted = {}
    base = (
        "Explain photosynthesis in plants. It converts light energy into chemical energy stored in sugar " * 3
    )
    its = items(
        ("Explain photosynthesis", base),
        ("explain   PHOTOSYNTHESIS", base.upper()),  # exact after folding case and spacing
        ("Explain photosynthesis", base + " Also oxygen."),  # near
        ("Something else", "An unrelated answer about volcanoes and rocks."),
    )
    d = Dedup(DedupConfig(compare="answer", threshold=0.8), lambda i, s, r: retracted.setdefault(i, r))
    d(its)
    assert its[1].reject[1].startswith("exact duplicate of #0")
    assert its[2].reject[1].startswith("near duplicate")
    assert its[3].reject is None
    # keep=longest: the longer later record replaces the kept one
    retracted.clear()
    its = items(("Explain photosynthesis", base), ("Explain photosynthesis", base + " Also oxygen."))
    Dedup(DedupConfig(compare="answer", keep="longest"), lambda i, s, r: retracted.setdefault(i, r))(its)
    assert its[1].reject is None and 0 in retracted and "longer" in retracted[0]


def test_dedup_on_real_data_finds_planted_copies():
    its = alpaca_items(300)
    copies = items(*((it.prompt, it.answer + " Thanks.") for it in its[:20]))
    for j, c in enumerate(copies):
        c.idx = 1000 + j
    d = Dedup(DedupConfig(), lambda *a: None)
    d(its + copies)
    assert sum(c.reject is not None for c in copies) >= 19
    assert sum(it.reject is not None for it in its) <= 3  # the demo set has a few real duplicates


# ------------------------------------------------------------------ contradictions


def test_contradictions_flagged_and_retracted():
    retracted, notes = {}, {}
    its = items(
        ("What is the capital of Australia?", "The capital of Australia is Canberra."),
        ("What is the capital of Australia?", "Sydney is the capital city of Australia, on the coast."),
        ("What is the boiling point of water at sea level?", "It boils at 100 degrees Celsius."),
        ("What is the boiling point of water at sea level?", "It boils at 90 degrees Celsius."),
        (
            "What is the boiling point of water at sea level?",
            "It boils at 100 degrees Celsius, at sea level.",
        ),
    )
    c = Contradictions(
        ContradictionsConfig(action="review"),
        lambda i, s, r: retracted.setdefault(i, r),
        lambda i, k, v: notes.setdefault(i, {}).update({k: v}),
    )
    c(its)
    assert its[1].reject and its[1].reject[0] == "contradictions"
    assert its[3].reject and "different numbers" in its[3].reject[1]
    assert its[4].reject is None  # a paraphrase with the same number
    assert set(retracted) == {0, 2}
    assert c.summary()["groups"] == 2


# ------------------------------------------------------------------ decontamination


def test_decontamination():
    eval_conv = make_conversation(
        "Summarise the article about the mountain resorts in Scotland",
        "Scotland's five mountain resorts attracted record numbers of skiers this season.",
    )
    d = Decontaminator(
        DecontamConfig(enabled=True, eval_sources=[{"path": "x"}], ngram=5, threshold=0.3),
        [("eval.jsonl", eval_conv)],
    )
    its = items(
        (
            "Summarise the article about the mountain resorts in Scotland",
            "Scotland's five mountain resorts attracted record numbers of skiers this season.",
        ),
        ("Write a poem about the sea", "The sea is wide and deep and blue."),
    )
    d(its)
    assert its[0].reject and "overlaps an evaluation set" in its[0].reject[1]
    assert its[1].reject is None


# ------------------------------------------------------------------ split


def test_split_is_deterministic_and_stable():
    convs = [make_conversation(f"question {i}", f"answer {i}") for i in range(2000)]
    first = [split_of(content_unit(c, 0), 0.1, 0.1) for c in convs]
    assert first == [split_of(content_unit(c, 0), 0.1, 0.1) for c in convs]
    counts = {s: first.count(s) for s in ("train", "val", "test")}
    assert 150 < counts["val"] < 250 and 150 < counts["test"] < 250
    # growing the data never moves an existing record; another seed draws another split
    assert [split_of(content_unit(c, 0), 0.1, 0.1) for c in convs[:500]] == first[:500]
    assert [split_of(content_unit(c, 1), 0.1, 0.1) for c in convs] != first


def test_stratified_split_exact_shares():
    cfg = SplitConfig(val=0.1, test=0.1, stratify_by="task")
    entries = [
        (i, "big" if i < 1000 else "small", content_unit(make_conversation(str(i), "a"), 0))
        for i in range(1020)
    ]
    out = stratified_assignment(entries, cfg)
    small = [out[i] for i in range(1000, 1020)]
    assert small.count("test") == 2 and small.count("val") == 2
    big = [out[i] for i in range(1000)]
    assert big.count("test") == 100 and big.count("val") == 100
