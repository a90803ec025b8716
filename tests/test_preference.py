"""DPO, KTO and ORPO against TRL on the same batch (losses and gradients to 1e-5), the chunked log-prob
gathering against TRL's full-logits one, the adapter-disabled reference, and the preference data."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from llamaforge.templates import IGNORE_INDEX

pytest.importorskip("trl")
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

from llamaforge.errors import ConfigError, DataError  # noqa: E402
from llamaforge.losses import collate  # noqa: E402
from llamaforge.train import preference as pref  # noqa: E402
from llamaforge.train.preference_data import (  # noqa: E402
    BinaryExample,
    kl_rows,
    read_preferences,
    tokenize_binary,
    tokenize_pair,
)

TOL = 1e-5
PAIRS = [
    {"prompt": "Name a colour of the sky.", "chosen": "Blue, on a clear day.", "rejected": "Seven."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}],
        "chosen": [{"role": "assistant", "content": "Four."}],
        "rejected": [
            {"role": "assistant", "content": "It is five, or maybe twenty-two, depending on how you count."}
        ],
    },
    {
        "chosen": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "rejected": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Berlin."},
        ],
    },
]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    """The tiny model with a LoRA whose B is random (so the policy differs from the reference), and a template.

    float64, so the comparisons with TRL measure the formulas, not float32 summation order (sums of
    ~200 nats differ by ~2e-5 in float32 between any two summation orders)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaforge.models import load_tokenizer
    from llamaforge.templates import get_template

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    return model, tokenizer, get_template("llama3", tokenizer)


