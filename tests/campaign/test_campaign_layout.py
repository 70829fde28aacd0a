"""One campaign layout, one month-name rule, one nested config: `peft_selective.campaign.layout` names every path
that campaign.py, hub.py and model_card.py use; month names are checked by one rule in the CLI, the campaign and the
loader; `CampaignConfig` nests the trainer's and the evaluation's options, reads flat 0.1/0.2 campaign.json files and
takes `rank=None` / `"full"` for full rank."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
from testing_utils import cli

from peft_selective.campaign import Campaign, CampaignConfig, CampaignError, hub, layout, model_card
from peft_selective.campaign.campaign import FORMAT_VERSION
from peft_selective.campaign.cli import InitArguments
from peft_selective.campaign.config import FLAT_OPTIONS, TRAINING_OPTIONS, parse_rank
from peft_selective.continual.config import ContinualDPOConfig


PACKAGE = Path(layout.__file__).parent
#: Path segments and file names of the campaign directory and the Hub repository (layout.py's values).
PATH_LITERALS = {
    value
    for name, value in vars(layout).items()
    if name.isupper() and isinstance(value, str) and name.endswith(("_FILE", "_DIR")) and value != "data"
}


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal (f-string parts included) of a module, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize("module", ["campaign.py", "config.py", "hub.py", "model_card.py", "cli.py"])
def test_no_module_but_layout_writes_a_campaign_or_hub_path(module):
    assert {"campaign.json", "adapters", "cards", "runs", "buffer", "fisher", "months", "README.md"} <= PATH_LITERALS
    found = []
    for line, text in _string_constants(ast.parse((PACKAGE / module).read_text())):
        # a path built here: a layout name as the whole literal, or as a segment of a literal with a "/"
        # ("months" alone is also campaign.json's key of the month list, not a path)
        exact = text in PATH_LITERALS - {layout.HUB_MONTHS_DIR}
        segment = "/" in text and bool(PATH_LITERALS & set(text.replace("`", " ").replace("/", " / ").split()))
        if exact or segment:
            found.append((line, text))
    assert not found, f"{module} spells campaign/Hub paths itself (use peft_selective.campaign.layout): {found}"


def test_hub_and_card_follow_the_layout(tmp_path, monkeypatch):
    root = tmp_path / "c"
    monkeypatch.setattr(layout, "CARDS_DIR", "model-cards")
    monkeypatch.setattr(layout, "HUB_MONTHS_DIR", "by-month")
    months = ["2025-06", "2025-07"]
    (root).mkdir()
    (root / layout.CAMPAIGN_FILE).write_text(json.dumps({"months": [{"name": m, "status": "done"} for m in months]}))
    for month in months:
        paths = layout.CampaignLayout(root)
        paths.adapter(month).mkdir(parents=True)
        for name in layout.ADAPTER_FILES:
            (paths.adapter(month) / name).write_text("{}")
        paths.card(month).mkdir(parents=True)
        for name in layout.CARD_FILES:
            (paths.card(month) / name).write_text("x")
    plan = hub.plan_push(root, "org/name")
    assert all(local.parent.parent.name in ("adapters", "model-cards") for local, _ in plan)  # read from the layout
    assert [p for _, p in plan][:4] == [
        f"by-month/2025-06/{name}" for name in (*layout.ADAPTER_FILES, *layout.CARD_FILES)
    ]
    assert [p for _, p in plan][-4:] == [*layout.ADAPTER_FILES, *layout.CARD_FILES]
    context = {"hub_repo": "org/name", "months": months}
    ctx = type("Ctx", (), {**context, "quantization": None, "base_model": "base", "base": {"kind": "hub"}})
    assert 'subfolder="by-month/2025-07"' in model_card._loading_code(ctx)
    ctx.hub_repo = None
    assert '"adapters/2025-07"' in model_card._loading_code(ctx)


# ------------------------------------------------------------------------------------------------- month names
@pytest.mark.parametrize("name", ["2025-07", "m1", "v1.2_b", "a" * layout.MONTH_NAME_MAX_LENGTH])
def test_the_month_name_rule_accepts(name):
    assert layout.check_month_name(name) == name and layout.is_month_name(name)


@pytest.mark.parametrize("name", ["", "../x", "..", ".hidden", "a/b", "a\\b", "-x", "a b", "a" * 65, None, 7])
def test_the_month_name_rule_refuses(name):
    assert not layout.is_month_name(name)
    with pytest.raises(ValueError, match="Invalid month name"):
        layout.check_month_name(name)


def _campaign(directory: Path) -> Path:
    Campaign.init(directory, CampaignConfig(knowledge_questions=3))
    return directory


def test_the_cli_and_the_loader_use_the_month_name_rule(tmp_path, capsys):
    directory = _campaign(tmp_path / "c")
    for argv in (["run-month", "../evil"], ["run-month", "a" * 65], ["eval", "--month", "x/y"]):
        assert cli(*argv, "--campaign_dir", directory) == 2
        assert "Invalid month name" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Invalid month name"):
        Campaign(directory).run_month("../evil")
    # a crafted name in campaign.json is refused on load (and by the push)
    path = directory / layout.CAMPAIGN_FILE
    state = json.loads(path.read_text())
    state["months"] = [{"name": "../../outside", "status": "done", "data": {}}]
    path.write_text(json.dumps(state))
    with pytest.raises(CampaignError, match="Invalid month name '../../outside' in"):
        Campaign(directory)
    with pytest.raises(hub.CampaignPushError, match="cannot be a repo folder name"):
        hub.done_months(directory)


# ------------------------------------------------------------------------------------------------- the nested config
#: campaign.json's config as peft-selective 0.2 wrote it: flat, `rank: 0` for full rank.
FLAT_CONFIG = {
    "base_model": "embedded", "quantization": None, "method": "selective_mlp", "rank": 0, "alpha": None, "seed": 7,
    "learning_rate": 0.01, "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
    "beta": 0.2, "max_length": 96, "gradient_checkpointing": False, "save_steps": 2, "rehearsal_ratio": 0.25,
    "rehearsal_samples_per_month": 50, "rehearsal_nll_coef": 0.0, "kl_coef": 0.5, "kl_every": 1,
    "kl_anchor_max_new_tokens": 4, "kl_anchors": 4, "ewc_coef": 1.0, "eval_suites": ["preference", "kl"],
    "knowledge_questions": 3, "knowledge_data": None, "knowledge_exact_items": 2, "perplexity_max_tokens": 128,
    "refusal_prompts": 2, "drift_prompts": 3, "eval_batch_size": 4, "eval_max_new_tokens": 12, "hub_repo": None,
    "license": None,
}  # fmt: skip


def test_a_flat_campaign_json_loads_into_the_nested_config(tmp_path):
    directory = _campaign(tmp_path / "c")
    path = directory / layout.CAMPAIGN_FILE
    state = json.loads(path.read_text())
    state.update(format_version=1, config=FLAT_CONFIG)  # older keys (the anchor options, ...) missing: defaults
    path.write_text(json.dumps(state))
    campaign = Campaign(directory)
    config = campaign.config
    assert config.rank is None and config.seed == 7
    assert config.training["learning_rate"] == 0.01 and config.training["kl_coef"] == 0.5
    assert config.training["kl_max_general_anchors"] == config.training["kl_max_rehearsal_anchors"] == 4
    assert config.training["kl_direction"] == "forward"  # absent from the old file: the default
    # absent too, but their defaults changed since: the campaign keeps those it was created with
    assert config.training["sft_weight"] == 0 and config.training["boundary_pairs"] == 0
    assert config.training["kl_anchor_kinds"] == ["general", "earlier_months"]
    evaluation = config.evaluation_config()
    assert evaluation.suites == ["preference", "kl"] and evaluation.batch_size == 4 and evaluation.seed == 7
    assert evaluation.behaviour_max_new_tokens == evaluation.refusal_max_new_tokens == 12
    assert evaluation.knowledge_max_new_tokens == 12 and evaluation.max_length == 96
    args = config.training_args(tmp_path / "run", "m", tmp_path / "fisher")
    assert (args.learning_rate, args.max_length, args.seed, args.kl_max_general_anchors) == (0.01, 96, 7, 4)
    assert args.per_device_eval_batch_size == 4
    # the next write stores the nested form, which reads back to the same config
    campaign._save_state()
    stored = json.loads(path.read_text())
    assert stored["format_version"] == FORMAT_VERSION and stored["config"]["training"]["kl_coef"] == 0.5
    assert "learning_rate" not in stored["config"] and stored["config"]["rank"] is None
    assert Campaign(directory).config == config
    # the flat form and the nested one are the same config (the flat one read as the format-1 file it was)
    flat = CampaignConfig.from_dict({**FLAT_CONFIG, "rank": "full"}, format_version=1)
    assert flat == CampaignConfig.from_dict(config.to_dict())
    assert CampaignConfig.from_dict(config.to_dict()) == config
    state["config"] = {**FLAT_CONFIG, "learning_rat": 1.0}
    path.write_text(json.dumps(state))
    with pytest.raises(CampaignError, match=r"unknown config keys \['learning_rat'\]"):
        Campaign(directory)


def test_the_init_flags_are_the_nested_configs_fields():
    flags = {f.name: f for f in dataclasses.fields(InitArguments)}
    own = {f.name for f in dataclasses.fields(CampaignConfig)} - {"training", "evaluation"}
    assert set(flags) == {"campaign_dir", "verbose", "overwrite"} | own | set(FLAT_OPTIONS)
    trainer = typing.get_type_hints(ContinualDPOConfig)
    trainer_help = {f.name: f.metadata.get("help") for f in dataclasses.fields(ContinualDPOConfig)}
    for name in set(TRAINING_OPTIONS) - {"max_length"}:
        # (the parser narrows `Optional[X]` to `X` in place once it has read the fields)
        assert flags[name].type in (trainer[name], *typing.get_args(trainer[name])), name
        assert flags[name].metadata.get("help") == trainer_help[name], name
    defaults = CampaignConfig()
    assert flags["kl_coef"].default == defaults.training["kl_coef"] == 0.2
    assert flags["eval_batch_size"].default == defaults.evaluation.batch_size
    with pytest.raises(ValueError, match="the campaign sets them"):
        CampaignConfig(training={"seed": 1})
    with pytest.raises(ValueError, match="not ContinualDPOConfig fields"):
        CampaignConfig(training={"learning_rat": 1.0})
    with pytest.raises(ValueError, match="not EvaluationConfig fields"):
        CampaignConfig(evaluation={"batch": 1})
    nested = CampaignConfig(training={"learning_rate": 1e-3}, evaluation={"batch_size": 2})
    assert nested.training["learning_rate"] == 1e-3 and nested.training["max_steps"] == 20
    assert nested.evaluation_config().batch_size == 2 and nested.evaluation_config().seed == nested.seed


# ------------------------------------------------------------------------------------------------- full rank
@pytest.mark.parametrize("value, rank", [(None, None), ("full", None), ("FULL", None), (8, 8), ("8", 8)])
def test_rank_full_and_none(value, rank):
    assert parse_rank(value) == rank
    config = CampaignConfig(rank=value)
    assert config.rank == rank and config.peft_config().rank == rank


@pytest.mark.parametrize("value", [0, "0", -1, "x", 1.5, True])
def test_a_bad_rank_is_refused(value):
    with pytest.raises(ValueError, match="`rank` must be"):
        parse_rank(value)


def test_full_rank_through_the_cli_and_lora_needs_a_rank(tmp_path, capsys):
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--rank", "full", "--knowledge_questions", "3") == 0
    assert json.loads((directory / layout.CAMPAIGN_FILE).read_text())["config"]["rank"] is None
    assert Campaign(directory).config.rank is None
    assert cli("init", "--campaign_dir", tmp_path / "l", "--method", "lora", "--rank", "full") == 2
    assert "`rank` must be > 0 for method 'lora'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="for method 'lora'"):
        CampaignConfig(method="lora", rank=None)
