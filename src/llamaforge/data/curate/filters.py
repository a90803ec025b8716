"""Step 3, filters: empty answers, token-length bounds, repetition, refusals, language, profanity,
and a pluggable classifier. Each rejection names the filter and the measured value."""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llamaforge.data.curate.config import FiltersConfig
from llamaforge.data.curate.records import Item
from llamaforge.errors import ConfigError

STEP = "filters"

_REFUSALS = [
    r"\bas an ai(?: language)? model\b",
    r"\bas a(?:n)? (?:large )?language model\b",
    r"\bas an ai(?: assistant)?,? i (?:do not|don't|cannot|can't|am not able|am unable)\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? (?:but )?i (?:cannot|can't|am unable to|won't|am not able to)\b",
    r"\bi (?:cannot|can't|won't) (?:help|assist|provide|fulfil+|comply|generate|create) (?:with )?(?:that|this|your)\b",
    r"\bi(?:'m| am) not able to (?:help|assist|provide|fulfil+|comply) (?:with )?(?:that|this)\b",
    r"\bi (?:do not|don't) have (?:personal )?(?:opinions|feelings|emotions|beliefs|preferences)\b",
    r"\b(?:openai|open ai)'?s? (?:content |use )?polic(?:y|ies)\b",
]

# A small lexicon of strong profanity; extend it with `profanity_words` / `profanity_file`.
_PROFANITY = [
    "fuck",
    "fucks",
    "fucked",
    "fucker",
    "fuckers",
    "fucking",
    "motherfucker",
    "motherfucking",
    "shit",
    "shits",
    "shitty",
    "bullshit",
    "cunt",
    "cunts",
    "asshole",
    "assholes",
    "bitch",
    "bitches",
    "bastard",
    "bastards",
    "dickhead",
    "dickheads",
    "wanker",
    "wankers",
    "twat",
    "twats",
    "piss off",
    "goddamn",
    "douchebag",
    "slut",
    "sluts",
    "whore",
    "whores",
    "faggot",
    "faggots",
    "nigger",
    "niggers",
    "kike",
    "kikes",
    "spic",
    "spics",
    "chink",
    "chinks",
    "tranny",
]


# Literal words one of the built-in refusal patterns needs (a cheap gate before the regex).
_REFUSAL_KEYS = (
    "as an ai",
    "language model",
    "sorry",
    "afraid",
    "cannot",
    "can't",
    "won't",
    "not able to",
    "unable",
    "don't have",
    "do not have",
    "openai",
    "open ai",
)
_WORD_TABLE = bytes((ord(chr(c).lower()) if chr(c).isalnum() else 32) if c < 128 else c for c in range(256))


def load_classifier(spec: str) -> Callable[[list[str]], Sequence[float]]:
    if ":" not in spec:
        raise ConfigError(f"filters.classifier '{spec}' must look like 'module:function'")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"filters.classifier '{spec}' cannot be loaded: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"filters.classifier '{spec}' is not callable")
    return fn


class TokenCounter:
    """Counts tokens of the target model; whitespace words when no tokenizer is given."""

    def __init__(self, tokenizer: Any = None):
        self.name = "whitespace words"
        self.warning: str | None = None
        self._encode_batch: Callable[[list[str]], list[int]] | None = None
        if tokenizer is None:
            self.warning = (
                "no tokenizer given (filters.tokenizer): length bounds count whitespace-separated words, "
                "not tokens of the target model"
            )
            return
        if isinstance(tokenizer, (str, Path)):
            tokenizer = self._load(Path(tokenizer))
        self._setup(tokenizer)

    @staticmethod
    def _load(path: Path) -> Any:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file() and file.suffix == ".json":
            try:
                return Tokenizer.from_file(str(file))
            except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
                raise ConfigError(f"filters.tokenizer: cannot read {file}: {exc}") from exc
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"filters.tokenizer: cannot load a tokenizer from '{path}': {exc}") from exc

    def _setup(self, tok: Any) -> None:
        backend = getattr(tok, "backend_tokenizer", None) or tok
        if hasattr(backend, "encode_batch"):
            self.name = getattr(tok, "name_or_path", None) or "tokenizers.Tokenizer"

            def enc(texts: list[str]) -> list[int]:
                return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]

            self._encode_batch = enc
        elif callable(getattr(tok, "encode", None)):
            self.name = type(tok).__name__

            def enc(texts: list[str]) -> list[int]:
                return [len(tok.encode(t, add_special_tokens=False)) for t in texts]

            self._encode_batch = enc
        else:
            raise ConfigError(f"filters.tokenizer: {type(tok).__name__} has neither encode_batch nor encode")

    def counts(self, texts: list[str]) -> list[int]:
        if self._encode_batch is None:
            return [len(t.split()) for t in texts]
        return self._encode_batch(texts)