def _pair_rows(template, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    pairs = list(read_preferences(path, "pairs", strict=True))
    return [tokenize_pair(template, p) for p in pairs]


def _trl_logps(model, batch, average=False):
    """TRL's per-sequence log-probs: full logits, then ORPOTrainer.get_batch_logps (a staticmethod)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_grad_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _run(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), _lora_grads(model)


# ------------------------------------------------------------------------------ log-prob gathering


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_match_trl_in_value_and_gradient(setup, tmp_path, average):
    model, tokenizer, template = setup
    batch = pref.pair_batch(_pair_rows(template, tmp_path), tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 1.5, batch["input_ids"].shape[0])
    # chunk_size 3 forces several chunks, so the checkpointed path is the one compared
    ours, g_ours = _run(
        model, lambda: (pref.sequence_logps(model, batch, average=average, chunk_size=3) * weights).sum()
    )
    theirs, g_trl = _run(model, lambda: (_trl_logps(model, batch, average) * weights).sum())
    mine = pref.sequence_logps(model, batch, average=average, chunk_size=3).detach()
    assert torch.allclose(mine, _trl_logps(model, batch, average).detach(), atol=TOL, rtol=0)
    assert abs(float(ours - theirs)) < TOL
    assert _max_grad_diff(g_ours, g_trl) < TOL
    assert bool((mine < 0).all())


def test_answer_tokens_only_are_labelled(setup, tmp_path):
    _, tokenizer, template = setup
    row = _pair_rows(template, tmp_path)[1]
    labelled = [t for t in row["chosen_labels"] if t != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    assert text.startswith("Four.") and "Two plus two" not in text


# ------------------------------------------------------------------------------ DPO


def _trl_dpo(policy_c, policy_r, ref_c, ref_r, beta):
    """trl/trainer/dpo_trainer.py (1.16.0) DPOTrainer._compute_loss, f_divergence_type="reverse_kl" and
    loss_type="sigmoid": chosen_logratios = chosen_logps - ref_chosen_logps (l.1352-1353), delta_score =
    chosen_scores - rejected_scores (l.1384), per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
    (l.1388), loss += per_sequence_loss.mean() (l.1520); rewards = beta * logratios.detach() (l.1577-1578)."""
    chosen_logratios, rejected_logratios = policy_c - ref_c, policy_r - ref_r
    loss = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def test_dpo_matches_trl_on_the_same_batch(setup, tmp_path, record_property):
    model, tokenizer, template = setup
    batch = pref.pair_batch(_pair_rows(template, tmp_path), tokenizer.pad_token_id)
    ref_c, ref_r = pref.reference_logps(model, batch).chunk(2)
    with torch.no_grad(), model.disable_adapter():  # TRL's reference for a new adapter: adapters disabled
        trl_ref_c, trl_ref_r = _trl_logps(model, batch).chunk(2)
    assert torch.allclose(ref_c, trl_ref_c, atol=TOL) and torch.allclose(ref_r, trl_ref_r, atol=TOL)
    beta = 0.1
    out = {}

    def ours():
        out["ours"] = pref.dpo_loss(
            *pref.sequence_logps(model, batch, chunk_size=4).chunk(2), ref_c, ref_r, beta
        )
        return out["ours"].loss

    def trl():
        out["trl"] = _trl_dpo(*_trl_logps(model, batch).chunk(2), trl_ref_c, trl_ref_r, beta)
        return out["trl"][0]

    loss, g_ours = _run(model, ours)
    loss_trl, g_trl = _run(model, trl)
    diff, gdiff = abs(float(loss - loss_trl)), _max_grad_diff(g_ours, g_trl)
    record_property("dpo_max_abs_diff", (diff, gdiff))
    assert diff < TOL and gdiff < TOL
    assert torch.allclose(out["ours"].chosen_rewards, out["trl"][1], atol=TOL)
    assert torch.allclose(out["ours"].rejected_rewards, out["trl"][2], atol=TOL)
    assert float(loss) != pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)  # policy != reference
    metrics = pref.preference_metrics(out["ours"])
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    assert metrics["rewards/margins"] == pytest.approx(
        metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-6
    )


# ------------------------------------------------------------------------------ KTO


def _trl_kto(policy, ref, labels, policy_kl, ref_kl, beta, dw, uw):
    """trl/trainer/kto_trainer.py (1.16.0) KTOTrainer._compute_loss, loss_type="kto": kl =
    (KL_logps - ref_KL_logps).mean().detach().clamp(min=0) (l.1443-1444, one process), chosen_losses =
    1 - F.sigmoid(beta * (chosen_logratios - kl)) (l.1453), rejected_losses = 1 - F.sigmoid(beta * (kl -
    rejected_logratios)) (l.1470), losses = cat(dw * chosen, uw * rejected) (l.1478-1481), loss =
    losses.nanmean() (l.1548)."""
    idx_c, idx_r = torch.nonzero(labels).view(-1), torch.nonzero(~labels).view(-1)
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    chosen_lr = policy.index_select(0, idx_c) - ref.index_select(0, idx_c)
    rejected_lr = policy.index_select(0, idx_r) - ref.index_select(0, idx_r)
    losses = torch.cat(
        (dw * (1 - F.sigmoid(beta * (chosen_lr - kl))), uw * (1 - F.sigmoid(beta * (kl - rejected_lr))))
    )
    return losses.nanmean()


def test_kto_matches_trl_on_the_same_batch(setup, record_property):
    model, tokenizer, template = setup
    examples = [
        BinaryExample([_user("Name a colour of the sky.")], "Blue.", True),
        BinaryExample([_user("Two plus two?")], "Five, surely.", False),
        BinaryExample([_user("Capital of France?")], "Paris, on the Seine.", True),
        BinaryExample([_user("Opposite of up?")], "Sideways.", False),
    ]
    rows = [tokenize_binary(template, e) for e in examples]
    labels = torch.tensor([r["label"] for r in rows])
    batch = collate(rows, tokenizer.pad_token_id)
    kl_batch = collate(kl_rows(rows), tokenizer.pad_token_id)
    ref = pref.reference_logps(model, batch)
    ref_kl = pref.reference_logps(model, kl_batch)
    beta, dw, uw = 0.1, 1.0, 1.33

    def ours():
        with torch.no_grad():
            kl = pref.kto_kl(pref.sequence_logps(model, kl_batch), ref_kl)
        return pref.kto_loss(
            pref.sequence_logps(model, batch, chunk_size=4), ref, labels, kl, beta, dw, uw
        ).loss

    def trl():
        with torch.no_grad():
            policy_kl = _trl_logps(model, kl_batch)
        return _trl_kto(_trl_logps(model, batch), ref, labels, policy_kl, ref_kl, beta, dw, uw)

    loss, g_ours = _run(model, ours)
    loss_trl, g_trl = _run(model, trl)
    diff, gdiff = abs(float(loss - loss_trl)), _max_grad_diff(g_ours, g_trl)
    record_property("kto_max_abs_diff", (diff, gdiff))
    assert diff < TOL and gdiff < TOL
    assert max(abs(g).max() for g in g_ours.values()) > 0


def _user(text):
    from llamaforge.data.types import Message

    return Message("user", text)


# ------------------------------------------------------------------------------ ORPO


def test_orpo_matches_trl_on_the_same_batch(setup, tmp_path, record_property):
    model, tokenizer, template = setup
    batch = pref.pair_batch(_pair_rows(template, tmp_path), tokenizer.pad_token_id)
    n = batch["input_ids"].shape[0] // 2
    beta = 0.25
    trl_self = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))

    def nll(logps_batch):
        chosen = {k: v[:n] for k, v in logps_batch.items()}
        targets = chosen["labels"][:, 1:]
        return -pref.sequence_logps(model, chosen).sum() / (targets != IGNORE_INDEX).sum()

    def ours():
        c, r = pref.sequence_logps(model, batch, average=True, chunk_size=4).chunk(2)
        return pref.orpo_loss(c, r, nll(batch), beta).loss

    def trl():
        c, r = _trl_logps(model, batch, average=True).chunk(2)
        # trl/experimental/orpo/orpo_trainer.py (1.16.0) ORPOTrainer.odds_ratio_loss, called as is, and
        # get_batch_loss_metrics: loss = policy_nll_loss - losses.mean() (l.845); the NLL is given to both
        losses, *_ = ORPOTrainer.odds_ratio_loss(trl_self, c, r)
        return nll(batch) - losses.mean()

    loss, g_ours = _run(model, ours)
    loss_trl, g_trl = _run(model, trl)
    diff, gdiff = abs(float(loss - loss_trl)), _max_grad_diff(g_ours, g_trl)
    record_property("orpo_max_abs_diff", (diff, gdiff))
    assert diff < TOL and gdiff < TOL


# ------------------------------------------------------------------------------ reference


def test_reference_is_the_base_with_the_adapter_disabled(setup, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer, template = setup
    batch = pref.pair_batch(_pair_rows(template, tmp_path), tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    with torch.no_grad():
        expected = pref.sequence_logps(base, batch)
        policy = pref.sequence_logps(model, batch)
    model.train()
    got = pref.reference_logps(model, batch)
    assert model.training  # mode restored
    assert torch.allclose(got, expected, atol=TOL)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter is back on afterwards too
    assert torch.allclose(pref.sequence_logps(model, batch).detach(), policy, atol=TOL)
    with pytest.raises(ConfigError, match="precompute_reference"):
        pref.reference_logps(base, batch)


def test_precompute_reference_matches_per_batch_reference(setup, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer, template = setup
    rows = _pair_rows(template, tmp_path)
    singles = [
        {"input_ids": r[f"{k}_input_ids"], "labels": r[f"{k}_labels"]}
        for r in rows
        for k in ("chosen", "rejected")
    ]
    pre = pref.precompute_reference(model, singles, tokenizer.pad_token_id, batch_size=4)
    each = torch.cat([pref.reference_logps(model, collate([s], tokenizer.pad_token_id)) for s in singles])
    assert pre.shape == (len(singles),) and torch.allclose(pre, each, atol=TOL)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)  # full fine-tuning
    assert torch.allclose(
        pref.precompute_reference(base, singles, tokenizer.pad_token_id, batch_size=3), pre, atol=TOL
    )


# ------------------------------------------------------------------------------ data


def test_bad_records_are_rejected_naming_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        PAIRS[0],
        {"prompt": "Hi", "chosen": "Hello."},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Other Q"}, {"role": "assistant", "content": "B"}],
        },
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "no"}], "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
    items = list(read_preferences(path, "pairs"))
    assert items[0].chosen == "Blue, on a clear day." and items[0].line == 1
    bad = [(i.line, i.field) for i in items[1:]]
    assert bad == [
        (2, "rejected"),
        (3, "rejected"),
        (4, "prompt[0].role"),
        (5, "rejected"),
        (6, "chosen"),
        (7, None),
    ]
    assert all(i.source == str(path) for i in items[1:])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        list(read_preferences(path, "pairs", strict=True))


def test_kto_records_need_a_boolean_label(tmp_path):
    path = tmp_path / "k.jsonl"
    rows = [
        {"prompt": "Q?", "completion": "A.", "label": True},
        {"prompt": "Q?", "completion": "B.", "label": "false"},
        {"prompt": "Q?", "completion": "C."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(read_preferences(path, "binary"))
    assert isinstance(items[0], BinaryExample) and items[0].label is True
    assert [(i.line, i.field) for i in items[1:]] == [(2, "label"), (3, "label")]
    assert "JSON boolean" in items[1].reason


def test_too_long_pair_names_the_field(setup, tmp_path):
    _, _, template = setup
    pair = next(read_preferences(_write(tmp_path, [PAIRS[1]]), "pairs"))
    with pytest.raises(DataError, match="max_length") as err:
        tokenize_pair(template, pair, max_length=30)
    assert err.value.field == "rejected" and err.value.line == 1


def _write(tmp_path, rows):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ a micro-batch's loss


def _kto_rows(tmp_path, template):
    from llamaforge.config import DataConfig, DataSource
    from llamaforge.train.preference_data import prepare_preferences

    rows = [
        {"prompt": "Name a colour of the sky.", "completion": "Blue.", "label": True},
        {"prompt": "Two plus two?", "completion": "Five, surely.", "label": False},
        {"prompt": "Capital of France?", "completion": "Paris.", "label": True},
    ]
    cfg = DataConfig(sources=[DataSource(path=str(_write(tmp_path, rows)))], val_size=0)
    return prepare_preferences(cfg, "binary", template).train


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_loss(setup, tmp_path, objective):
    model, tokenizer, template = setup
    rows = _pair_rows(template, tmp_path) if objective == "dpo" else _kto_rows(tmp_path, template)
    with torch.no_grad():
        live = pref.objective_loss(model, rows, objective, tokenizer.pad_token_id, beta=0.2)
        pref.attach_reference(model, rows, objective, tokenizer.pad_token_id, batch_size=2)
        assert {"dpo": "ref_chosen", "kto": "ref_kl"}[objective] in rows[0]
        pre = pref.objective_loss(model, rows, objective, tokenizer.pad_token_id, beta=0.2)
    assert abs(float(live.loss - pre.loss)) < 1e-9
    assert torch.allclose(live.chosen_rewards, pre.chosen_rewards, atol=1e-9)


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_a_few_steps_of_each_objective_lower_its_loss(tiny_llama_dir, tmp_path, objective):
    """A fresh LoRA (policy = reference) in float32: DPO starts at exactly log 2 with zero rewards; a few
    Adam steps lower every objective's loss, and DPO then prefers the chosen answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaforge.models import load_tokenizer
    from llamaforge.templates import get_template

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    template = get_template("llama3", tokenizer)
    rows = _pair_rows(template, tmp_path) if objective != "kto" else _kto_rows(tmp_path, template)
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses, metrics_at_start = [], {}
    for _ in range(6):
        result = pref.objective_loss(model, rows, objective, pad, beta=0.5)
        losses.append(float(result.loss.detach()))
        if objective == "dpo" and not metrics_at_start:
            metrics_at_start.update(pref.preference_metrics(result))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    if objective == "dpo":
        assert losses[0] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
        with torch.no_grad():
            metrics = pref.preference_metrics(pref.objective_loss(model, rows, objective, pad, beta=0.5))
        assert metrics_at_start["rewards/margins"] == 0 and metrics_at_start["rewards/accuracies"] == 0
        assert metrics["rewards/margins"] > 0 and metrics["rewards/accuracies"] > 0
    assert losses[-1] < losses[0] - 1e-3, losses


def test_unknown_objective_is_an_error(setup, tmp_path):
    model, tokenizer, template = setup
    with pytest.raises(ConfigError, match="expected one of dpo, kto, orpo"):
        pref.objective_loss(model, _pair_rows(template, tmp_path), "ipo", tokenizer.pad_token_id)


# ------------------------------------------------------------------------------ the job's data


def test_prepare_preferences_splits_applies_the_system_prompt_and_keeps_rejects(setup, tmp_path):
    from llamaforge.config import DataConfig, DataSource
    from llamaforge.train.preference_data import prepare_preferences

    _, tokenizer, template = setup
    path = _write(tmp_path, [*PAIRS, {"prompt": "Hi", "chosen": "Hello."}])
    cfg = DataConfig(
        sources=[DataSource(path=str(path))], val_size=1, system_prompt="You are terse.", max_length=64
    )
    data = prepare_preferences(cfg, "pairs", template)
    assert (data.card["train_records"], data.card["val_records"]) == (2, 1)
    assert [(r.line, r.field) for r in data.rejects] == [(4, "rejected")]
    texts = [tokenizer.decode(r["chosen_input_ids"]) for r in data.train + data.val]
    assert sum("You are terse." in t for t in texts) == 2  # PAIRS[1] has its own system prompt
    assert any("Be brief." in t and "You are terse." not in t for t in texts)
    again = prepare_preferences(cfg, "pairs", template)
    assert again.card["sha256"] == data.card["sha256"] and again.val == data.val


def test_prepare_kto_rows_carry_mismatched_kl_pairs(setup, tmp_path):
    _, tokenizer, template = setup
    rows = _kto_rows(tmp_path, template)
    assert [r["label"] for r in rows] == [True, False, True]
    first_kl = tokenizer.decode(rows[0]["kl_input_ids"])
    assert "Name a colour of the sky." in first_kl and first_kl.removesuffix("<|eot_id|>").endswith("Paris.")
