"""PII detection precision / recall per kind on a labelled set.

    python bench/pii_eval.py               # evaluate bench/data/pii_labelled.jsonl
    python bench/pii_eval.py --regenerate  # rebuild the labelled set (deterministic, seed 2024)

The set has positives of every kind in varied formats and contexts, and hard negatives (order
numbers, dates, version strings, ISBNs, UUIDs, git hashes, card-like numbers failing Luhn, IBANs
with a bad checksum, placeholders in code). A predicted span counts as a hit when it overlaps a
gold span of the same kind. Writes bench/results/pii_eval.json, with the machine record (its records/s
belong to a machine; precision and recall do not).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "pii_labelled.jsonl"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
STRUCTURED = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "URL_CREDENTIALS", "API_KEY")

FIRST = [
    "james",
    "maria",
    "wei",
    "fatima",
    "olga",
    "kwame",
    "lucia",
    "arjun",
    "sofia",
    "liam",
    "yuki",
    "omar",
]
LAST = ["smith", "garcia", "chen", "okafor", "novak", "haddad", "rossi", "patel", "muller", "kim", "silva"]
DOMAINS = [
    "example.com",
    "mail.example.org",
    "acme-corp.co.uk",
    "uni.edu",
    "startup.io",
    "post.example.de",
    "company.com.au",
    "health-clinic.net",
]


# ------------------------------------------------------------------ value generators


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


def iban(country: str, length: int, rng: random.Random, valid: bool = True) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    if country == "GB":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + bban[4:]
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    check = 98 - num % 97
    if not valid:
        check = (check % 97) + 1 if check != 97 else 2
    return f"{country}{check:02d}{bban}"


def group4(s: str) -> str:
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


def gen_email(rng):
    f, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice(
        [
            f"{f}.{last}",
            f"{f}{rng.randint(1, 99)}",
            f"{f[0]}{last}",
            f"{f}_{last}+news",
            f"{f}-{last}",
            f"{f.capitalize()}.{last.capitalize()}",
        ]
    )
    return f"{local}@{rng.choice(DOMAINS)}"


def gen_phone(rng):
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    a = str(rng.randint(201, 989))
    return rng.choice(
        [
            f"({a}) 555-{d(4)}",
            f"{a}-555-{d(4)}",
            f"{a}.555.{d(4)}",
            f"+1 {a} 555 {d(4)}",
            f"+1-{a}-555-{d(4)}",
            f"1-800-{d(3)}-{d(4)}",
            f"+44 20 {d(4)} {d(4)}",
            f"020 {d(4)} {d(4)}",
            f"+44 7700 {d(6)}",
            f"+49 30 {d(8)}",
            f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"+91 98{d(3)} {d(5)}",
            f"+61 2 {d(4)} {d(4)}",
            f"+81 3-{d(4)}-{d(4)}",
            f"+34 91 {d(3)} {d(2)} {d(2)}",
        ]
    )


def gen_card(rng):
    kind = rng.choice(["visa", "mc", "amex", "disc", "mc2"])
    if kind == "amex":
        n = luhn_complete(rng.choice(["34", "37"]), 15, rng)
        return rng.choice([f"{n[:4]} {n[4:10]} {n[10:]}", f"{n[:4]}-{n[4:10]}-{n[10:]}", n])
    prefix = {"visa": "4", "mc": str(rng.randint(51, 55)), "disc": "6011", "mc2": "2221"}[kind]
    n = luhn_complete(prefix, 16, rng)
    return rng.choice([group4(n), "-".join(n[i : i + 4] for i in range(0, 16, 4)), n])


IBAN_COUNTRIES = [
    ("DE", 22),
    ("GB", 22),
    ("FR", 27),
    ("NL", 18),
    ("ES", 24),
    ("IT", 27),
    ("CH", 21),
    ("BE", 16),
]


def gen_iban(rng, valid=True):
    c, n = rng.choice(IBAN_COUNTRIES)
    if c == "NL":  # NL has 4 letters of bank code
        return (lambda s: group4(s) if rng.random() < 0.6 else s)(iban_nl(rng, valid))
    s = iban(c, n, rng, valid)
    return group4(s) if rng.random() < 0.6 else s


def iban_nl(rng, valid=True):
    bank = "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
    acct = "".join(rng.choice(string.digits) for _ in range(10))
    num = int("".join(str(int(c, 36)) for c in bank + acct + "NL00"))
    check = 98 - num % 97
    if not valid:
        check = check % 97 + 1
    return f"NL{check:02d}{bank}{acct}"


def gen_ssn(rng):
    area = rng.choice([x for x in range(1, 900) if x != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def gen_ip(rng):
    if rng.random() < 0.7:
        return ".".join(
            str(x)
            for x in [
                rng.choice([10, 172, 192, 8, 34, 203]),
                rng.randint(0, 255),
                rng.randint(0, 255),
                rng.randint(1, 254),
            ]
        )
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups)
    return f"2001:db8:{groups[2]}::{groups[7]}"


def gen_url_cred(rng):
    scheme = rng.choice(["postgres", "mysql", "https", "ftp", "mongodb+srv", "redis", "amqp"])
    user = rng.choice(FIRST)
    pw = "".join(rng.choice(string.ascii_letters + string.digits + "!$") for _ in range(rng.randint(8, 14)))
    host = rng.choice(["db.internal", "10.0.0.5", "cluster0.mongo.example.net", "files.example.com"])
    port = rng.choice(["", ":5432", ":6379", ":21"])
    return f"{scheme}://{user}:{pw}@{host}{port}/{rng.choice(['app', 'prod', 'data'])}"


def rnd(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


AN = string.ascii_letters + string.digits


def gen_api_key(rng):
    return rng.choice(
        [
            "AKIA" + rnd(rng, string.ascii_uppercase + string.digits, 16),
            "ghp_" + rnd(rng, AN, 36),
            "sk-proj-" + rnd(rng, AN + "_-", 48),
            "sk-ant-api03-" + rnd(rng, AN + "_-", 60),
            "xoxb-"
            + rnd(rng, string.digits, 12)
            + "-"
            + rnd(rng, string.digits, 12)
            + "-"
            + rnd(rng, AN, 24),
            "AIza" + rnd(rng, AN + "_-", 35),
            "sk_live_" + rnd(rng, AN, 24),
            "hf_" + rnd(rng, AN, 34),
            "glpat-" + rnd(rng, AN, 20),
            "eyJhbGciOiJIUzI1NiJ9.eyJ" + rnd(rng, AN, 30) + "." + rnd(rng, AN + "_-", 43),
        ]
    )


def gen_secret(rng):
    return rng.choice(
        [
            rnd(rng, AN + "!@#%^&*", rng.randint(10, 16)),
            rnd(rng, AN, 32),
            rnd(rng, AN + "+/", 40),
        ]
    )


CONTEXTS = {
    "EMAIL": [
        "Please send the signed form to {v} by Friday.",
        "Contact: {v}",
        "cc {v} on the thread",
        "My email is {v}, reply any time.",
        "<{v}> wrote: thanks for the update",
        "| Alice | {v} | 30 |",
        "For press enquiries write to {v}.",
    ],
    "PHONE": [
        "Call me on {v} after 5pm.",
        "Phone: {v}",
        "You can reach the front desk at {v}.",
        "Tel. {v} (office)",
        "Our hotline {v} is open 24/7.",
        "mobile {v}",
        "Fax: {v}",
        "Text STOP to {v} to unsubscribe.",
    ],
    "CREDIT_CARD": [
        "Charge it to card {v}, expiry 08/27.",
        "card number: {v}",
        "Visa {v} was declined.",
        "Payment method: {v} (CVV on file)",
        "pls use my card {v} thx",
    ],
    "IBAN": [
        "Transfer the deposit to IBAN {v}.",
        "Bank details: {v}, BIC DEUTDEFF",
        "IBAN: {v}",
        "Refunds go to {v} within 5 days.",
    ],
    "SSN": [
        "SSN: {v}",
        "Her social security number is {v}.",
        "Applicant SSN {v} verified.",
        "ssn={v}; dob=1984-02-11",
    ],
    "IP_ADDRESS": [
        "The server {v} stopped responding.",
        "Failed login from {v} at 03:12.",
        "ping {v}",
        "Allow traffic from {v} in the firewall.",
        "host={v} port=443",
    ],
    "URL_CREDENTIALS": [
        "DATABASE_URL={v}",
        "Connect with {v} and run the migration.",
        "git clone {v}",
        "the broker is at {v}",
    ],
    "API_KEY": [
        "export OPENAI_API_KEY={v}",
        "Authorization: Bearer {v}",
        "I accidentally committed {v} to git.",
        'key = "{v}"',
        "Use token {v} for the CI job.",
    ],
    "SECRET": [
        "password: {v}",
        "DB_PASSWORD={v}",
        "The admin passphrase is {v}",
        "client_secret = '{v}'",
        "auth_token: {v}",
    ],
}


def hard_negatives(rng: random.Random) -> list[str]:
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    bad_card = luhn_complete("4", 16, rng)
    bad_card = bad_card[:-1] + str((int(bad_card[-1]) + rng.randint(1, 9)) % 10)
    ssn_bad = rng.choice(["000", "666", "912"]) + f"-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    return [
        f"Order #{d(10)} has shipped.",
        f"Your order number is A-2024-{d(6)}.",
        f"Invoice INV-{d(8)} is overdue.",
        f"The meeting is on 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} at 10:30.",
        f"Born {rng.randint(1, 28)}/{rng.randint(1, 12)}/19{d(2)} in Leeds.",
        f"Upgrade to v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)} for the fix.",
        f"Windows version 10.0.{d(5)}.{d(4)} is installed.",
        f"python {rng.randint(2, 3)}.{rng.randint(6, 12)}.{d(1)}",
        f"ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)} is on the back cover.",
        f"Tracking number 1Z{d(3)}AA1{d(8)}.",
        f"Request id {rng.getrandbits(128):032x} failed.",
        f"uuid: {rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-a{rng.getrandbits(12):03x}-"
        f"{rng.getrandbits(48):012x}",
        f"commit {rng.getrandbits(160):040x}",
        f"The total was ${rng.randint(1, 9)},{d(3)}.{d(2)}.",
        f"Population: {rng.randint(1, 9)},{d(3)},{d(3)} people.",
        f"It happened at {rng.randint(0, 23)}:{d(2)}:{d(2)}.",
        f"Coordinates {rng.randint(10, 60)}.{d(4)}, -{rng.randint(0, 9)}.{d(4)}",
        f"pi is about 3.{d(8)}",
        f"ZIP 9{d(4)}-{d(4)}",
        f"SKU {d(5)}-{d(2)}-{d(1)} is out of stock.",
        f"Call extension {d(4)} internally.",
        f"The card-like number {group4(bad_card)} fails the Luhn check.",
        f"Account {iban('DE', 22, rng, valid=False)} is not a valid IBAN.",
        "Email me at user@localhost for local testing.",
        "Follow @acme_support on social media.",
        "const apiKey = 'API_KEY';",
        "password: your_password_here",
        "Set token = getToken() before calling.",
        f"Reference {ssn_bad} is not an SSN.",
        f"Invalid address 999.{rng.randint(0, 255)}.1.1 in the log.",
        f"Chapter {rng.randint(1, 20)}.{rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 9)} covers proofs.",
        f"Scores: {d(2)} {d(2)} {d(2)} {d(2)} {d(2)}.",
        "In 1990 2000 2010 and 2020 the census ran.",
        "Use the function snake_case_function_name_for_testing in utils.",
        f"Room {d(3)}, building {d(1)}, floor {d(1)}.",
        f"Call me maybe, around {rng.randint(1, 12)} pm.",
        "See https://docs.example.com/guide?page=2 for details.",
        f"The flight LH{d(4)} departs at 07:45.",
        f"Part no. {d(3)}-{d(3)}-{d(4)} fits model X.",
        f"Serial {d(4)}-{d(4)}-{d(4)}-{d(4)}-{d(2)} on the label.",
    ]


FILLERS = [
    "Hi team,",
    "Quick note:",
    "As discussed,",
    "FYI -",
    "Hello!",
    "Update:",
    "",
    "Thanks again.",
    "Let me know if anything is missing.",
    "Best regards, Sam",
    "Ticket #4521:",
]


def generate(seed: int = 2024) -> list[dict]:
    rng = random.Random(seed)
    gens = {
        "EMAIL": gen_email,
        "PHONE": gen_phone,
        "CREDIT_CARD": gen_card,
        "IBAN": gen_iban,
        "SSN": gen_ssn,
        "IP_ADDRESS": gen_ip,
        "URL_CREDENTIALS": gen_url_cred,
        "API_KEY": gen_api_key,
        "SECRET": gen_secret,
    }
    records = []

    def add(parts: list[tuple[str, str | None]]):
        text, spans = "", []
        for chunk, kind in parts:
            if kind:
                spans.append({"start": len(text), "end": len(text) + len(chunk), "kind": kind})
            text += chunk
        records.append({"id": len(records), "text": text, "spans": spans})

    for kind, gen in gens.items():
        for _ in range(28):
            ctx = rng.choice(CONTEXTS[kind])
            pre, post = ctx.split("{v}")
            lead = rng.choice(FILLERS)
            tail = rng.choice(FILLERS)
            add([(f"{lead} {pre}".lstrip(), None), (gen(rng), kind), (f"{post} {tail}".rstrip(), None)])
    # records with several kinds
    for _ in range(40):
        kinds = rng.sample(list(gens), 3)
        parts: list[tuple[str, str | None]] = [(rng.choice(FILLERS) + " ", None)]
        for k in kinds:
            pre, post = rng.choice(CONTEXTS[k]).split("{v}")
            parts += [(pre, None), (gens[k](rng), k), (post + " ", None)]
        add(parts)
    # hard negatives, twice over with fresh values, plus negatives inside longer text
    for _ in range(3):
        for neg in hard_negatives(rng):
            add([(f"{rng.choice(FILLERS)} {neg}".lstrip(), None)])
    return records


# ------------------------------------------------------------------ evaluation


def evaluate(records: list[dict]) -> dict:
    sys.path.insert(0, str(HERE.parent / "src"))
    from llamaforge.data.curate.pii import PII_KINDS, PIIDetector

    det = PIIDetector()
    tp, fp, fn = Counter(), Counter(), Counter()
    errors = []
    t0 = time.perf_counter()
    for rec in records:
        pred = det.detect(rec["text"])
        gold = rec["spans"]
        matched_gold = set()
        for p in pred:
            hit = next(
                (
                    i
                    for i, g in enumerate(gold)
                    if g["kind"] == p.kind
                    and p.start < g["end"]
                    and g["start"] < p.end
                    and i not in matched_gold
                ),
                None,
            )
            if hit is None:
                fp[p.kind] += 1
                errors.append(
                    {"id": rec["id"], "type": "FP", "kind": p.kind, "text": rec["text"][p.start : p.end]}
                )
            else:
                matched_gold.add(hit)
                tp[p.kind] += 1
        for i, g in enumerate(gold):
            if i not in matched_gold:
                fn[g["kind"]] += 1
                errors.append(
                    {
                        "id": rec["id"],
                        "type": "FN",
                        "kind": g["kind"],
                        "text": rec["text"][g["start"] : g["end"]],
                    }
                )
    seconds = time.perf_counter() - t0
    per_kind = {}
    for k in PII_KINDS:
        p = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else None
        r = tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else None
        per_kind[k] = {
            "support": tp[k] + fn[k],
            "tp": tp[k],
            "fp": fp[k],
            "fn": fn[k],
            "precision": None if p is None else round(p, 4),
            "recall": None if r is None else round(r, 4),
        }
    T, F, N = sum(tp.values()), sum(fp.values()), sum(fn.values())
    negatives = [r for r in records if not r["spans"]]
    clean = sum(1 for r in negatives if not det.detect(r["text"]))
    return {
        "records": len(records),
        "gold_spans": T + N,
        "negative_records": len(negatives),
        "negative_records_clean": clean,
        "micro_precision": round(T / (T + F), 4) if T + F else None,
        "micro_recall": round(T / (T + N), 4) if T + N else None,
        "structured_min_recall": min(
            per_kind[k]["recall"] for k in STRUCTURED if per_kind[k]["recall"] is not None
        ),
        "per_kind": per_kind,
        "records_per_s": round(len(records) / seconds, 1),
        "errors": errors[:50],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument(
        "--fresh-seed",
        type=int,
        default=None,
        help="evaluate on a freshly generated set with this seed instead (a held-out check)",
    )
    args = ap.parse_args()
    if args.regenerate or not DATA.is_file():
        DATA.parent.mkdir(parents=True, exist_ok=True)
        recs = generate()
        DATA.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        print(f"wrote {len(recs)} records to {DATA}")
    if args.fresh_seed is not None:
        records = generate(args.fresh_seed)
    else:
        records = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()]
    from machine import describe

    machine = describe(None)
    res = evaluate(records)
    res["machine"] = machine.record()
    print(machine.line())
    res["set"] = (
        f"fresh seed {args.fresh_seed}" if args.fresh_seed is not None else str(DATA.relative_to(HERE.parent))
    )
    print(f"{'kind':<16}{'support':>8}{'precision':>11}{'recall':>8}")
    for k, v in res["per_kind"].items():
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{k:<16}{v['support']:>8}{fmt(v['precision']):>11}{fmt(v['recall']):>8}")
    print(
        f"micro precision {res['micro_precision']}, recall {res['micro_recall']}; hard-negative records clean "
        f"{res['negative_records_clean']}/{res['negative_records']}; {res['records']} records"
    )
    for e in res["errors"][:20]:
        print("  ", e)
    RESULTS.mkdir(exist_ok=True)
    name = "pii_eval.json" if args.fresh_seed is None else f"pii_eval_seed{args.fresh_seed}.json"
    (RESULTS / name).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
