"""Adapter life-cycle around PEFT: registration, save/load (also from a fresh process that never imports us),
push_to_hub, several adapters, bitsandbytes bases, and the trainers (transformers, TRL SFT/DPO)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file
from testing_utils import TINY_CHAT_LLAMA, tiny_chat_llama, word_chat_tokenizer

import peft_selective
from peft_selective import SAProjConfig, SelectiveMLPConfig


#: The tiny chat Llama, wider (hidden 64) and over 128 tokens.
TINY_LLAMA = {**TINY_CHAT_LLAMA, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 128}


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    return tiny_chat_llama(seed, **TINY_LLAMA).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved to disk, so adapters record a loadable `base_model_name_or_path`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


def tokens(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, TINY_LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def load_base(base_dir: str, **kwargs) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ registration
def test_types_are_registered_with_peft():
    for name, config_cls in (("SELECTIVE_MLP", SelectiveMLPConfig), ("SAPROJ", SAProjConfig)):
        member = PeftType[name]
        assert member.value == name and PeftType(name) is member and member in list(PeftType)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member].prefix == "selective_"
    peft_selective.register()  # idempotent
    assert list(PeftType).count(PeftType.SAPROJ) == 1


def test_config_round_trip_gives_the_preset_class(tmp_path):
    config = SAProjConfig(rank=8, alpha=16, layers_to_transform=[1], exclude_modules=["o_proj"])
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "SAPROJ" and on_disk["rank"] == 8
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SAProjConfig)
    assert (loaded.rank, loaded.alpha, loaded.scaling, loaded.layers_to_transform) == (8, 16, 2.0, [1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "positive integer"),
        (dict(rank=2.5), "positive integer"),
        (dict(alpha=8), "only applies to low-rank"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
    ],
)
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveMLPConfig(**kwargs)


def test_wrong_target_module_names_get_a_clear_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), SelectiveMLPConfig(target_modules=["gate_projection"]))


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match="peft-selective adapts torch.nn.Linear"):
        get_peft_model(tiny_llama(), SelectiveMLPConfig(target_modules=["input_layernorm"]))


# --------------------------------------------------------------------------------------------- save and reload
def test_save_writes_safetensors_and_reloads_exactly(tmp_path, base_dir):
    model = get_peft_model(load_base(base_dir), SelectiveMLPConfig(rank=4, init_weights=False))
    x = tokens()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".selective_delta_" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path)
    assert torch.equal(reloaded(x).logits, expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(auto(x).logits, expected)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    adapter_dir, expected_file = sys.argv[1], sys.argv[2]
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    expected = load_file(expected_file)
    logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    print("loaded", type(model.peft_config["default"]).__name__)
    """
)


