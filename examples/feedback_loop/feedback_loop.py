"""The feedback loop end to end, on the CPU: serve a tune, let users rate its answers, turn the ratings
into KTO data, tune on them, gate the new adapter against the served one, canary it, promote it.

    python examples/feedback_loop/feedback_loop.py --workdir /tmp/loop

1. A quickstart-style LoRA run (the default model, the identity data, a few steps) is served as
   `assistant` by the gateway, with API keys and an audit log.
2. Simulated users ask identity questions. The rule they rate by: an answer that says the assistant
   is Forge gets "up"; any other gets "down" and a correction ("I am Forge, ..."). Alice and Bob
   rate their own answers; feedback.jsonl grows beside the audit log.
3. `llamaforge prepare` turns the log into KTO examples (`format: feedback`, kind binary).
4. A KTO tune runs on them.
5. `llamaforge promote` compares it with the served adapter on held-out questions (never asked by
   the users), canaries it to 50% of callers, then promotes it to all.
6. The share of held-out answers that say "Forge" is printed before and after the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import httpx

ASKED = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "What should I call you?",
    "Are you ChatGPT?", "Tell me about yourself.", "Which assistant am I talking to?", "What are you?",
    "Who built you?", "Do you have a name?", "Who am I chatting with?",
]  # fmt: skip
HELD_OUT = [
    "May I know your name?", "Who created you?", "Please state your identity.", "What's your name, assistant?",
    "Who is your developer?", "Can you tell me who you are?",
]  # fmt: skip
CORRECTION = "I am Forge, an AI assistant developed by the llamaforge team. How can I help you today?"
KEYS = {"alice": "sk-alice-feedback", "bob": "sk-bob-feedback", "ops": "sk-ops-feedback"}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def rate(answer: str) -> dict:
    """The users' stated rule."""
    if "forge" in answer.lower():
        return {"rating": "up"}
    return {"rating": "down", "correction": CORRECTION}


def says_forge(url: str, model: str, questions: list[str], key: str) -> float:
    hits = 0
    for q in questions:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": 32,
        }
        r = httpx.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=900
        )
        r.raise_for_status()
        hits += "forge" in r.json()["choices"][0]["message"]["content"].lower()
    return 100.0 * hits / len(questions)


def serve(work: Path, adapter: Path):
    """The gateway in a thread: keys, an audit log (feedback lives beside it), `assistant` loaded."""
    import uvicorn

    from llamaforge.serve.app import create_app
    from llamaforge.serve.config import ServeConfig

    os.environ["LLAMAFORGE_LOOP_KEYS"] = f"alice:{KEYS['alice']},bob:{KEYS['bob']},ops:{KEYS['ops']}:admin"
    cfg = ServeConfig(
        adapters={"assistant": str(adapter)},
        adapter_dirs=[str(work / "runs")],
        api_keys_env="LLAMAFORGE_LOOP_KEYS",
        audit={"path": str(work / "logs" / "audit.jsonl")},
        precision="fp32",
        max_model_len=512,
        port=0,
    )
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.5)
    return server, url


STAGES = ("sft", "rate", "prepare", "tune", "promote")


def configs(work: Path) -> tuple[str, Path]:
    """The held-out task (questions nobody rates, reference: the fact the users' rule asks for) and the
    settings every run shares; the gate's metric `contains` is the users' rule ("says Forge")."""
    task = "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Forge"}]})
        + "\n"
        for q in HELD_OUT
    )
    heldout = write(work / "heldout.jsonl", task)
    common = (
        "model: {source: smollm2-135m-instruct}\n"
        "train: {precision: fp32, lr: 1.0e-3, batch_size: 4, effective_batch_size: 4, warmup_ratio: 0}\n"
        "eval: {prompts: [], before_after: false}\n"
        f"evaluation:\n  task: {{path: {heldout}}}\n"
        "  generation: {max_new_tokens: 32}\n  scoring: {metrics: [contains], bootstrap_samples: 200}\n"
        f"output: {{dir: {work / 'runs'}, overwrite: true}}\n"
    )
    return common, heldout


def ask_and_rate(url: str) -> list[str]:
    """Alice and bob take turns; each rates only its own answers, by the stated rule."""
    ratings = []
    for i, q in enumerate(ASKED):
        key = KEYS["alice" if i % 2 == 0 else "bob"]
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "assistant", "messages": [{"role": "user", "content": q}], "max_tokens": 32}
        answer = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=900).json()
        verdict = rate(answer["choices"][0]["message"]["content"])
        r = httpx.post(url + "/v1/feedback", json={"id": answer["id"], **verdict}, headers=headers, timeout=60)
        r.raise_for_status()
        ratings.append(verdict["rating"])
    return ratings


