"""The campaign offers every method and loss option of the library: geometry_projected (calibrated each month) through
the CLI, TRL's `loss_type` / `loss_weights` / `label_smoothing`, `sft_weight` and `rehearsal_reference` reaching the
trainer, the retention KL's anchor options (`kl_anchor_kinds`, `kl_max_shape_anchors`, `kl_anchor_refresh_steps`,
`kl_direction`) and boundary pairs (`boundary_pairs`, `boundary_max_new_tokens`) too, and bad values refused before
anything is written; new campaigns default to the recommended retention, older ones keep theirs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from testing_utils import SCRIPTS_DIR, cli, finish_boundary_answers, write_month
from transformers import TrainerCallback

from peft_selective.campaign.campaign import FORMAT_VERSION, Campaign, CampaignConfig
from peft_selective.campaign.config import FORMAT_TRAINING_DEFAULTS
from peft_selective.continual import RECOMMENDED_RETENTION, ContinualDPOConfig, ContinualDPOTrainer


# Small everything, as in campaign/test_campaign.py; no KL anchors, EWC, SFT term or boundary pairs (not under test
# here; the campaign's default retention turns the last two on).
SMALL = [
    "--rank", "4", "--learning_rate", "0.01", "--max_steps", "2", "--save_steps", "2",
    "--per_device_train_batch_size", "4", "--max_length", "64", "--rehearsal_ratio", "0.25", "--kl_coef", "0",
    "--sft_weight", "0", "--boundary_pairs", "0",
    "--knowledge_questions", "3", "--perplexity_max_tokens", "128", "--refusal_prompts", "2", "--drift_prompts", "2",
    "--eval_batch_size", "4", "--eval_suites", "preference", "behaviour", "perplexity", "kl",
]  # fmt: skip


@pytest.fixture(scope="module")
def months(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"m1": write_month(folder / "m1.jsonl", "yes", "no"), "m2": write_month(folder / "m2.jsonl", "good", "bad")}


def test_geometry_projected_two_months_through_the_cli(tiny_chat_base, months, tmp_path, capsys):
    directory = tmp_path / "geometry"
    protected = tmp_path / "protected.txt"
    protected.write_text("the capital of france is paris\n\nthe capital of germany is berlin\n")
    init = ["init", "--campaign_dir", directory, "--base_model", tiny_chat_base, "--method", "geometry_projected"]
    weighting = ["--calibration_weighting", "keep_loss_gradient"]
    assert cli(*init, *SMALL, *weighting, "--tolerance", "0.1", "--calibration_reference_chars", "4000") == 0
    assert (
        cli("run-month", "m1", "--campaign_dir", directory, "--data", months["m1"], "--calibration_data", protected)
        == 0
    )
    bars = capsys.readouterr().err
    assert "Calibrating protected subspace" in bars and "Choosing protected subspaces" in bars  # named, with ETA
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", months["m2"]) == 0
    campaign = Campaign(directory)
    assert campaign.done_months == ["m1", "m2"]
    first, second = campaign.month("m1")["calibration"], campaign.month("m2")["calibration"]
    # month 1: reference text + its own text + the bleed region (the month t-1 model's answers to the anchor prompts:
    # general ones and same-shape variants); month 2: reference text + month 1's training chats + its anchors (the
    # earlier-month kind too), month 1's subspace. Every source weighs the same.
    anchors = [record["texts"].pop("bleed_region") for record in (first, second)]
    assert first["texts"] == {"reference_text": 4, "earlier_months": 0, "calibration_data": 2}
    assert first["previous_adapter"] is None and first["tolerance"] == 0.1
    train_rows = campaign.month("m1")["data"]["train_rows"]
    assert second["texts"] == {"reference_text": 4, "earlier_months": train_rows, "calibration_data": 0}
    assert 0 < anchors[0] < anchors[1] and first["weighting"] == second["weighting"] == "equal per source"
    assert second["previous_adapter"] == "m1" and second["calibration_tokens"] > 0
    assert 0 < second["max_bound"] <= 0.1 + 1e-6 and second["layers"] > 0
    assert (directory / "data" / "m1" / "calibration.jsonl").is_file()
    for name in ("m1", "m2"):
        folder = directory / "adapters" / name
        report = json.loads((folder / "geometry_report.json").read_text())
        assert (
            report["adapter_name"] == name and len(report["layers"]) == campaign.month(name)["calibration"]["layers"]
        )
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "GEOMETRY_PROJECTED" and config["tolerance"] == 0.1
        assert config["calibration_weighting"] == report["weighting"] == "keep_loss_gradient"
        assert config["protected_dims"]  # the loaders size the protected buffers from it
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            bases = [k for k in handle.keys() if "protected_basis" in k]
            assert bases and all(handle.get_slice(k).get_shape()[1] > 0 for k in bases)
    card = (directory / "cards" / "m2" / "README.md").read_text()
    assert "geometry_projected" in card and "calibration_reference_chars" in card
    # the reloaded campaign evaluates the model it trained: the same numbers
    evaluated = campaign.evaluations["m2"]
    assert cli("eval", "--campaign_dir", directory, "--recompute") == 0
    reloaded = Campaign(directory).evaluations["m2"]
    for month in ("m1", "m2"):
        for key in ("ranking_margin", "implicit_reward_margin"):
            assert reloaded["preference"][month][key] == pytest.approx(evaluated["preference"][month][key], abs=1e-6)
    assert abs(campaign.evaluations["m1"]["preference"]["m1"]["implicit_reward_margin"]) > 1e-4  # it trained
    assert reloaded["general"]["perplexity"] == pytest.approx(evaluated["general"]["perplexity"], rel=1e-5)
    assert reloaded["behaviour"]["m1"]["scores"] == evaluated["behaviour"]["m1"]["scores"]


class _Capture(TrainerCallback):
    def __init__(self):
        self.args, self.logs = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.args = args

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_loss_options_reach_the_trainer_and_the_records(tiny_chat_base, months, tmp_path):
    directory = tmp_path / "losses"
    options = [
        "--loss_type", "sigmoid", "ipo", "--loss_weights", "1.0", "0.5", "--label_smoothing", "0.1",
        "--sft_weight", "0.3", "--rehearsal_reference", "previous_month",
    ]  # fmt: skip
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *SMALL, *options) == 0
    stored = json.loads((directory / "campaign.json").read_text())["config"]["training"]
    assert stored["loss_type"] == ["sigmoid", "ipo"] and stored["loss_weights"] == [1.0, 0.5]
    assert stored["sft_weight"] == 0.3 and stored["rehearsal_reference"] == "previous_month"
    campaign = Campaign(directory)
    capture = _Capture()
    campaign.run_month("m1", months["m1"], callbacks=[capture])
    args = capture.args
    assert args.loss_type == ["sigmoid", "ipo", "sft"] and args.loss_weights == [1.0, 0.5, 0.3]
    assert args.label_smoothing == 0.1 and args.rehearsal_reference == "previous_month" and args.sft_weight == 0.3
    assert any("loss/sft" in logs for logs in capture.logs)  # TRL's sft term is computed and logged
    card = (directory / "cards" / "m1" / "README.md").read_text()
    for key in ("loss_type", "sft_weight", "rehearsal_reference", "label_smoothing"):
        assert key in card
    # the defaults: TRL's ["sigmoid"] and the recommended retention's sft term
    default = CampaignConfig().training_args(tmp_path / "run", "m", None)
    assert default.loss_type == ["sigmoid", "sft"] and default.loss_weights == [1.0, 1.0]
    assert default.sft_weight == RECOMMENDED_RETENTION["sft_weight"] and default.rehearsal_reference == "own_month"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--loss_type", "sigmoid", "nonsense"], "'sigmoid', 'hinge', 'ipo'"),
        (["--rehearsal_reference", "last_year"], "['own_month', 'previous_month']"),
        (["--sft_weight", "-1"], "sft_weight"),
        (["--loss_type", "sft", "--sft_weight", "0.5"], "already has it"),
        (["--loss_type", "sigmoid", "ipo", "--loss_weights", "1.0"], "one weight per loss type"),
        (["--loss_type", "exo_pair"], "label_smoothing"),
        (["--method", "geometry"], "geometry_projected"),
        (["--method", "geometry_projected", "--tolerance", "0"], "tolerance"),
        (["--method", "geometry_projected", "--calibration_weighting", "gradients"], "calibration_weighting"),
        (["--kl_anchor_kinds", "general", "nearby"], "(['nearby'] not allowed)"),
        (["--kl_anchor_kinds", "general", "general"], "distinct values among ['general', 'same_shape'"),
        (["--kl_direction", "sideways"], "'forward' or 'reverse'"),
        (["--kl_max_shape_anchors", "-1"], "`kl_max_shape_anchors` must be >= 0"),
        (["--kl_anchor_refresh_steps", "-2"], "`kl_anchor_refresh_steps` must be >= 0"),
        (["--kl_anchor_refresh_steps", "2", "--kl_anchor_max_new_tokens", "0"], "set `kl_anchor_max_new_tokens > 0`"),
        (["--boundary_pairs", "-1"], "`boundary_pairs` must be >= 0"),
        (["--boundary_max_new_tokens", "0"], "`boundary_max_new_tokens` must be >= 1"),
    ],
)
def test_bad_options_are_refused_at_init_with_nothing_written(tmp_path, capsys, options, message):
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, *options) == 2
    assert message in capsys.readouterr().err
    assert not directory.exists()


ANCHOR_OPTIONS = (
    "kl_direction",
    "kl_anchor_kinds",
    "kl_max_shape_anchors",
    "kl_anchor_refresh_steps",
    "boundary_pairs",
    "boundary_max_new_tokens",
)


def test_anchor_and_boundary_options_reach_the_trainer_and_the_records(tiny_chat_base, months, tmp_path, monkeypatch):
    finish_boundary_answers(monkeypatch)
    directory = tmp_path / "anchors"
    options = [
        "--kl_coef", "0.1", "--kl_anchors", "2", "--kl_anchor_max_new_tokens", "3",
        "--kl_anchor_kinds", "general", "same_shape", "--kl_max_shape_anchors", "5", "--kl_anchor_refresh_steps", "1",
        "--kl_direction", "reverse", "--boundary_pairs", "2", "--boundary_max_new_tokens", "6",
    ]  # fmt: skip
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *SMALL, *options) == 0
    expected = {
        "kl_direction": "reverse",
        "kl_anchor_kinds": ["general", "same_shape"],
        "kl_max_shape_anchors": 5,
        "kl_anchor_refresh_steps": 1,
        "boundary_pairs": 2,
        "boundary_max_new_tokens": 6,
    }
    stored = json.loads((directory / "campaign.json").read_text())["config"]["training"]
    assert {key: stored[key] for key in ANCHOR_OPTIONS} == expected
    campaign = Campaign(directory)
    assert {key: campaign.config.training[key] for key in ANCHOR_OPTIONS} == expected  # reloaded as stored
    trainers = []
    original_init = ContinualDPOTrainer.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(ContinualDPOTrainer, "__init__", recording_init)
    capture = _Capture()
    campaign.run_month("m1", months["m1"], callbacks=[capture])
    assert {key: getattr(capture.args, key) for key in ANCHOR_OPTIONS} == expected
    (trainer,) = trainers
    # the anchor set: 2 general prompts and the month's same-shape variants ("question population red one", ...)
    kinds = trainer.anchors.kind_counts()
    assert kinds["general"] == 2 and 0 < kinds["same_shape"] <= 5 and set(kinds) == {"general", "same_shape"}
    assert trainer._anchors_refreshed_at is not None  # regenerated from the policy (every step)
    # the boundary rows joined the training set, and the trainer logged their share
    assert trainer.boundary_rows == 2
    assert sum(trainer.train_dataset["is_boundary"]) == 2
    assert campaign.month("m1")["data"]["boundary_rows"] == 2  # recorded, since answers can be skipped
    assert any("boundary/fraction" in logs for logs in capture.logs)
    assert any("retention/kl" in logs for logs in capture.logs)
    card = (directory / "cards" / "m1" / "README.md").read_text()
    for key in ANCHOR_OPTIONS:
        assert key in card


def test_new_campaigns_default_to_the_recommended_retention_and_older_ones_keep_theirs(tmp_path, caplog):
    """`CampaignConfig()` and `init` without retention options give `RECOMMENDED_RETENTION`; each term is turned off
    by its option at 0; a campaign.json of an older format keeps the defaults it was created with."""
    assert {key: CampaignConfig().training[key] for key in RECOMMENDED_RETENTION} == RECOMMENDED_RETENTION
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--knowledge_questions", "3") == 0
    stored = json.loads((directory / "campaign.json").read_text())
    assert {key: stored["config"]["training"][key] for key in RECOMMENDED_RETENTION} == RECOMMENDED_RETENTION
    args = Campaign(directory).config.training_args(tmp_path / "run", "m", None)
    assert {key: getattr(args, key) for key in RECOMMENDED_RETENTION} == RECOMMENDED_RETENTION
    assert args.loss_type == ["sigmoid", "sft"]
    # each term off with its option at 0; a comma-separated list of anchor kinds is accepted, stored as a list
    off = tmp_path / "off"
    options = ["--rehearsal_ratio", "0", "--kl_coef", "0", "--sft_weight", "0", "--boundary_pairs", "0"]
    assert cli("init", "--campaign_dir", off, "--kl_anchor_kinds", "general,same_shape", *options) == 0
    training = Campaign(off).config.training
    assert [training[key] for key in ("rehearsal_ratio", "kl_coef", "sft_weight", "boundary_pairs")] == [0, 0, 0, 0]
    assert training["kl_anchor_kinds"] == ["general", "same_shape"]
    args = Campaign(off).config.training_args(tmp_path / "run", "m", None)
    assert args.loss_type == ["sigmoid"] and args.sft_weight == 0 and args.boundary_pairs == 0
    # a campaign.json of format 3 (before the recommended retention was the default) written before these options
    # existed: it loads with the defaults it was created with, says so in its config and keeps them when rewritten
    path = directory / "campaign.json"
    state = json.loads(path.read_text())
    assert state["config"]["calibration_anchors"] is True  # new campaigns protect the bleed region
    for key in (*RECOMMENDED_RETENTION, *ANCHOR_OPTIONS):
        state["config"]["training"].pop(key, None)
    state["config"].pop("calibration_anchors")
    path.write_text(json.dumps({**state, "format_version": 3}))
    with caplog.at_level(logging.INFO, logger="peft_selective.campaign.config"):
        campaign = Campaign(directory)
    assert "campaign.json of format 3 has no ['boundary_pairs', 'kl_anchor_kinds'" in caplog.text
    old = FORMAT_TRAINING_DEFAULTS[3]
    assert old == {
        "rehearsal_ratio": 0.2,
        "rehearsal_reference": "own_month",
        "kl_coef": 0.1,
        "kl_every": 1,
        "kl_anchor_kinds": ["general", "earlier_months"],
        "sft_weight": 0.0,
        "boundary_pairs": 0,
    }
    assert {key: campaign.config.training[key] for key in RECOMMENDED_RETENTION} == old
    assert campaign.config.calibration_anchors is False  # geometry months calibrated on their texts, as then
    trainer_defaults = ContinualDPOConfig(str(tmp_path / "run"), bf16=False, use_cpu=True)
    args = campaign.config.training_args(tmp_path / "run", "m", None)
    assert args.loss_type == ["sigmoid"] and args.sft_weight == 0 and args.boundary_pairs == 0
    for key in ANCHOR_OPTIONS:  # the other anchor options: the trainer's defaults, as then
        assert getattr(args, key) == getattr(trainer_defaults, key), key
    campaign._save_state()  # rewritten in today's format, the old defaults explicit
    state = json.loads(path.read_text())
    assert state["format_version"] == FORMAT_VERSION
    assert {key: state["config"]["training"][key] for key in RECOMMENDED_RETENTION} == old
    assert Campaign(directory).config == campaign.config
    # the table covers every recommended option, so that a change of RECOMMENDED_RETENTION leaves older campaigns be
    assert all(set(defaults) >= set(RECOMMENDED_RETENTION) for defaults in FORMAT_TRAINING_DEFAULTS.values())
    assert FORMAT_VERSION not in FORMAT_TRAINING_DEFAULTS


def test_a_format_4_campaign_keeps_the_every_step_kl_it_was_created_with(tmp_path):
    """Format 4 campaigns were created with the KL on every step at 0.1; a file of that format without those keys
    (hand-edited) trains with them, not with today's every-second-step 0.2."""
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--knowledge_questions", "3") == 0
    assert (RECOMMENDED_RETENTION["kl_coef"], RECOMMENDED_RETENTION["kl_every"]) == (0.2, 2)
    path = directory / "campaign.json"
    state = json.loads(path.read_text())
    for key in ("kl_coef", "kl_every"):
        state["config"]["training"].pop(key)
    path.write_text(json.dumps({**state, "format_version": 4}))
    args = Campaign(directory).config.training_args(tmp_path / "run", "m", None)
    assert (args.kl_coef, args.kl_every) == (0.1, 1)
    assert {key: getattr(args, key) for key in RECOMMENDED_RETENTION} == FORMAT_TRAINING_DEFAULTS[4]