def test_fresh_process_loads_adapter_without_importing_the_package(tmp_path, base_dir):
    model = get_peft_model(load_base(base_dir), SAProjConfig(init_weights=False))
    x = tokens()
    model.save_pretrained(tmp_path / "adapter")
    save_file({"input_ids": x, "logits": model(x).logits.detach().contiguous()}, tmp_path / "expected.safetensors")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    assert "peft_selective" not in FRESH_PROCESS_SCRIPT
    env = {k: v for k, v in os.environ.items() if k != "PEFT_SELECTIVE_NO_AUTOLOAD"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "expected.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded SAProjConfig" in done.stdout


def test_startup_hook_costs_nothing_when_peft_is_not_used(tmp_path):
    code = "import sys; print('peft' in sys.modules, 'torch' in sys.modules, 'peft_selective' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False"]
    # and it can be switched off
    code = "import peft, sys; print('peft_selective' in sys.modules)"
    env = dict(os.environ, PEFT_SELECTIVE_NO_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.stdout.split() == ["False"], done.stderr


def test_push_to_hub_uploads_what_peft_would(monkeypatch, base_dir):
    """Intercept huggingface_hub at the boundary transformers' PushToHubMixin uses and compare with PEFT LoRA."""
    import transformers.utils.hub as hub
    from peft import LoraConfig

    uploads: dict[str, dict[str, bytes]] = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            uploads[repo_id] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
            return f"https://hub.invalid/{repo_id}"

    class FakeCard:
        def save(self, path):
            with open(path, "w") as f:
                f.write("card")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    get_peft_model(load_base(base_dir), SelectiveMLPConfig(rank=2)).push_to_hub("org/selective")
    get_peft_model(load_base(base_dir), LoraConfig(r=2, target_modules=["up_proj"])).push_to_hub("org/lora")
    assert set(uploads["org/selective"]) == set(uploads["org/lora"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploads["org/selective"])
    assert json.loads(uploads["org/selective"]["adapter_config.json"])["peft_type"] == "SELECTIVE_MLP"


# ------------------------------------------------------------------------------------------- several adapters
def test_adapters_stack_switch_and_delete(base_dir):
    base = load_base(base_dir)
    x = tokens()
    base_logits = base(x).logits
    model = get_peft_model(base, SelectiveMLPConfig(init_weights=False), adapter_name="month1")
    model.add_adapter("month2", SelectiveMLPConfig(rank=4, init_weights=False))
    logits = {}
    for active in (["month1"], ["month2"], ["month1", "month2"]):
        model.base_model.set_adapter(active)
        logits[tuple(active)] = model(x).logits
    # each update is additive, so month1+month2 = base + (month1 - base) + (month2 - base), up to float rounding
    combined = logits[("month1",)] + logits[("month2",)] - base_logits
    up_proj = model.base_model.model.model.layers[0].mlp.up_proj
    h = torch.randn(3, TINY_LLAMA["hidden_size"])
    model.base_model.set_adapter(["month1", "month2"])
    layer_delta = up_proj(h) - up_proj.base_layer(h)
    expected = up_proj.delta_output(h, "month1") + up_proj.delta_output(h, "month2")
    torch.testing.assert_close(layer_delta, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits[("month1", "month2")], logits[("month1",)])
    assert (logits[("month1", "month2")] - combined).abs().max() < 0.05  # model is non-linear; layer test is exact
    model.delete_adapter("month1")
    assert "month1" not in up_proj.selective_delta_weight and model.active_adapters == ["month2"]
    with model.disable_adapter():
        assert torch.equal(model(x).logits, base_logits)


def test_merge_and_unload_matches_and_restores_plain_modules(base_dir):
    model = get_peft_model(load_base(base_dir), SAProjConfig(init_weights=False))
    x = tokens()
    expected = model(x).logits
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ bitsandbytes bases
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rank", [None, 4])
def test_quantized_base_trains_only_the_adapter(base_dir, bits, rank):
    import bitsandbytes as bnb

    if bits == 4:
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        layer_cls = bnb.nn.Linear4bit
    else:
        quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
        layer_cls = bnb.nn.Linear8bitLt
    base = load_base(base_dir, quantization_config=quant)
    assert isinstance(base.model.layers[0].mlp.up_proj, layer_cls)
    model = get_peft_model(base, SelectiveMLPConfig(rank=rank))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized_before = {n: b.detach().clone() for n, b in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".selective_delta_" in n for n in changed)
    assert all(
        torch.equal(model.state_dict()[n], v) for n, v in quantized_before.items() if ".selective_delta_" not in n
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert any("re-quantized" in str(w.message) for w in caught)


# -------------------------------------------------------------------------------------------------- trainers
def test_transformers_trainer_with_gradient_checkpointing(tmp_path, base_dir):
    from datasets import Dataset

    model = get_peft_model(load_base(base_dir), SelectiveMLPConfig())
    x = tokens(batch=8)
    data = Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".selective_delta_weight." in n for n in changed)


def test_trl_sft_trainer_with_peft_config(tmp_path, base_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": ["what is the capital of france paris"] * 8})
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False
    )
    trainer = SFTTrainer(
        model=load_base(base_dir),
        args=args,
        train_dataset=data,
        processing_class=word_chat_tokenizer(),
        peft_config=SAProjConfig(rank=4),
    )
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == PeftType.SAPROJ
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("self_attn" in n and ".selective_delta_" in n for n in trainable)


def test_trl_dpo_trainer_with_peft_config(tmp_path, base_dir):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict(
        {
            "prompt": ["what is the capital of france"] * 8,
            "chosen": ["paris"] * 8,
            "rejected": ["berlin"] * 8,
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False
    )
    trainer = DPOTrainer(
        model=load_base(base_dir),
        args=args,
        train_dataset=data,
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("mlp" in n and ".selective_delta_weight." in n for n in changed)


def test_modules_to_save_trains_and_saves_a_classifier_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, num_labels=3
    )
    base = transformers.BertForSequenceClassification(config).eval()
    model = get_peft_model(base, SelectiveMLPConfig(rank=2, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert all("intermediate.dense.selective_delta_" in n or "classifier" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    x = tokens()
    expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    assert any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    torch.manual_seed(0)
    fresh = transformers.BertForSequenceClassification(config).eval()
    assert torch.equal(PeftModel.from_pretrained(fresh, tmp_path)(input_ids=x).logits, expected)
