"""bitsandbytes' CPU repacking of 4-bit weights (`peft_selective.quantization`).

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight the first time the layer runs in eval mode
without grad, and a packed layer gives its input no gradient in training. The tests force that path whatever the CPU
(`has_avx512bf16` patched to True before the model is built), so they check the same thing on machines with and
without the instruction set: after the fix the packing never runs (hence the packed kernel is never called), and
weights that an earlier evaluation packed are un-packed.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from testing_utils import tiny_chat_llama, word_chat_tokenizer

from peft_selective import SAProjConfig, SelectiveMLPConfig
from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer
from peft_selective.quantization import keep_4bit_layers_trainable


bnb = pytest.importorskip("bitsandbytes")
modules = pytest.importorskip("bitsandbytes.nn.modules")
functional = pytest.importorskip("bitsandbytes.functional")

# The shapes the packing accepts: out_features a multiple of its block (32), in_features a multiple of the 4-bit
# quantization blocksize (64). With head_dim 16, the 2 key-value heads give k_proj / v_proj 32 outputs; lm_head stays
# in full precision.
#: The tiny chat Llama with shapes bitsandbytes' CPU repacking accepts (hidden 64).
TINY_4BIT = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture
def packing_calls(monkeypatch):
    """Forces bitsandbytes' CPU repacking on (for layers built after this) and records each time it runs."""
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    calls = []
    convert = modules._convert_weight_packed_for_cpu

    def recording(*args, **kwargs):
        calls.append(args[1].shape)
        return convert(*args, **kwargs)

    monkeypatch.setattr(modules, "_convert_weight_packed_for_cpu", recording)
    return calls


def tiny_4bit_llama(tmp_path, double_quant: bool = False):
    path = tmp_path / "base"
    tiny_chat_llama(0, **TINY_4BIT).save_pretrained(path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    layers = four_bit_layers(model)
    assert len(layers) == 14 and all(layer.support_avx512bf16_for_cpu for layer in layers)
    return model


def four_bit_layers(model) -> list:
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def is_packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def evaluate(model) -> None:
    """What a campaign's evaluation does to the model: eval mode, no grad, a forward and a short generation."""
    model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        model(ids)
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def train_step(model) -> None:
    model.train()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 6, 10, 14, 18, 22]])
    model(ids, labels=ids).loss.backward()


def assert_every_adapter_learns(model) -> None:
    adapters = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert adapters
    for adapter in adapters:
        grads = [p.grad for p in adapter.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), adapter


@pytest.mark.parametrize("config", [SelectiveMLPConfig(rank=4), SAProjConfig(rank=4)], ids=["mlp", "saproj"])
def test_forced_cpu_repacking_does_not_stop_our_adapters_learning(tmp_path, packing_calls, config):
    model = get_peft_model(tiny_4bit_llama(tmp_path), config)
    evaluate(model)
    train_step(model)
    assert_every_adapter_learns(model)  # each adapter sits below frozen 4-bit layers (o_proj / down_proj at least)
    assert packing_calls == []  # never packed, so the packed kernel never ran (CPUs without AVX512-BF16 included)
    # the injection switched the repacking off on every 4-bit layer, the adapted ones and the frozen ones between them
    assert not any(layer.support_avx512bf16_for_cpu or is_packed(layer) for layer in four_bit_layers(model))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_weights_an_evaluation_packed_are_unpacked(tmp_path, packing_calls, double_quant):
    model = tiny_4bit_llama(tmp_path, double_quant)
    layers = four_bit_layers(model)
    before = [functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers]
    shapes = [layer.weight.shape for layer in layers]
    for layer in layers:  # exactly what `Linear4bit.forward` does in an eval-mode, no-grad CPU pass
        layer.weight.data, layer.weight.quant_state = modules._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
    assert all(is_packed(layer) for layer in layers)

    assert keep_4bit_layers_trainable(model) == len(layers)
    assert keep_4bit_layers_trainable(model) == 0  # idempotent
    for layer, weight, shape in zip(layers, before, shapes):
        assert not is_packed(layer) and not layer.support_avx512bf16_for_cpu
        assert layer.weight.shape == shape and layer.weight.dtype == torch.uint8
        after = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        # the same weight, up to the bfloat16 rounding of the absmax that the packing made (2^-8 relative)
        torch.testing.assert_close(after, weight, rtol=2**-7, atol=1e-6)
    evaluate(model)
    assert len(packing_calls) == len(layers)  # only the packing above: none in the evaluation


def test_lora_model_evaluated_before_continual_dpo_trainer_learns(tmp_path, packing_calls):
    base = tiny_4bit_llama(tmp_path)
    evaluate(base)  # as a campaign's month-0 evaluation of a model it did not load itself: every 4-bit layer packs
    assert len(packing_calls) == 14 and all(is_packed(layer) for layer in four_bit_layers(base))
    prompts = [[{"role": "user", "content": f"question {word}"}] for word in "red blue green one".split()]
    data = Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [[{"role": "assistant", "content": "yes"}]] * 4,
            "rejected": [[{"role": "assistant", "content": "no"}]] * 4,
        }
    )
    args = ContinualDPOConfig(
        output_dir=str(tmp_path / "m1"),
        adapter_name="m1",
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = ContinualDPOTrainer(
        base,
        args=args,
        train_dataset=data,
        processing_class=word_chat_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    model = trainer.model
    train_step(model)
    assert_every_adapter_learns(model)
    assert not any(is_packed(layer) or layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))
    model.zero_grad()
    trainer.train()
    assert [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry][0] > 0
    assert len(packing_calls) == 14  # nothing packed again


def test_campaign_loads_a_4bit_base_that_its_evaluation_does_not_repack(tmp_path, packing_calls):
    from peft_selective.campaign.campaign import Campaign, CampaignConfig

    tiny_4bit_llama(tmp_path)  # writes tmp_path / "base"
    word_chat_tokenizer().save_pretrained(tmp_path / "base")
    campaign = Campaign.init(
        tmp_path / "campaign", CampaignConfig(base_model=str(tmp_path / "base"), quantization="4bit")
    )
    model, _ = campaign.load_base()
    evaluate(model)  # the month-0 evaluation
    assert packing_calls == []
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))


def test_keep_4bit_layers_trainable_leaves_other_models_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert keep_4bit_layers_trainable(model) == 0


def test_8bit_layers_have_no_cpu_repacking():
    """The docstring's claim: `Linear8bitLt` keeps its layout and its input gradient after an eval-mode CPU pass."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    weight = layer.weight.data.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert torch.equal(layer.weight.data, weight)
    layer.train()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
