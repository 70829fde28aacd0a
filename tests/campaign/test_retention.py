"""The retention dial (`peft_selective.retention`): scaling one adapter's update after training, and choosing the scale
from a measured learning / forgetting curve."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from testing_utils import CAMPAIGN_INIT, cli, write_month
from transformers import TrainerCallback

from peft_selective import SAProjConfig, SelectiveMLPConfig
from peft_selective.campaign.campaign import Campaign, CampaignConfig, CampaignError
from peft_selective.retention import (
    choose_scale,
    layer_factor,
    layer_index,
    parse_layer_scales,
    scale_adapter,
    scaled_adapter,
)
from peft_selective.tuners.selective.layer import SelectiveLayer


CONFIGS = {
    "selective_mlp_full": lambda: SelectiveMLPConfig(init_weights=False, train_bias=True),
    "selective_mlp_lowrank": lambda: SelectiveMLPConfig(rank=4, alpha=8, init_weights=False),
    "saproj": lambda: SAProjConfig(rank=4, init_weights=False),
    "lora": lambda: LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
}


def adapted(make_tiny_model, method: str, family: str = "llama"):
    torch.manual_seed(0)
    return get_peft_model(make_tiny_model(family), CONFIGS[method](), adapter_name="month")


def adapter_layers(model):
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "active_adapters") and not name.endswith("base_layer")
        and isinstance(module.base_layer, torch.nn.Linear)
    ]  # fmt: skip


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_scaled_linear_layer_computes_base_plus_scale_times_the_update(make_tiny_model, method):
    model = adapted(make_tiny_model, method)
    layers = adapter_layers(model)
    assert layers
    before = {}
    with torch.no_grad():
        for name, layer in layers:
            x_in = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
            before[name] = (x_in, layer.base_layer(x_in), layer(x_in))
    record = scale_adapter(model, "month", 0.3)
    assert record == {"adapter": "month", "scale": 0.3, "layer_scales": None, "modules": len(layers)}
    with torch.no_grad():
        for name, layer in layers:
            x_in, base, full = before[name]
            torch.testing.assert_close(layer(x_in), base + 0.3 * (full - base), rtol=1e-5, atol=1e-6)


def test_a_lora_embedding_adapter_scales_its_b_factor(make_tiny_model):
    model = get_peft_model(
        make_tiny_model("llama"), LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    )
    layer = model.base_model.model.model.embed_tokens
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        base, full = layer.base_layer(ids), layer(ids)
        scale_adapter(model, "default", 0.5)
        torch.testing.assert_close(layer(ids), base + 0.5 * (full - base))


@pytest.mark.parametrize("method", ["selective_mlp_full", "selective_mlp_lowrank", "lora"])
def test_merging_a_scaled_adapter_equals_scaling_the_merged_update(make_tiny_model, method, tiny_inputs):
    model = adapted(make_tiny_model, method)
    merged_full = copy.deepcopy(model).merge_and_unload().state_dict()
    scaled = copy.deepcopy(model)
    scale_adapter(scaled, "month", 0.5)
    base = copy.deepcopy(model).unload().state_dict()
    merged_scaled = scaled.merge_and_unload().state_dict()
    for key, weight in merged_scaled.items():
        torch.testing.assert_close(weight, base[key] + 0.5 * (merged_full[key] - base[key]), rtol=1e-5, atol=1e-6)
    changed = [k for k in base if not torch.equal(base[k], merged_full[k])]
    assert changed  # the adapter did change some weights


@pytest.mark.parametrize("method", ["selective_mlp_lowrank", "saproj", "lora"])
def test_a_scaled_adapter_survives_save_and_reload(make_tiny_model, tiny_inputs, model_output, tmp_path, method):
    model = adapted(make_tiny_model, method)
    inputs = tiny_inputs("llama")
    scale_adapter(model, "month", 0.25)
    with torch.no_grad():
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "month", adapter_name="month")
    with torch.no_grad():
        torch.testing.assert_close(model_output(reloaded, inputs), expected)


def test_scale_zero_is_the_model_without_the_adapter_and_scaled_adapter_restores(
    make_tiny_model, tiny_inputs, model_output
):
    model = adapted(make_tiny_model, "selective_mlp_lowrank")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        full = model_output(model, inputs)
        with model.disable_adapter():
            base = model_output(model, inputs)
        with scaled_adapter(model, "month", 0.0) as record:
            assert record["scale"] == 0.0
            torch.testing.assert_close(model_output(model, inputs), base)
        assert torch.equal(model_output(model, inputs), full)  # the trained weights are back, bit for bit


def test_only_the_named_adapter_is_scaled(make_tiny_model):
    model = adapted(make_tiny_model, "selective_mlp_lowrank")
    model.add_adapter("other", SelectiveMLPConfig(rank=4, init_weights=False))
    other = {k: v.clone() for k, v in model.state_dict().items() if ".other" in k}
    scale_adapter(model, "month", 0.5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.items())


def test_layer_scales_only_touch_the_named_blocks(make_tiny_model):
    model = adapted(make_tiny_model, "lora")
    trained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    record = scale_adapter(model, "month", 1.0, layer_scales={"0-0": 0.5})
    assert record["layer_scales"] == {"0-0": 0.5} and record["layer_factors"] == {"0": 0.5, "1": 1.0}
    state = model.state_dict()
    for key, value in trained.items():
        if ".layers.0." in key and "lora_B" in key:
            torch.testing.assert_close(state[key], 0.5 * value)
        else:  # block 1 and every lora_A untouched
            assert torch.equal(state[key], value), key
    # a callable, multiplied with the scale
    model = adapted(make_tiny_model, "selective_mlp_full")
    trained = {k: v.clone() for k, v in model.state_dict().items() if "selective_delta" in k}
    record = scale_adapter(model, "month", 0.5, layer_scales=lambda index: 0.0 if index == 1 else 1.0)
    assert record["layer_factors"] == {"0": 0.5, "1": 0.0}
    for key, value in trained.items():
        factor = 0.0 if ".layers.1." in key else 0.5
        torch.testing.assert_close(model.state_dict()[key], factor * value)


def test_layer_factor_gives_each_weight_the_factor_scale_adapter_gives_its_layer(make_tiny_model):
    factor = layer_factor("0-0:0.5,5-:0")
    assert factor("model.layers.0.mlp.gate_proj.weight") == 0.5
    assert factor("model.layers.3.mlp.up_proj.weight") == 1.0  # no key covers block 3
    assert factor("model.layers.7.self_attn.q_proj.weight") == 0.0
    assert factor("lm_head.weight") == 1.0  # no block index
    assert layer_factor(None)("model.layers.0.mlp.gate_proj.weight") == 1.0
    # the same factors as scale_adapter's record, from a mapping or a callable
    model = adapted(make_tiny_model, "lora")
    record = scale_adapter(model, "month", 1.0, layer_scales={"0-0": 0.25})
    for index, value in record["layer_factors"].items():
        assert layer_factor({"0-0": 0.25})(f"model.layers.{index}.mlp") == value
    assert layer_factor(lambda index: index / 10)("model.layers.3.mlp") == 0.3
    with pytest.raises(ValueError, match="overlap"):
        layer_factor("0-5:1,3-:1")


def test_bad_layer_scales_and_scales_are_refused(make_tiny_model):
    model = adapted(make_tiny_model, "lora")
    with pytest.raises(ValueError, match="overlap"):
        scale_adapter(model, "month", 1.0, {"0-1": 0.5, "1": 0.2})
    with pytest.raises(ValueError, match="matches no block"):
        scale_adapter(model, "month", 1.0, {"5-9": 0.5})
    with pytest.raises(ValueError, match="Invalid layer_scales key"):
        scale_adapter(model, "month", 1.0, {"lower": 0.5})
    with pytest.raises(ValueError, match=">= 0"):
        scale_adapter(model, "month", -1.0)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        scale_adapter(model, "nope", 0.5)
    assert layer_index("base_model.model.model.layers.12.mlp.up_proj") == 12 and layer_index("lm_head") is None


def test_dora_and_other_methods_are_refused(make_tiny_model):
    dora = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        scale_adapter(dora, "default", 0.5)
    from peft import LoHaConfig

    loha = get_peft_model(make_tiny_model("llama"), LoHaConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoHaConfig"):
        scale_adapter(loha, "default", 0.5)
    saved = get_peft_model(
        make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with pytest.raises(ValueError, match="modules_to_save"):
        scale_adapter(saved, "default", 0.5)
    merged = adapted(make_tiny_model, "lora")
    merged.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        scale_adapter(merged, "month", 0.5)


@pytest.mark.parametrize("rank", [None, 4])
def test_a_norm_capped_update_scales_exactly_and_keeps_its_bound(make_tiny_model, rank):
    model = adapted(make_tiny_model, "selective_mlp_full" if rank is None else "selective_mlp_lowrank")
    layer = next(m for m in model.modules() if isinstance(m, SelectiveLayer))
    uncapped = layer.get_delta_weight("month").detach().clone()
    cap = 0.5 * float(uncapped.norm())  # the cap binds
    empty = SimpleNamespace(
        residual_eigenvalue=0.0, num_outliers=0, soft=False, basis=torch.zeros(layer.in_features, 0),
        weights=torch.zeros(0), basis_values=torch.zeros(0),
    )  # fmt: skip
    layer.set_protected_subspace("month", empty, output_energy=1.0, norm_cap=cap, num_tokens=8)
    capped = layer.get_delta_weight("month").detach().clone()
    assert math.isclose(float(capped.norm()), cap, rel_tol=1e-5)
    scale_adapter(model, "month", 0.4)
    scaled = layer.get_delta_weight("month").detach()
    torch.testing.assert_close(scaled, 0.4 * capped, rtol=1e-5, atol=1e-7)
    assert float(scaled.norm()) <= cap
    with pytest.warns(UserWarning, match="clips"):
        scale_adapter(model, "month", 5.0)
    assert float(layer.get_delta_weight("month").detach().norm()) <= cap * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------- choose_scale
CURVE = [(0.25, 0.30, 0.01), (0.5, 0.55, 0.02), (0.75, 0.58, 0.05), (1.0, 0.60, 0.08)]


def test_keep_rule_picks_the_least_forgetting_that_keeps_the_share():
    choice = choose_scale(CURVE, keep_learning_share=0.9)  # threshold 0.54
    assert choice["scale"] == 0.5 and choice["met"] and math.isclose(choice["threshold"], 0.54)
    assert choose_scale(CURVE, keep_learning_share=1.0)["scale"] == 1.0
    assert choose_scale(CURVE, keep_learning_share=0.0)["scale"] == 0.25
    # forgetting need not grow with the scale: the least forgetting wins, not the smallest scale
    bumpy = [(0.25, 0.6, 0.09), (0.5, 0.6, 0.03), (1.0, 0.6, 0.04)]
    assert choose_scale(bumpy, keep_learning_share=0.9)["scale"] == 0.5
    # a month that learned nothing: any scale no worse than 1 qualifies
    nothing = [(0.5, -0.1, 0.01), (0.75, 0.0, 0.02), (1.0, -0.05, 0.03)]
    choice = choose_scale(nothing, keep_learning_share=0.9)
    assert choice["scale"] == 0.75 and "learned nothing" in choice["rule"]


def test_tie_rules():
    # equal forgetting: the larger gain, then the scale closest to 1
    assert choose_scale([(0.25, 0.5, 0.0), (0.5, 0.6, 0.0), (1.0, 0.6, 0.1)], keep_learning_share=0.5)["scale"] == 0.5
    assert choose_scale([(0.25, 0.6, 0.0), (0.5, 0.6, 0.0), (1.0, 0.6, 0.1)], keep_learning_share=0.5)["scale"] == 0.5
    # equal learning within budget: the smaller forgetting, then the scale closest to 1
    tied = [(0.25, 0.6, 0.02), (0.5, 0.6, 0.01), (0.75, 0.6, 0.01), (1.0, 0.7, 0.5)]
    assert choose_scale(tied, forgetting_budget=0.1)["scale"] == 0.75
    # dicts are accepted too, in any order
    points = [{"scale": s, "learning_gain": g, "forgetting": f} for s, g, f in reversed(CURVE)]
    assert choose_scale(points, keep_learning_share=0.9)["scale"] == 0.5


def test_budget_rule():
    choice = choose_scale(CURVE, forgetting_budget=0.05)
    assert choice["scale"] == 0.75 and choice["met"] and choice["budget"] == 0.05
    assert choose_scale(CURVE, forgetting_budget=1.0)["scale"] == 1.0
    missed = choose_scale(CURVE, forgetting_budget=0.001)
    assert missed["scale"] == 0.25 and not missed["met"] and "least forgetting" in missed["rule"]


def test_choose_scale_errors():
    with pytest.raises(ValueError, match="exactly one rule"):
        choose_scale(CURVE)
    with pytest.raises(ValueError, match="exactly one rule"):
        choose_scale(CURVE, keep_learning_share=0.9, forgetting_budget=0.1)
    with pytest.raises(ValueError, match="must measure scale 1"):
        choose_scale(CURVE[:3], keep_learning_share=0.9)
    with pytest.raises(ValueError, match="empty"):
        choose_scale([], forgetting_budget=0.1)
    with pytest.raises(ValueError, match="twice"):
        choose_scale([(1.0, 0.1, 0.1), (1.0, 0.2, 0.2)], forgetting_budget=0.1)
    with pytest.raises(ValueError, match="finite"):
        choose_scale([(1.0, float("nan"), 0.1)], forgetting_budget=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose_scale(CURVE, keep_learning_share=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        choose_scale(CURVE, forgetting_budget=-0.1)


# ------------------------------------------------------------------------------------------------- the campaign
def _prompts(path) -> list[str]:
    return [json.dumps(json.loads(line)["prompt"]) for line in Path(path).read_text().splitlines() if line.strip()]


def test_campaign_auto_chooses_records_and_shows_the_scale(tiny_chat_base, tmp_path):
    data = write_month(tmp_path / "m1.jsonl", "yes", "no")
    directory = tmp_path / "c"
    init = [*CAMPAIGN_INIT, "--retention_scale", "auto", "--retention_scales", "0", "0.5"]
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *init) == 0
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", data) == 0
    campaign = Campaign(directory)
    entry = campaign.month("m1")
    assert entry["retention_options"] == {
        "scale": "auto", "keep_learning": 0.9, "budget": None, "scales": [0.0, 0.5, 1.0], "validation_fraction": 0.2,
    }  # fmt: skip
    # 15 rows: 3 test rows, then 4 of the 12 training rows held out (never trained on, never test rows)
    assert (
        entry["data"]["test_rows"] == 3 and entry["data"]["train_rows"] == 8 and entry["data"]["validation_rows"] == 4
    )
    folder = directory / "data" / "m1"
    validation, train, test = (_prompts(folder / f"{split}.jsonl") for split in ("validation", "train", "test"))
    assert len(validation) == 4 and not set(validation) & set(test) and not set(validation) & set(train)
    record = entry["retention"]
    assert [point["scale"] for point in record["curve"]] == [0.0, 0.5, 1.0]
    assert record["validation_rows"] == 4 and record["scored_by"] == "agreement"
    at_zero = record["curve"][0]  # scale 0 is the model before the month
    assert at_zero["learning_gain"] == 0.0 and at_zero["forgetting"] < 1e-6
    assert record["scale"] == choose_scale(record["curve"], keep_learning_share=0.9)["scale"]
    assert record["rule"].startswith("least forgetting keeping >= 0.9") and record["met"]
    card = (directory / "cards" / "m1" / "README.md").read_text()
    assert "## Retention dial" in card and f"| m1 | {record['scale']:g} | – | {record['rule']} |" in card
    assert "| scale | validation score | learning gain | forgetting (KL) |" in card
    assert f"| **{record['scale']:g}** |" in card
    # a resumed month keeps its options; other ones are refused (a command re-reads campaign.json under its lock)
    state_file = directory / "campaign.json"
    state = json.loads(state_file.read_text())
    next(month for month in state["months"] if month["name"] == "m1")["status"] = "training"
    state_file.write_text(json.dumps(state))
    with pytest.raises(CampaignError, match="other retention options"):
        Campaign(directory).run_month("m1", retention_scale="0.5")


class CaptureTrained(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if ".m1" in name}


def test_campaign_fixed_scale_is_baked_into_the_saved_adapter(tiny_chat_base, tmp_path):
    data = write_month(tmp_path / "m1.jsonl", "yes", "no")
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    capture = CaptureTrained()
    entry = Campaign(directory).run_month("m1", data, callbacks=[capture], retention_scale=0.5)
    assert entry["retention"] == {"scale": 0.5, "rule": "fixed", "curve": []}
    assert entry["retention_options"] == {"scale": 0.5} and "validation_rows" not in entry["data"]
    saved = load_file(directory / "adapters" / "m1" / "adapter_model.safetensors")
    trained = {name.replace(".m1", ""): value for name, value in capture.weights.items()}
    assert saved and set(saved) == set(trained)
    for key, value in saved.items():
        factor = 0.5 if "selective_delta_B" in key else 1.0
        torch.testing.assert_close(value, factor * trained[key])
    card = (directory / "cards" / "m1" / "README.md").read_text()
    assert "| m1 | 0.5 | – | fixed |" in card and "| scale | validation score |" not in card


def test_campaign_per_block_factors_scale_only_their_blocks(tiny_chat_base, tmp_path):
    """`--retention_layer_scales` multiplies the month's scale per group of blocks, in the saved adapter."""
    data = write_month(tmp_path / "m1.jsonl", "yes", "no")
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    capture = CaptureTrained()
    with pytest.raises(CampaignError, match="overlap"):
        Campaign(directory).run_month("m1", data, retention_layer_scales="0-1:0.5,1-:1")
    assert Campaign(directory).month("m1") is None  # refused before the month was registered
    entry = Campaign(directory).run_month(
        "m1", data, callbacks=[capture], retention_scale=0.5, retention_layer_scales="0:0"
    )
    assert entry["retention_options"] == {"scale": 0.5, "layer_scales": {"0": 0.0}}
    assert entry["retention"]["layer_scales"] == {"0": 0.0}
    assert entry["retention"]["layer_factors"] == {"0": 0.0, "1": 0.5}
    saved = load_file(directory / "adapters" / "m1" / "adapter_model.safetensors")
    trained = {name.replace(".m1", ""): value for name, value in capture.weights.items()}
    for key, value in saved.items():
        block = layer_index(key)
        factor = {0: 0.0, 1: 0.5}[block] if "selective_delta_B" in key else 1.0
        torch.testing.assert_close(value, factor * trained[key])
    card = (directory / "cards" / "m1" / "README.md").read_text()
    assert "| m1 | 0.5 | 0: ×0 | fixed |" in card