class Filters:
    def __init__(self, cfg: FiltersConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.counter = TokenCounter(tokenizer if tokenizer is not None else cfg.tokenizer)
        self.warnings: list[str] = [self.counter.warning] if self.counter.warning else []
        refusals = _REFUSALS + list(cfg.extra_refusal_patterns)
        self._refusal = (
            re.compile("|".join(f"(?:{p})" for p in refusals), re.IGNORECASE) if cfg.refusals else None
        )
        self._char_run = (
            re.compile(r"([^\s\-=_*#.~`|+])\1{" + str(cfg.max_char_run - 1) + ",}")
            if cfg.repetition
            else None
        )
        words = list(_PROFANITY) + list(cfg.profanity_words)
        if cfg.profanity_file:
            path = Path(cfg.profanity_file)
            if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
                raise ConfigError(f"filters.profanity_file: {path} is not a regular file")
            try:
                words += [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"filters.profanity_file: cannot read {path}: {exc}") from exc
        alternatives = "|".join(
            re.escape(w).replace(r"\ ", r"\s+") for w in sorted(set(words), key=len, reverse=True)
        )
        self._profanity = (
            re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if cfg.profanity and words else None
        )
        # gate: any lexicon word among the record's words (multi-word phrases: their first word)
        self._profanity_words = {w.lower().split()[0].encode() for w in words if w.strip()}
        self._refusal_gated = not cfg.extra_refusal_patterns
        self._detect = self._language_detector() if cfg.language else None
        self._classifier = load_classifier(cfg.classifier) if cfg.classifier else None

    def _language_detector(self) -> Callable[[str], str] | None:
        try:
            from langdetect import DetectorFactory, detect

            DetectorFactory.seed = 0
            return detect
        except ImportError:
            pass
        try:
            import langid

            return lambda text: langid.classify(text)[0]
        except ImportError:
            self.warnings.append(
                "filters.language is set but no detector (langdetect or langid) is installed: "
                "the language filter was skipped"
            )
            return None

    def _lengths(self, live: list[Item]) -> list[int]:
        """Prompt lengths then answer lengths. `lengths: exact` tokenizes everything (one batched
        call); `lengths: bounds` tokenizes only texts whose UTF-8 size could cross a bound (a token
        is at least one byte), so every decision is the same and the rest is counted in words."""
        texts = [it.prompt for it in live] + [it.answer for it in live]
        if self.cfg.lengths == "exact" or self.counter._encode_batch is None:
            return self.counter.counts(texts)
        cfg, n = self.cfg, len(live)
        caps = [cfg.max_prompt_tokens] * n + [cfg.max_answer_tokens] * n
        total = [len(it.prompt.encode()) + len(it.answer.encode()) for it in live] * 2
        need = []
        for i, t in enumerate(texts):
            size = len(t.encode()) if not t.isascii() else len(t)
            mins = cfg.min_prompt_tokens if i < n else cfg.min_answer_tokens
            if (
                (caps[i] is not None and size > caps[i])
                or mins > 1
                or (cfg.max_total_tokens is not None and total[i] > cfg.max_total_tokens)
            ):
                need.append(i)
        counts = [len(t.split()) for t in texts]
        if need:
            for i, c in zip(need, self.counter.counts([texts[i] for i in need]), strict=False):
                counts[i] = c
        return counts

    def _repetition(self, text: str) -> str | None:
        cfg = self.cfg
        if "\n" in text:
            lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
            if len(lines) >= 4:
                frac = 1 - len(set(lines)) / len(lines)
                if frac > cfg.max_dup_line_fraction:
                    return f"repetition: {frac:.0%} of lines repeated (max {cfg.max_dup_line_fraction:.0%})"
        words = text.lower().split()
        if len(words) >= 24:
            grams = Counter(zip(words, words[1:], words[2:], words[3:], strict=False))
            top, n = grams.most_common(1)[0]
            frac = n * 4 / len(words)
            if n > 2 and frac > cfg.max_top_ngram_fraction:
                return (
                    f"repetition: the 4-gram '{' '.join(top)}' covers {frac:.0%} of the words "
                    f"(max {cfg.max_top_ngram_fraction:.0%})"
                )
        if self._char_run is not None:
            m = self._char_run.search(text)
            if m:
                return f"repetition: a run of {len(m.group(0))} '{m.group(1)}' characters"
        return None

    def __call__(self, items: list[Item]) -> None:
        cfg = self.cfg
        live = [it for it in items if it.reject is None]
        if cfg.empty_answer:
            for it in live:
                if not it.answer.strip():
                    it.rejected(STEP, "empty answer", "answer")
                elif not it.conv.raw_text and not it.prompt.strip():
                    it.rejected(STEP, "empty prompt", "prompt")
            live = [it for it in live if it.reject is None]
        counts = self._lengths(live)
        n = len(live)
        for i, it in enumerate(live):
            p, a = counts[i], counts[n + i]
            it.cache["prompt_tokens"], it.cache["answer_tokens"] = p, a
            unit = "tokens" if self.counter._encode_batch else "words"
            if not it.conv.raw_text and p < cfg.min_prompt_tokens:
                it.rejected(STEP, f"length: prompt has {p} {unit} (min {cfg.min_prompt_tokens})", "prompt")
            elif cfg.max_prompt_tokens is not None and p > cfg.max_prompt_tokens:
                it.rejected(STEP, f"length: prompt has {p} {unit} (max {cfg.max_prompt_tokens})", "prompt")
            elif a < cfg.min_answer_tokens:
                it.rejected(STEP, f"length: answer has {a} {unit} (min {cfg.min_answer_tokens})", "answer")
            elif cfg.max_answer_tokens is not None and a > cfg.max_answer_tokens:
                it.rejected(STEP, f"length: answer has {a} {unit} (max {cfg.max_answer_tokens})", "answer")
            elif cfg.max_total_tokens is not None and p + a > cfg.max_total_tokens:
                it.rejected(STEP, f"length: {p + a} {unit} in all (max {cfg.max_total_tokens})", None)
        live = [it for it in live if it.reject is None]
        for it in live:
            answer = it.answer
            if cfg.repetition:
                why = self._repetition(answer)
                if why:
                    it.rejected(STEP, why, "answer")
                    continue
            low = answer.lower()
            if self._refusal is not None and (
                not self._refusal_gated or any(k in low for k in _REFUSAL_KEYS)
            ):
                m = self._refusal.search(answer)
                if m:
                    it.rejected(STEP, f"refusal: '{m.group(0)}'", "answer")
                    continue
            if self._profanity is not None:
                both = f"{it.prompt}\n{answer}"
                tokens = set(both.encode("utf-8", "surrogatepass").translate(_WORD_TABLE).split())
                m = self._profanity.search(both) if tokens & self._profanity_words else None
                if m:
                    it.rejected(STEP, f"profanity: '{m.group(0).lower()}'", None)
                    continue
            if self._detect is not None:
                try:
                    lang = self._detect(answer[:1000])
                except Exception:  # noqa: BLE001 - detectors raise on text without features
                    lang = "unknown"
                it.cache["language"] = lang
                if lang not in cfg.language:
                    it.rejected(STEP, f"language: {lang} (keep {cfg.language})", "answer")
        if self._classifier is not None:
            live = [it for it in live if it.reject is None]
            if live:
                scores = list(self._classifier([f"{it.prompt}\n{it.answer}" for it in live]))
                if len(scores) != len(live):
                    raise ConfigError(
                        f"filters.classifier returned {len(scores)} scores for {len(live)} texts"
                    )
                for it, score in zip(live, scores, strict=False):
                    if float(score) >= cfg.classifier_threshold:
                        it.rejected(
                            STEP, f"classifier: score {float(score):.3f} >= {cfg.classifier_threshold}"
                        )

    def describe(self) -> dict[str, Any]:
        return {
            "length_unit": self.counter.name,
            "warnings": self.warnings,
            "config": json.loads(self.cfg.model_dump_json()),
        }