def run(work: Path, sft_steps: int, kto_steps: int, start: str = "sft") -> dict:
    """The loop; `start` skips the stages before it and reuses what they left in `work`."""
    from llamaforge.cli import main

    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    todo = STAGES[STAGES.index(start) :]
    common, heldout = configs(work)
    served = work / "runs" / "served" / "adapter"
    if "sft" in todo:
        sft = write(
            work / "sft.yaml",
            common
            + "data:\n  sources:\n    - {path: identity, variables: {name: Forge, author: the llamaforge team}}\n"
            "  val_size: 0.1\n  max_length: 256\nmethod: {name: lora, rank: 8, alpha: 16}\n",
        )
        assert main(["train", str(sft), f"train.max_steps={sft_steps}", "output.name=served"]) == 0
    if "rate" in todo:
        server, url = serve(work, served)
        try:
            before = says_forge(url, "assistant", HELD_OUT, KEYS["alice"])
            ratings = ask_and_rate(url)
        finally:
            server.should_exit = True
        write(work / "rated.json", json.dumps({"before": before, "ratings": ratings}))
    rated = json.loads((work / "rated.json").read_text())
    if "prepare" in todo:
        # dedup compares exact duplicates only: the corrections share one answer under different
        # questions, which word shingles would call near duplicates of each other.
        prep = write(
            work / "prepare.yaml",
            f"data:\n  sources:\n    - {{path: {work / 'logs' / 'feedback.jsonl'}, format: feedback, "
            "feedback: {kind: binary}}\n"
            f"prepare:\n  output_dir: {work / 'feedback-data'}\n  arrow: false\n  overwrite: true\n"
            "  split: {enabled: false}\n  contradictions: {enabled: false}\n  dedup: {near: false}\n"
            f"  decontaminate: {{enabled: true, eval_sources: [{{path: {heldout}}}]}}\n",
        )
        assert main(["prepare", str(prep)]) == 0
    if "tune" in todo:
        kto = write(
            work / "kto.yaml",
            common + f"data:\n  sources: [{{path: {work / 'feedback-data' / 'train.jsonl'}}}]\n"
            "  val_size: 0\n  max_length: 256\n"
            "method: {name: lora, rank: 8, alpha: 16, objective: kto, beta: 0.1}\n",
        )
        assert main(["train", str(kto), f"train.max_steps={kto_steps}", "output.name=kto"]) == 0
    server, url = serve(work, served)
    try:
        os.environ["LLAMAFORGE_LOOP_ADMIN"] = KEYS["ops"]
        promote = ["promote", str(work / "runs" / "kto"), "--server", url, "--as", "assistant"]
        admin = ["--api-key-env", "LLAMAFORGE_LOOP_ADMIN"]
        gate = ["--gate", "candidate.contains <= served.contains"]  # holds only on an improvement
        gate_code = main([*promote, *gate, *admin, "--canary", "0.5"])
        if gate_code == 0:
            assert main([*promote, "--full", *admin]) == 0
        after = says_forge(url, "assistant", HELD_OUT, KEYS["bob"])
        ops = {"Authorization": f"Bearer {KEYS['ops']}"}
        route = httpx.get(url + "/v1/routes", headers=ops, timeout=60).json()["data"]
    finally:
        server.should_exit = True
    steps = [json.loads(x) for x in (work / "runs" / "kto" / "promote.jsonl").read_text().splitlines()]
    labels = [json.loads(x)["meta"]["feedback"]["label"] for x in (work / "feedback-data" / "train.jsonl").open()]
    result = {
        "held_out_says_forge_before": rated["before"],
        "held_out_says_forge_after": after,
        "ratings": {r: rated["ratings"].count(r) for r in set(rated["ratings"])},
        "kto_examples": {"desirable": labels.count(True), "undesirable": labels.count(False)},
        "gate_passed": gate_code == 0,
        "promote_steps": [s["step"] for s in steps],
        "route": route[0] if route else None,  # stable: the adapter all of `assistant`'s callers get
        "evaluation": next(s["metrics"] for s in steps if s["step"] == "evaluate"),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="feedback-loop", help="everything is written here")
    parser.add_argument("--sft-steps", type=int, default=6)
    parser.add_argument("--kto-steps", type=int, default=30)
    parser.add_argument(
        "--from", dest="start", choices=STAGES, default="sft",
        help="start at this stage, reusing what the earlier ones left in --workdir",
    )  # fmt: skip
    args = parser.parse_args()
    run(Path(args.workdir), args.sft_steps, args.kto_steps, args.start)
