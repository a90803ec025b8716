# ruff: noqa: F811 - the own_model fixture is imported, then named as a test argument
"""GGUF LoRA adapters (export/gguf_lora.py): the delta llama.cpp applies equals PEFT's merge (plain,
rsLoRA, per-module rank/alpha patterns), and what llama.cpp cannot apply is refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from gguf_fixtures import own_model  # noqa: F401 - fixture
from llamaforge.export import gguf as gx
from llamaforge.export.gguf import permute_qk
from llamaforge.export.gguf_lora import export_lora_gguf
from llamaforge.export.manifest import ExportError


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns"])
def test_lora_adapter_matches_peft_merge(own_model, tmp_path, variant):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _, _ = own_model
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    extra = (
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}
        if variant == "rslora_patterns"
        else {}
    )
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        **extra,
    )
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}

    out = export_lora_gguf(tmp_path / "adapter", folder, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert (
        f["general.type"] == "adapter"
        and f["adapter.type"] == "lora"
        and f["general.architecture"] == "llama"
    )
    alpha = f["adapter.lora.alpha"]
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    assert len(lora) == 2 * 7 * 2
    hp = gx.read_config(folder)
    from safetensors.torch import load_file

    base_sd = {k: v.numpy() for k, v in load_file(folder / "model.safetensors").items()}
    for layer in range(2):
        for hf, gg, heads in [
            ("self_attn.q_proj", "attn_q", hp.n_head),
            ("self_attn.k_proj", "attn_k", hp.n_head_kv),
            ("self_attn.v_proj", "attn_v", None),
            ("mlp.down_proj", "ffn_down", None),
        ]:
            a, b = lora[f"blk.{layer}.{gg}.weight.lora_a"], lora[f"blk.{layer}.{gg}.weight.lora_b"]
            w = base_sd[f"model.layers.{layer}.{hf}.weight"]
            want = merged[f"model.layers.{layer}.{hf}.weight"]
            if heads:  # llama.cpp adds the delta to the permuted base weight
                w, want = permute_qk(w, heads), permute_qk(want, heads)
            got = w + (alpha / a.shape[0]) * (b @ a)  # llama.cpp's scale: alpha / rank
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{layer} {hf}")


def test_lora_refuses_dora_and_full_modules(own_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _, _ = own_model
    for name, kwargs, message in [
        ("dora", {"use_dora": True}, "DoRA"),
        ("mts", {"modules_to_save": ["lm_head"]}, "full tensor"),
    ]:
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"], **kwargs)
        )
        model.save_pretrained(tmp_path / name)
        with pytest.raises(ExportError, match=message):
            export_lora_gguf(tmp_path / name, folder, tmp_path / f"{name}.gguf")
        assert not (tmp_path / f"{name}.gguf").exists()
