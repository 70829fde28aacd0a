"""Model cards of the monthly adapters: rendered from model_cards/adapter_card.md, parsed back by huggingface_hub."""

import copy

import pytest
from huggingface_hub import ModelCard

from peft_selective.campaign.model_card import DEFAULT_TEMPLATE_PATH, ModelCardContextError, render_model_card


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
    # base model, quantization, method and hyperparameters, data
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in text and "during training:** 4bit" in text
    assert "| learning_rate | `5e-06` |" in text and "| rank | `16` |" in text
    assert "`30 items: [" in text  # long lists are cut, with their length
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