def test_two_months_with_the_default_retention_train_with_every_recommended_term(
    tiny_chat_base, months, tmp_path, monkeypatch
):
    """A campaign with no retention option set (only sizes made small) trains each term of `RECOMMENDED_RETENTION`:
    month 2 rehearses month 1's pairs against month 1's own reference, the KL has general and same-shape anchors
    (earlier-month ones in month 2), the SFT term and the boundary rows are in the loss and the training set."""
    finish_boundary_answers(monkeypatch)
    directory = tmp_path / "default"
    sizes = [
        "--rank", "4", "--learning_rate", "0.01", "--max_steps", "2", "--save_steps", "2",
        "--per_device_train_batch_size", "4", "--max_length", "64", "--kl_anchors", "2", "--kl_max_shape_anchors", "3",
        "--kl_anchor_max_new_tokens", "2", "--boundary_max_new_tokens", "4", "--knowledge_questions", "3",
        "--eval_suites", "preference", "--eval_batch_size", "4",
    ]  # fmt: skip
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *sizes) == 0
    trainers, captures = [], {}
    original_init = ContinualDPOTrainer.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ContinualDPOTrainer, "__init__", recording_init)
        for name in ("m1", "m2"):
            captures[name] = _Capture()
            Campaign(directory).run_month(name, months[name], callbacks=[captures[name]])
    args = captures["m2"].args
    assert {key: getattr(args, key) for key in RECOMMENDED_RETENTION} == RECOMMENDED_RETENTION
    assert args.loss_type == ["sigmoid", "sft"]
    first, second = trainers
    assert set(first.anchors.kind_counts()) == {"general", "same_shape"}  # no earlier month yet
    assert set(second.anchors.kind_counts()) == {"general", "same_shape", "earlier_months"}
    assert first.boundary_rows == second.boundary_rows == RECOMMENDED_RETENTION["boundary_pairs"]
    assert second.own_reference_rows > 0  # month 1's rehearsed pairs scored against month 1's reference
    logs = {key for entry in captures["m2"].logs for key in entry}
    assert {"loss/sft", "retention/kl", "boundary/fraction", "rehearsal/own_reference_rows"} <= logs


