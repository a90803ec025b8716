"""Throughput of `llamaforge prepare` on 100,000 alpaca-like records.

The records are built by resampling the real demo set (the `alpaca-demo` catalog entry) and perturbing each copy strongly (word substitutions, sentence
shuffles) so that copies are distinct records; then known duplicates are planted (exact copies,
and near copies with case / spacing / a few words changed) together with PII. The pipeline runs
normalise + filters + PII + exact and near dedup + split (rejects, report and card included;
Arrow export off) and the benchmark reports records/s per step, peak RSS and the recall of the
planted duplicates, below the machine line (bench/machine.py: CPU, ISA, cores; no precision, the pipeline
does no tensor math). Writes bench/results/curate_throughput_<minhash>.json. Never asserts on time.

    python bench/curate_throughput.py [--records 100000] [--tokenizer llama3-tokenizer|PATH|none]
        [--minhash classic|oph]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

PII_SNIPPETS = [
    "Contact me at {f}.{l}@example.com for details.",
    "Call +1 415 555 {n4} for help.",
    "My card is 4539 1488 0343 6467.",
    "Wire it to DE89 3704 0044 0532 0130 00.",
    "Server 10.{a}.{b}.7 is the primary.",
    "SSN 123-45-{n4} on file.",
]


def load_demo() -> list[dict]:
    from llamaforge.catalog import resolve

    path = resolve("alpaca-demo")
    return json.loads(path.read_text(encoding="utf-8"))


def perturb_strong(text: str, vocab: list[str], rng: random.Random) -> str:
    sentences = [s for s in text.replace("\n", " \n ").split(". ") if s]
    if len(sentences) > 2:
        rng.shuffle(sentences)
    words = ". ".join(sentences).split(" ")
    for i in range(len(words)):
        if rng.random() < 0.25:
            words[i] = rng.choice(vocab)
    return " ".join(words)


def perturb_light(text: str, rng: random.Random) -> str:
    """A near copy: one word in 40 changed (texts of 30+ words), plus case, spacing or punctuation noise."""
    words = text.split(" ")
    if len(words) >= 30:
        for _ in range(len(words) // 40 or 1):
            i = rng.randrange(len(words))
            words[i] = rng.choice(["the", "a", "this", "that"])
    out = " ".join(words)
    return rng.choice([out, out.lower(), out.replace(" ", "  ", 3), out + " ", out.replace(".", "!", 1)])


def build(n: int, seed: int = 0) -> tuple[list[dict], dict[int, int]]:
    """Records and the planted duplicates: {index of the copy: index of the original}."""
    rng = random.Random(seed)
    demo = load_demo()
    vocab = sorted({w for r in demo for w in r["output"].split() if w.isalpha()})
    records: list[dict] = []
    planted: dict[int, int] = {}
    uniques: list[int] = []
    while len(records) < n:
        roll = rng.random()
        if uniques and roll < 0.05:  # exact duplicate of an earlier unique record
            j = rng.choice(uniques)
            records.append(dict(records[j]))
            planted[len(records) - 1] = j
            continue
        if uniques and roll < 0.15:  # near duplicate
            j = rng.choice(uniques)
            src = records[j]
            records.append(
                {
                    "instruction": perturb_light(src["instruction"], rng),
                    "input": src["input"],
                    "output": perturb_light(src["output"], rng),
                }
            )
            planted[len(records) - 1] = j
            continue
        base = rng.choice(demo)
        rec = {
            "instruction": perturb_strong(base["instruction"], vocab, rng) + f" (case {len(records)})",
            "input": base["input"],
            "output": perturb_strong(base["output"], vocab, rng),
        }
        if rng.random() < 0.05:
            rec["output"] += " " + rng.choice(PII_SNIPPETS).format(
                f=rng.choice(["ann", "bo", "cy"]),
                l=rng.choice(["lee", "ng", "ortiz"]),
                n4=f"{rng.randint(0, 9999):04d}",
                a=rng.randint(0, 255),
                b=rng.randint(0, 255),
            )
        records.append(rec)
        uniques.append(len(records) - 1)
    return records, planted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument(
        "--tokenizer",
        default="llama3-tokenizer",
        help="a tokenizer folder, a catalog name, or none (length filters in characters)",
    )
    ap.add_argument("--lengths", choices=["exact", "bounds"], default="bounds")
    ap.add_argument("--minhash", choices=["classic", "oph"], default="classic")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    args = ap.parse_args()

    from llamaforge.config import DataSource
    from llamaforge.data.curate.config import PrepareConfig
    from llamaforge.data.curate.pipeline import run_prepare
    from machine import describe

    if args.tokenizer != "none" and not Path(args.tokenizer).is_dir():
        from llamaforge.catalog import resolve

        args.tokenizer = str(resolve(args.tokenizer))
    machine = describe(None)
    print(machine.line(), flush=True)

    t0 = time.perf_counter()
    records, planted = build(args.records)
    build_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    src = work / "data.jsonl"
    with src.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    del records
    cfg = PrepareConfig.model_validate(
        {
            "output_dir": str(work / "out"),
            "arrow": False,
            "filters": {
                "tokenizer": None if args.tokenizer == "none" else args.tokenizer,
                "lengths": args.lengths,
            },
            "dedup": {"minhash": args.minhash},
            "contradictions": {"enabled": False},
            "review": {"enabled": False},
        }
    )
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_prepare(cfg, [DataSource(path=str(src))])
    total_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    # planted-duplicate recall (reader line = index + 1), over the copies whose original and copy
    # both reached the dedup step (a refusal copied is already dropped by the filters)
    dropped_dups: set[int] = set()
    dropped_before: set[int] = set()
    with (work / "out" / "rejects.jsonl").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["step"] == "dedup":
                dropped_dups.add(r["line"] - 1)
            elif r["step"] in ("ingest", "normalize", "filters", "pii"):
                dropped_before.add(r["line"] - 1)
    eligible = {c for c, o in planted.items() if c not in dropped_before and o not in dropped_before}
    recall = len(eligible & dropped_dups) / len(eligible) if eligible else None
    false_drops = len(dropped_dups - set(planted))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "records": args.records,
        "planted_duplicates": len(planted),
        "planted_reaching_dedup": len(eligible),
        "planted_recall": round(recall, 4),
        "non_planted_dropped_as_duplicate": false_drops,
        "seconds_total": round(total_s, 2),
        "cpu_seconds_total": round(cpu_s, 2),
        "records_per_s_total": round(args.records / total_s, 1),
        "seconds_build_data": round(build_s, 2),
        "peak_rss_mb": round(rss_mb, 1),
        "tokenizer": args.tokenizer,
        "lengths": args.lengths,
        "minhash": args.minhash,
        "steps": {
            k: {key: v[key] for key in ("in", "out", "seconds", "cpu_seconds", "records_per_s")}
            for k, v in report["steps"].items()
        },
        "splits": report["splits"],
        "pii": report.get("pii", {}).get("counts"),
    }
    result["machine"] = machine.record()
    print(machine.line())
    print(f"{'step':<15}{'in':>9}{'out':>9}{'seconds':>9}{'cpu s':>8}{'records/s':>11}")
    for k, v in result["steps"].items():
        print(
            f"{k:<15}{v['in']:>9}{v['out']:>9}{v['seconds']:>9.2f}{v['cpu_seconds']:>8.2f}"
            f"{(v['records_per_s'] or 0):>11.0f}"
        )
    print(
        f"total {total_s:.1f} s wall, {cpu_s:.1f} s CPU ({result['records_per_s_total']:.0f} records/s), "
        f"peak RSS {rss_mb:.0f} MB, "
        f"planted-duplicate recall {recall:.4f} ({len(planted)} planted), {false_drops} other records dropped as "
        "duplicates"
    )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"curate_throughput_{args.minhash}.json").write_text(
        json.dumps(result, indent=2), encoding="utf-8"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