def test_campaign_retention_options_are_checked():
    assert CampaignConfig().retention_options() is None  # off by default
    assert CampaignConfig(retention_scale=0.5).retention_options() == {"scale": 0.5}
    options = CampaignConfig(retention_scale="auto", retention_budget=0.1).retention_options(scales=[0.75, 0.25])
    assert options["budget"] == 0.1 and options["scales"] == [0.25, 0.75, 1.0]
    with pytest.raises(ValueError, match="'auto' or a number"):
        CampaignConfig(retention_scale="half")
    with pytest.raises(ValueError, match="retention_keep_learning"):
        CampaignConfig(retention_scale="auto", retention_keep_learning=1.5)
    with pytest.raises(ValueError, match="validation_fraction"):
        CampaignConfig(retention_scale="auto", validation_fraction=1.0)
    with pytest.raises(ValueError, match="retention_scale"):
        CampaignConfig(retention_scale="-1")
    # per-block factors alone turn the dial on at scale 1; they are stored in the one mapping form
    config = CampaignConfig(retention_layer_scales="0-9:0.5, 10-:1")
    assert config.retention_options() == {"scale": 1.0, "layer_scales": {"0-9": 0.5, "10-": 1.0}}
    assert CampaignConfig(retention_layer_scales={"0-9": 0.5}).retention_layer_scales == '{"0-9": 0.5}'
    auto = CampaignConfig(retention_scale="auto", retention_layer_scales='{"3": 0}').retention_options()
    assert auto["layer_scales"] == {"3": 0.0} and auto["scales"] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="blocks:factor"):
        CampaignConfig(retention_layer_scales="0-9")
    with pytest.raises(ValueError, match="finite number >= 0"):
        CampaignConfig(retention_layer_scales="0-9:-1")


def test_parse_layer_scales_reads_the_command_line_and_json_forms():
    assert parse_layer_scales("0-9:0.5,10-:1") == {"0-9": 0.5, "10-": 1.0}
    assert parse_layer_scales(' {"3": 0.25} ') == {"3": 0.25}
    assert parse_layer_scales({(0, 4): 0.5}) == {"(0, 4)": 0.5}
    assert parse_layer_scales(None) is None and parse_layer_scales("  ") is None
    for bad, message in [("0-9:x", "Invalid factor"), ("{not json", "JSON"), ("a:1", "Invalid layer_scales key"),
                         ("0-5:1,3-:1", "overlap"), ("{}", "must map")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_layer_scales(bad)