def test_bad_calibration_data_is_refused_before_the_month_is_registered(tiny_chat_base, months, tmp_path, capsys):
    geometry, selective = tmp_path / "geometry", tmp_path / "selective"
    assert (
        cli("init", "--campaign_dir", geometry, "--base_model", tiny_chat_base, "--method", "geometry_projected") == 0
    )
    assert cli("init", "--campaign_dir", selective, "--base_model", tiny_chat_base) == 0
    empty, bad_json, no_text, csv = (tmp_path / n for n in ("empty.txt", "bad.jsonl", "notext.jsonl", "x.csv"))
    empty.write_text("\n \n")
    bad_json.write_text("{not json\n")
    no_text.write_text(json.dumps({"content": "hello"}) + "\n")
    csv.write_text("text\nhello\n")
    cases = [
        (geometry, tmp_path / "missing.txt", "does not exist"),
        (geometry, empty, "holds no text"),
        (geometry, bad_json, "line 1: not JSON"),
        (geometry, no_text, "'text' string"),
        (geometry, csv, ".txt file or a .jsonl file"),
        (selective, empty, "only used by method 'geometry_projected'"),
    ]
    for directory, path, message in cases:
        before = (directory / "campaign.json").read_bytes()
        run = ["run-month", "m1", "--campaign_dir", directory, "--data", months["m1"], "--calibration_data", path]
        assert cli(*run) == 2
        err = capsys.readouterr().err
        assert message in err and "not registered" in err, err
        assert (directory / "campaign.json").read_bytes() == before
        assert sorted(p.name for p in Path(directory).iterdir()) == ["campaign.json"]


def test_a_geometry_month_killed_mid_way_resumes_to_the_same_adapter(tiny_chat_base, months, tmp_path):
    first = tmp_path / "first"
    steps = ["--max_steps", "4", "--save_steps", "2", "--calibration_reference_chars", "4000"]
    assert cli("init", "--campaign_dir", first, "--base_model", tiny_chat_base, "--method", "geometry_projected",
               *SMALL, *steps) == 0  # fmt: skip
    assert cli("run-month", "m1", "--campaign_dir", first, "--data", months["m1"]) == 0
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(first, straight)
    shutil.copytree(first, killed)
    # every run on one thread, as the killed subprocess: float sums depend on the thread count, a resume must not
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli("run-month", "m2", "--data", months["m2"], "--campaign_dir", straight) == 0
        script = SCRIPTS_DIR / "campaign_kill.py"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        result = subprocess.run(
            [sys.executable, str(script), str(killed), "m2", months["m2"], "3"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == -9, result.stderr[-3000:]
        assert Campaign(killed).month("m2")["status"] == "training"
        assert cli("run-month", "m2", "--campaign_dir", killed) == 0  # resumes from checkpoint-2, calibrated the same
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(straight / "adapters" / "m2" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapters" / "m2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("protected_basis" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
