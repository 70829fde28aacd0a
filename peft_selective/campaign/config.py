"""The campaign's config: what is fixed for a campaign's life, written by `init` to `campaign.json`.

`CampaignConfig` holds the campaign's own options (base model, method, rank, knowledge pool, health limits,
retention dial, Hub) and nests the two configs it drives: `training`, overrides of the trainer's
[`~peft_selective.continual.config.ContinualDPOConfig`] fields, and `evaluation`, an
[`~peft_selective.evaluation.suites.EvaluationConfig`]. The flat options of the `continual-dpo init` command
(`--learning_rate`, `--kl_coef`, `--eval_batch_size`, ...) and of the campaign.json files written by peft-selective
0.1/0.2 map onto the nested ones through one table, `FLAT_OPTIONS`; [`CampaignConfig.from_dict`] reads either form.

A new campaign trains with the recommended retention (`peft_selective.continual.RECOMMENDED_RETENTION`, in
`TRAINING_DEFAULTS`); a campaign.json of an older format keeps the defaults it was written under
(`FORMAT_TRAINING_DEFAULTS`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import tempfile
import typing
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig

from .. import GeometryProjectedConfig, SAProjConfig, SelectiveMLPConfig
from ..continual.config import RECOMMENDED_RETENTION, ContinualDPOConfig
from ..evaluation.suites import EvaluationConfig
from ..retention import parse_layer_scales
from ..tuners.geometry.config import CALIBRATION_WEIGHTINGS
from .layout import FISHER_DIR


logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
METHODS = ("selective_mlp", "saproj", "lora", "geometry_projected")
#: TRL's `DPOConfig.loss_type` values (`trl.DPOTrainer` refuses others, but only once training starts).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
REHEARSAL_REFERENCES = ("own_month", "previous_month")
#: The word for full rank (`rank=None`): the selective methods train a full-rank update.
FULL_RANK = "full"

# ------------------------------------------------------------------------------------------------- nested options
#: `ContinualDPOConfig` fields that are also flat options (`init` flags), under the trainer's names, types and help.
TRAINING_OPTIONS = (
    "learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "beta", "max_length",
    "gradient_checkpointing", "save_steps", "rehearsal_ratio", "rehearsal_samples_per_month", "rehearsal_nll_coef",
    "kl_coef", "kl_every", "kl_anchor_max_new_tokens", "kl_direction", "kl_anchor_kinds", "kl_max_shape_anchors",
    "kl_anchor_refresh_steps", "boundary_pairs", "boundary_max_new_tokens", "ewc_coef", "rehearsal_reference",
    "loss_type", "loss_weights", "label_smoothing", "sft_weight", "drop_long_prompts", "anchor_generation_batch_size",
)  # fmt: skip
#: The campaign's training defaults where they differ from `ContinualDPOConfig`'s (every other option: the trainer's).
TRAINING_DEFAULTS: dict[str, Any] = {
    # Chosen by measurement: on the bundled model (SelectiveMLP r16 with rehearsal and KL, the capitals month, 18 steps
    # of 4 pairs) 1e-4 put 1 of 12 validation answers in the month's style and 3e-4 all 12 (the learning-rate selection
    # of the protocol-2 run committed in 7a40296, benchmarks/results/forgetting.md).
    "learning_rate": 3e-4,
    "max_steps": 20,
    "per_device_train_batch_size": 4,
    "max_length": 256,
    "gradient_checkpointing": False,
    "save_steps": 5,
    # Chosen by measurement: the protocol-2 ablation's recommended arm `ours` bleeds least at LoRA's learning
    # (benchmarks/results/forgetting.md); what it costs: benchmarks/results/month_cost.md. Campaigns created before it
    # was the default keep theirs (`FORMAT_TRAINING_DEFAULTS`).
    **RECOMMENDED_RETENTION,
    "kl_max_general_anchors": 32,
    "kl_max_rehearsal_anchors": 32,
}
#: The retention defaults of campaign.json formats 1 (the flat file of peft-selective 0.1/0.2) to 3, before
#: `RECOMMENDED_RETENTION` became the default: rehearsal 0.2 and KL 0.1 on general and earlier-month anchors, no SFT
#: term, no boundary pairs. Every key of `RECOMMENDED_RETENTION` is listed, so that a later change of it leaves them be.
_RETENTION_UNTIL_FORMAT_3: dict[str, Any] = {
    "rehearsal_ratio": 0.2,
    "rehearsal_reference": "own_month",
    "kl_coef": 0.1,
    "kl_every": 1,
    "kl_anchor_kinds": ["general", "earlier_months"],
    "sft_weight": 0.0,
    "boundary_pairs": 0,
}
#: Format 4's: `RECOMMENDED_RETENTION` with the KL on every step at 0.1 (every second step at 0.2 since format 5).
_RETENTION_OF_FORMAT_4: dict[str, Any] = {
    "rehearsal_ratio": 0.2,
    "rehearsal_reference": "own_month",
    "kl_coef": 0.1,
    "kl_every": 1,
    "kl_anchor_kinds": ["general", "same_shape", "earlier_months"],
    "sft_weight": 1.0,
    "boundary_pairs": 8,
}
#: campaign.json `format_version` (see `peft_selective.campaign.campaign.FORMAT_VERSION`) -> the training defaults a
#: file of that format was written under, where today's may differ (the retention options; every other key: today's
#: default). A key missing from such a file (written before the key was stored, or edited) takes the value its
#: campaign trained with, not today's: opening an older campaign never turns a retention term on. The current format
#: has no entry.
FORMAT_TRAINING_DEFAULTS: dict[int, dict[str, Any]] = {
    **dict.fromkeys((1, 2, 3), _RETENTION_UNTIL_FORMAT_3),
    4: _RETENTION_OF_FORMAT_4,
}
#: `ContinualDPOConfig` fields the campaign sets itself (per month, or from its own options).
CAMPAIGN_TRAINING_KEYS = (
    "output_dir", "adapter_name", "previous_adapters", "fisher_dir", "seed", "health_check", "save_strategy",
    "logging_steps", "report_to", "bf16", "use_cpu",
)  # fmt: skip
#: The campaign's evaluation defaults where they differ from `EvaluationConfig`'s (`seed` is always the campaign's).
EVALUATION_DEFAULTS: dict[str, Any] = {"refusal_max_new_tokens": 24}

#: Flat option name (an `init` flag, a key of a 0.1/0.2 campaign.json) -> the nested options it sets
#: (`"training.<ContinualDPOConfig field>"` / `"evaluation.<EvaluationConfig field>"`); the flag's type, default and
#: help come from the first one's field (help: `FLAT_HELP` where the flat option is the campaign's own).
FLAT_OPTIONS: dict[str, tuple[str, ...]] = {
    **{name: (f"training.{name}",) for name in TRAINING_OPTIONS},
    "max_length": ("training.max_length", "evaluation.max_length"),
    "kl_anchors": ("training.kl_max_general_anchors", "training.kl_max_rehearsal_anchors"),
    "eval_suites": ("evaluation.suites",),
    "knowledge_exact_items": ("evaluation.knowledge_exact_items",),
    "perplexity_max_tokens": ("evaluation.perplexity_max_tokens",),
    "refusal_prompts": ("evaluation.refusal_prompts",),
    "drift_prompts": ("evaluation.drift_prompts",),
    "eval_batch_size": ("evaluation.batch_size",),
    "eval_max_new_tokens": (
        "evaluation.behaviour_max_new_tokens",
        "evaluation.refusal_max_new_tokens",
        "evaluation.drift_max_new_tokens",
        "evaluation.knowledge_max_new_tokens",
    ),
}
#: Upper bounds of nested options set by a flat one (knowledge answers are short).
FLAT_CAPS = {"evaluation.knowledge_max_new_tokens": 16}
FLAT_HELP = {
    "max_length": "Prompt + response tokens kept (training and evaluation).",
    "kl_anchors": "General anchor prompts (and at most as many earlier months' prompts) for the KL.",
    "eval_suites": "Evaluation suites: preference behaviour knowledge perplexity kl refusal drift.",
    "knowledge_exact_items": "Surviving knowledge items answered by greedy generation (exact match).",
    "perplexity_max_tokens": "Reference-text tokens scored for perplexity.",
    "refusal_prompts": "Harmful (and benign) prompts for the refusal rates.",
    "drift_prompts": "Generic prompts for the drift probe, the KL to the base and the bleed.",
    "eval_batch_size": "Batch size of the evaluation.",
    "eval_max_new_tokens": "Generation length of the behavioural suite, knowledge (at most 16), refusal and drift "
    "probes.",
}


def _field_default(dataclass_type: type, name: str) -> Any:
    found = {f.name: f for f in dataclasses.fields(dataclass_type)}[name]
    return found.default_factory() if found.default is dataclasses.MISSING else copy.deepcopy(found.default)


def training_defaults() -> dict[str, Any]:
    """The campaign's `training` defaults: every `TRAINING_OPTIONS` entry (the trainer's default unless
    `TRAINING_DEFAULTS` has the campaign's), and `TRAINING_DEFAULTS`."""
    values = {name: _field_default(ContinualDPOConfig, name) for name in TRAINING_OPTIONS}
    return {**values, **copy.deepcopy(TRAINING_DEFAULTS)}


def evaluation_defaults() -> dict[str, Any]:
    """The campaign's `evaluation` defaults: `EvaluationConfig`'s, with `EVALUATION_DEFAULTS`."""
    values = {f.name: _field_default(EvaluationConfig, f.name) for f in dataclasses.fields(EvaluationConfig)}
    return {**values, **copy.deepcopy(EVALUATION_DEFAULTS)}


def parse_rank(value: Any) -> Optional[int]:
    """A campaign rank: a positive int, or `None` for full rank (written `"full"`). `0` is refused, as by the tuners'
    configs; the loader maps the `0` of campaign.json files written by peft-selective 0.1/0.2 to `None`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (FULL_RANK, "none")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"`rank` must be a positive integer or {FULL_RANK!r}, got {value!r}.")
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"`rank` must be a positive integer or {FULL_RANK!r}, got {value!r}.") from None
    if rank != value and not isinstance(value, str) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer or {FULL_RANK!r} (None) for full rank, got {value!r}.")
    return rank


def _load_spec(value: str, what: str) -> Any:
    """A JSON / YAML value given as a path to a `.json` / `.yaml` / `.yml` file or as a JSON / YAML string."""
    import yaml

    path = Path(value)
    text = value
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"The {what} file {path} does not exist.")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"Cannot read the {what} {value!r} as JSON or YAML: {error}") from error


def normalize_checks(value: Any, what: str = "checks") -> dict[str, list[dict]]:
    """A month's checks as stored in its entry: `{"checks": [spec, ...], "bleed_checks": [spec, ...]}`.

    `value` is a list of check specs, a dict `{"checks": [...], "bleed_checks": [...]}`, or a path / JSON / YAML string
    of either. Every spec is validated with `peft_selective.evaluation.Check.from_spec`; a bad one raises
    `ValueError` naming it.
    """
    from ..evaluation import Check

    if isinstance(value, str):
        value = _load_spec(value, what)
    if isinstance(value, dict) and set(value) <= {"checks", "bleed_checks"}:
        groups = {"checks": value.get("checks") or [], "bleed_checks": value.get("bleed_checks") or []}
    elif isinstance(value, (list, tuple)):
        groups = {"checks": list(value), "bleed_checks": []}
    elif isinstance(value, dict):  # a single spec
        groups = {"checks": [value], "bleed_checks": []}
    else:
        raise ValueError(
            f"The {what} must be a list of check specs or {{'checks': [...], 'bleed_checks': [...]}}, got {value!r}."
        )
    for group, specs in groups.items():
        if not isinstance(specs, (list, tuple)):
            raise ValueError(f"The {what}: {group!r} must be a list of check specs, got {specs!r}.")
        for spec in specs:
            try:
                Check.from_spec(spec)
            except (ValueError, TypeError, ImportError, AttributeError) as error:
                raise ValueError(f"Invalid check spec {spec!r} in the {what} ({group}): {error}") from error
    return {group: [dict(spec) for spec in specs] for group, specs in groups.items()}


@dataclass
class CampaignConfig:
    """Everything fixed for a campaign's life, written by `init` to `campaign.json`.

    Build one from keyword arguments (the nested form) or with [`CampaignConfig.from_dict`] from a mapping that may
    also use the flat options (`{"learning_rate": 1e-3, "eval_batch_size": 4, ...}`, see `FLAT_OPTIONS`).

    Attributes:
        base_model (`str`): model id or local path, or `"embedded"` for the bundled SmolLM2-135M-Instruct.
        quantization (`str`, *optional*): `"4bit"` (bitsandbytes NF4) or `"8bit"`; `None` loads in full precision.
        method (`str`): `"selective_mlp"` (Gate&Up), `"saproj"` (self-attention projections), `"lora"` (PEFT LoRA
            on all linear layers) or `"geometry_projected"` (`peft_selective.GeometryProjectedConfig`: the selective
            update projected away from a protected subspace of each layer's inputs, calibrated before each month on
            general reference text, the earlier months' training chats and the month's `calibration_data`, see
            [`Campaign.run_month`]).
        rank (`int`, *optional*): adapter rank; `None` (the CLI word `"full"`) trains the selective methods at full
            rank (the paper's recipe); `lora` needs a rank. `0` is refused (a `0` stored by an older campaign.json
            is read as `None` by the loader).
        alpha (`float`, *optional*): scaling numerator (`alpha / rank`); default: the rank (scale 1).
        seed (`int`): seed of training, data splits, sampling and the evaluation's bootstrap.
        training (`dict`): the DPO training of each month: `ContinualDPOConfig` fields by name, over the campaign's
            defaults (`training_defaults()`: `TRAINING_OPTIONS` at the trainer's defaults except `TRAINING_DEFAULTS`,
            which include the recommended retention, `RECOMMENDED_RETENTION`: rehearsal, KL, SFT term and boundary
            pairs are on; `training={"rehearsal_ratio": 0, "kl_coef": 0, "sft_weight": 0, "boundary_pairs": 0}` turns
            them off).
            The retention terms (rehearsal, KL and its anchors, boundary pairs, EWC: a Fisher is stored in `fisher/`
            when `ewc_coef` > 0) and TRL's loss options (`loss_type`: one or more of `DPO_LOSS_TYPES`, `loss_weights`,
            `label_smoothing`; `sft_weight` appends TRL's `"sft"` term) are checked at `init`. The keys the campaign
            sets itself (`CAMPAIGN_TRAINING_KEYS`: output folder, adapter name, seed, health check, ...) are refused.
        evaluation (`EvaluationConfig` or `dict`): the evaluation after each month (`peft_selective.evaluation.suites`);
            a dict is read over the campaign's defaults (`evaluation_defaults()`); its `seed` is the campaign's.
        tolerance, norm_cap (`float`): with `"geometry_projected"`, `GeometryProjectedConfig`'s allowed relative
            change of each layer's output on the protected data and cap on each layer's update norm.
        calibration_reference_chars (`int`): with `"geometry_projected"`, characters of general reference text
            (`peft_selective.evaluation.preference.reference_text`, in chunks of 1000) in every month's calibration data.
        calibration_weighting (`str`): with `"geometry_projected"`, `GeometryProjectedConfig.calibration_weighting`:
            `"inputs"` (default) protects every direction the protected inputs take, `"keep_loss_gradient"` the
            gradient subspace of the kept answers' negative log-likelihood (a backward pass per calibration batch).
        calibration_anchors (`bool`): with `"geometry_projected"`, also protect the bleed region, the month t−1
            model's answers to the retention KL's anchor prompts (at the answer positions), and weigh every calibration
            source the same (default `True`; a campaign.json written before this option reads as `False`, its months'
            calibration: texts weighted per token).
        knowledge_questions (`int`): size of the knowledge pool stored at `init` (default 250 candidates from
            `peft_selective.demo.months.knowledge_items`); every pool item is scored at every evaluation and the report keeps those
            that overlap no month's prompts nor the KL anchors (chosen after the data is known).
        knowledge_data (`str`, *optional*): a JSONL file of the user's own knowledge items (`question`, `answer`,
            `distractors`, optional `aliases` and `entity`) used as the pool instead; a month whose prompts overlap
            one of them is refused at `run-month` before anything is registered.
        checks (`dict`, *optional*): month name -> its checks (a list of check specs, or `{"checks": [...],
            "bleed_checks": [...]}`, see `peft_selective.evaluation.Check`), for YAML configs; `run-month --checks`
            takes precedence.
        hub_repo (`str`, *optional*): Hub repo for `push`. license (`str`, *optional*): for the model cards.
        health_check (`bool`): the model-health guard (`peft_selective.continual.health`), on by default: training stops on a
            non-finite loss or vanished gradients (`ContinualDPOConfig.health_check`), and a month whose evaluation
            shows a broken model is refused and leaves no trace (see [`Campaign.run_month`]).
        max_perplexity_ratio (`float`): refuse a month whose reference-text perplexity exceeds this many times month
            0's (default 1.5). Healthy months move it by about 1 % (21.87 → 21.91 after three months of the bundled
            example; at most +1.2 % in the stress benchmark), a broken model by orders of magnitude (21.8 →
            105,554,497 with the bitsandbytes CPU bug); 1.5 leaves a wide margin for a deliberate shift of domain.
        max_kl_to_base (`float`): refuse a month whose mean KL to the base (nats per token on the generic prompts)
            exceeds this (default 10.0). Healthy months measure 0.002-1.4 in the benchmarks and at most 4.9 in the
            stress benchmark (high learning rates, many months); 10 nats means the base's likely tokens became
            e^-10 times less likely.
        retention_scale (`str`): the retention dial (`peft_selective.retention`): after training, the month's update is
            multiplied by a scale `s`, which interpolates in weight space between the month t−1 model (`s = 0`) and the
            trained one (`s = 1`) (WiSE-FT; weight interpolation gives the best alignment-vs-forgetting front in Lin
            et al. 2024). `"1.0"` (default): off; a number: that scale; `"auto"`: chosen on held-out rows of the
            month's training data, see [`Campaign.run_month`]. The scale is baked into the saved adapter.
        retention_keep_learning (`float`): with `"auto"`, the least forgetting that keeps at least this share of the
            learning gain of the full update (default 0.9).
        retention_budget (`float`, *optional*): with `"auto"`, the most learning whose forgetting (KL to the month t−1
            model, nats per token) is at most this; takes precedence over `retention_keep_learning` when set.
        retention_scales (`list[float]`): the scales measured with `"auto"` (scale 1 is always measured too).
        retention_layer_scales (`str`, *optional*): the dial per group of blocks, multiplied with the month's scale
            (fixed or chosen): `"0-9:0.5,10-:1"` keeps blocks 0-9 twice as close to the month t−1 model as the rest
            (`peft_selective.retention.parse_layer_scales`; a JSON object works too). Blocks not named keep factor 1.
            With `"auto"` every scale of the grid is measured with these factors.
        validation_fraction (`float`): with `"auto"`, the share of the month's training rows held out to choose the
            scale (at least 4 rows; never the test rows, never trained on).
    """

    base_model: str = field(
        default=EMBEDDED,
        metadata={"help": "Model id or local path, or 'embedded' for the bundled SmolLM2-135M-Instruct."},
    )
    quantization: Optional[str] = field(
        default=None, metadata={"help": "'4bit' (bitsandbytes NF4), '8bit', or unset for full precision."}
    )
    method: str = field(
        default="selective_mlp",
        metadata={
            "help": "'selective_mlp' (Gate&Up), 'saproj' (attention projections), 'lora' or 'geometry_projected' "
            "(calibrated each month)."
        },
    )
    rank: Optional[Union[int, str]] = field(
        default=16, metadata={"help": "Adapter rank, or 'full': the selective methods at full rank."}
    )
    alpha: Optional[float] = field(
        default=None, metadata={"help": "Scaling numerator (alpha / rank); default: the rank."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of training, data splits and sampling."})
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "ContinualDPOConfig fields over the campaign's defaults."}
    )
    evaluation: Union[EvaluationConfig, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "EvaluationConfig fields over the campaign's defaults."}
    )
    tolerance: float = field(
        default=0.05,
        metadata={"help": "geometry_projected: allowed relative change of each layer's output on protected data."},
    )
    norm_cap: float = field(
        default=1.0, metadata={"help": "geometry_projected: cap on the Frobenius norm of each layer's update."}
    )
    calibration_reference_chars: int = field(
        default=32000,
        metadata={"help": "geometry_projected: characters of general reference text in each month's calibration."},
    )
    calibration_weighting: str = field(
        default="inputs",
        metadata={
            "help": "geometry_projected: 'inputs' (every protected token alike) or 'keep_loss_gradient' (each by "
            "how much the NLL of the kept answers depends on the layer's output there)."
        },
    )
    calibration_anchors: bool = field(
        default=True,
        metadata={
            "help": "geometry_projected: also protect the month t-1 model's answers to the KL anchor prompts (the "
            "bleed region), every calibration source weighing the same."
        },
    )
    knowledge_questions: int = field(
        default=250,
        metadata={"help": "Candidate knowledge items stored at init (scored by multiple choice at every evaluation)."},
    )
    knowledge_data: Optional[str] = field(
        default=None,
        metadata={"help": "JSONL of your own knowledge items {question, answer, distractors, aliases?, entity?}."},
    )
    checks: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Month name -> its checks (list of specs or {checks, bleed_checks}), JSON or YAML."},
    )
    max_test_rows: Optional[int] = field(
        default=500,
        metadata={
            "help": "Most held-out pairs kept per month: a larger test split is sampled down (seeded, recorded with "
            "the month), since every later evaluation generates an answer for each. None keeps them all."
        },
    )
    hub_repo: Optional[str] = field(default=None, metadata={"help": "Hub repo for `push`."})
    license: Optional[str] = field(default=None, metadata={"help": "License in the model cards' metadata."})
    health_check: bool = field(
        default=True, metadata={"help": "Refuse a month whose training or evaluation shows a broken model."}
    )
    max_perplexity_ratio: float = field(
        default=1.5, metadata={"help": "Refuse a month whose reference-text perplexity exceeds this x month 0's."}
    )
    max_kl_to_base: float = field(
        default=10.0, metadata={"help": "Refuse a month whose KL to the base exceeds this (nats per token)."}
    )
    retention_scale: str = field(
        default="1.0",
        metadata={
            "help": "Retention dial: scale of each month's update after training, toward the month t-1 model. '1.0' = "
            "off, a number = that scale, 'auto' = chosen on held-out training rows."
        },
    )
    retention_keep_learning: float = field(
        default=0.9, metadata={"help": "'auto': least forgetting keeping this share of the full update's learning."}
    )
    retention_budget: Optional[float] = field(
        default=None,
        metadata={"help": "'auto': most learning with KL to the month t-1 model <= this (precedence when set)."},
    )
    retention_scales: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0], metadata={"help": "'auto': the scales measured."}
    )
    retention_layer_scales: Optional[str] = field(
        default=None,
        metadata={
            "help": "Retention dial per group of blocks, times the month's scale: e.g. '0-9:0.5,10-:1' keeps blocks "
            "0-9 closer to the month t-1 model."
        },
    )
    validation_fraction: float = field(
        default=0.2, metadata={"help": "'auto': share of the month's training rows held out to choose the scale."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {list(METHODS)}.")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"`quantization` must be '4bit', '8bit' or None, got {self.quantization!r}.")
        self.rank = parse_rank(self.rank)
        if self.rank is None and self.method == "lora":
            raise ValueError(f"`rank` must be > 0 for method 'lora' ({FULL_RANK!r} is for the selective methods).")
        self.training = self._resolved_training(self.training)
        self.evaluation = self._resolved_evaluation(self.evaluation)
        self._check_loss_options()
        self._check_trainer_options()
        if self.checks is not None:
            mapping = _load_spec(self.checks, "checks") if isinstance(self.checks, str) else self.checks
            if not isinstance(mapping, dict):
                raise ValueError(f"`checks` must map month names to their checks, got {mapping!r}.")
            self.checks = {
                str(month): normalize_checks(value, f"checks of month {month!r}") for month, value in mapping.items()
            }
        if not self.max_perplexity_ratio >= 1.0:
            raise ValueError(f"`max_perplexity_ratio` must be >= 1, got {self.max_perplexity_ratio}.")
        if not self.max_kl_to_base > 0:
            raise ValueError(f"`max_kl_to_base` must be > 0, got {self.max_kl_to_base}.")
        if self.max_test_rows is not None and not (isinstance(self.max_test_rows, int) and self.max_test_rows > 0):
            raise ValueError(
                f"`max_test_rows` must be a positive number of rows (or None), got {self.max_test_rows!r}."
            )
        self.retention_scale = str(self.retention_scale).strip()
        if self.retention_layer_scales is not None and not isinstance(self.retention_layer_scales, str):
            self.retention_layer_scales = json.dumps(parse_layer_scales(self.retention_layer_scales))
        self.retention_options()  # checks the retention options
        self.retention_scales = [float(s) for s in self.retention_scales]

    # ---------------------------------------------------------------------------------------------- the one mapping
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], format_version: Optional[int] = None) -> CampaignConfig:
        """A config from a mapping in the nested form (`asdict(config)`, what campaign.json stores), the flat form
        (the `init` flags; campaign.json of peft-selective 0.1/0.2: `learning_rate`, `eval_batch_size`, `rank: 0`,
        ...), or a mix; flat options are written into `training` / `evaluation` through `FLAT_OPTIONS`. Raises
        `ValueError` naming unknown keys.

        Keys it lacks take today's defaults, unless `format_version` names the campaign.json format the mapping was
        read from: then the training keys it lacks take the defaults of that format (`FORMAT_TRAINING_DEFAULTS`), so
        an older campaign keeps the configuration it was created with, and the config holds them explicitly."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(FLAT_OPTIONS))
        if unknown:
            raise ValueError(f"Unknown campaign options {unknown}.")
        training = dict(values.pop("training", None) or {})
        evaluation = values.pop("evaluation", None) or {}
        evaluation = asdict(evaluation) if isinstance(evaluation, EvaluationConfig) else dict(evaluation)
        nested = {"training": training, "evaluation": evaluation}
        for name in [key for key in values if key in FLAT_OPTIONS]:
            value = values.pop(name)
            for target in FLAT_OPTIONS[name]:
                group, key = target.split(".")
                cap = FLAT_CAPS.get(target)
                nested[group][key] = min(cap, value) if cap is not None and value is not None else value
        if format_version is not None and "calibration_anchors" not in values:
            # written before the key existed: those campaigns calibrated on their texts alone, weighted per token
            values["calibration_anchors"] = False
        older = {k: v for k, v in FORMAT_TRAINING_DEFAULTS.get(format_version, {}).items() if k not in training}
        if older:
            logger.info(
                "campaign.json of format %s has no %s: kept at that format's defaults %s (today's: %s).",
                format_version,
                sorted(older),
                older,
                {key: training_defaults()[key] for key in older},
            )
            training.update(copy.deepcopy(older))
        return cls(**values, training=training, evaluation=evaluation)

    def to_dict(self) -> dict[str, Any]:
        """The nested form, as campaign.json stores it (`from_dict` reads it back)."""
        return asdict(self)

    @staticmethod
    def _resolved_training(training: Any) -> dict[str, Any]:
        if not isinstance(training, Mapping):
            raise ValueError(f"`training` must map ContinualDPOConfig fields to values, got {training!r}.")
        reserved = sorted(set(training) & set(CAMPAIGN_TRAINING_KEYS))
        if reserved:
            raise ValueError(
                f"`training` cannot set {reserved}: the campaign sets them (`seed`, `health_check`: its own)."
            )
        fields = {f.name for f in dataclasses.fields(ContinualDPOConfig)}
        unknown = sorted(set(training) - fields)
        if unknown:
            raise ValueError(f"`training` has keys that are not ContinualDPOConfig fields: {unknown}.")
        return {**training_defaults(), **copy.deepcopy(dict(training))}

    def _resolved_evaluation(self, evaluation: Any) -> EvaluationConfig:
        if isinstance(evaluation, EvaluationConfig):
            evaluation = asdict(evaluation)
        if not isinstance(evaluation, Mapping):
            raise ValueError(f"`evaluation` must be an EvaluationConfig or a dict of its fields, got {evaluation!r}.")
        unknown = sorted(set(evaluation) - {f.name for f in dataclasses.fields(EvaluationConfig)})
        if unknown:
            raise ValueError(f"`evaluation` has keys that are not EvaluationConfig fields: {unknown}.")
        values = {**evaluation_defaults(), **copy.deepcopy(dict(evaluation)), "seed": self.seed}
        return EvaluationConfig(**values)  # checks the suites

    @classmethod
    def flag_fields(cls) -> list[tuple[str, Any, dataclasses.Field]]:
        """The flat options as `dataclasses.make_dataclass` fields (the `init` flags): the config's own fields, and
        every `FLAT_OPTIONS` entry with the type and help of the nested field it sets and the campaign's default."""
        own = typing.get_type_hints(cls)
        hints = {
            "training": typing.get_type_hints(ContinualDPOConfig),
            "evaluation": typing.get_type_hints(EvaluationConfig),
        }
        help_of = {
            "training": {f.name: dict(f.metadata) for f in dataclasses.fields(ContinualDPOConfig)},
            "evaluation": {f.name: dict(f.metadata) for f in dataclasses.fields(EvaluationConfig)},
        }
        defaults = {"training": training_defaults(), "evaluation": evaluation_defaults()}
        result = []
        for item in dataclasses.fields(cls):
            if item.name not in ("training", "evaluation"):
                result.append((item.name, own[item.name], _flag_field(_field_default(cls, item.name), item.metadata)))
        for name, targets in FLAT_OPTIONS.items():
            group, key = targets[0].split(".")
            metadata = {**help_of[group][key]}
            if name in FLAT_HELP:
                metadata["help"] = FLAT_HELP[name]
            result.append((name, hints[group][key], _flag_field(defaults[group][key], metadata)))
        return result

    # ---------------------------------------------------------------------------------------------- checks
    def _check_loss_options(self) -> None:
        """Validate (and normalise) the loss and method options, so that a bad value fails at `init`, before anything
        is written, rather than when a month starts training."""
        training = self.training
        if training["rehearsal_reference"] not in REHEARSAL_REFERENCES:
            raise ValueError(
                f"`rehearsal_reference` must be one of {list(REHEARSAL_REFERENCES)}, got "
                f"{training['rehearsal_reference']!r}."
            )
        loss_type = training["loss_type"]
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
        unknown = [t for t in loss_types if t not in DPO_LOSS_TYPES]
        if not loss_types or unknown:
            raise ValueError(
                f"`loss_type` must be one or more of {list(DPO_LOSS_TYPES)} (TRL's DPOConfig.loss_type), got "
                f"{loss_type!r}."
            )
        training["loss_type"] = loss_types
        if training["loss_weights"] is not None:
            weights = training["loss_weights"]
            weights = [weights] if isinstance(weights, (int, float)) else list(weights)
            training["loss_weights"] = [_finite(w, "loss_weights") for w in weights]
            if len(training["loss_weights"]) != len(loss_types):
                raise ValueError(
                    f"`loss_weights` needs one weight per loss type: {len(training['loss_weights'])} weights for "
                    f"`loss_type={loss_types}`."
                )
        training["label_smoothing"] = _finite(training["label_smoothing"], "label_smoothing", 0.0, 0.5)
        if "exo_pair" in loss_types and training["label_smoothing"] == 0:
            raise ValueError("`loss_type` 'exo_pair' needs `label_smoothing` > 0 (the EXO paper recommends 1e-3).")
        training["sft_weight"] = sft_weight = _finite(training["sft_weight"], "sft_weight")
        if sft_weight > 0 and "sft" in loss_types:
            raise ValueError(
                f"`sft_weight={sft_weight}` appends TRL's 'sft' term itself, but `loss_type={loss_types}` already "
                "has it: drop 'sft' from `loss_type` (and its `loss_weights` entry), or set `sft_weight` to 0."
            )
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"`tolerance` must be a finite number > 0, got {self.tolerance!r}.")
        if not (math.isfinite(self.norm_cap) and self.norm_cap > 0):
            raise ValueError(f"`norm_cap` must be a finite number > 0, got {self.norm_cap!r}.")
        if self.calibration_reference_chars < 0:
            raise ValueError(f"`calibration_reference_chars` must be >= 0, got {self.calibration_reference_chars}.")
        if self.calibration_weighting not in CALIBRATION_WEIGHTINGS:
            raise ValueError(
                f"`calibration_weighting` must be one of {list(CALIBRATION_WEIGHTINGS)}, got "
                f"{self.calibration_weighting!r}."
            )

    def _check_trainer_options(self) -> None:
        """Validate the training options with `ContinualDPOConfig`'s own checks (the same errors, at `init` rather
        than when a month starts training), and keep their normalised values (`kl_anchor_kinds`: a list, from a
        comma-separated string or items too)."""
        kinds = self.training["kl_anchor_kinds"]
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        self.training["kl_anchor_kinds"] = [
            kind.strip() for item in kinds for kind in str(item).split(",") if kind.strip()
        ]
        with warnings.catch_warnings():  # TrainingArguments' deprecation notices belong to training, not to `init`
            warnings.simplefilter("ignore")
            scratch = Path(tempfile.gettempdir()) / "continual-dpo-check"
            # EWC needs a Fisher directory to be configured at all; the check only builds the config, reads nothing
            args = self.training_args(
                scratch, "check", scratch / FISHER_DIR if self.training["ewc_coef"] > 0 else None
            )
        self.training["kl_anchor_kinds"] = list(args.kl_anchor_kinds)

    def retention_options(self, **overrides: Any) -> Optional[dict[str, Any]]:
        """The retention dial's options, the campaign's unless given in `overrides` (the keys of its fields without
        `retention_`: `scale`, `keep_learning`, `budget`, `scales`, `layer_scales`, `validation_fraction`): `None`
        when off (scale 1, no layer scales), `{"scale": s}` for a fixed scale, and for `"auto"` `{"scale": "auto",
        "keep_learning", "budget", "scales" (sorted, 1 included), "validation_fraction"}`; with per-block factors,
        also `"layer_scales": {"0-9": 0.5, ...}`. Raises `ValueError` on a bad value."""
        names = {
            "scale": "retention_scale",
            "keep_learning": "retention_keep_learning",
            "budget": "retention_budget",
            "scales": "retention_scales",
            "layer_scales": "retention_layer_scales",
            "validation_fraction": "validation_fraction",
        }
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"Unknown retention options {unknown}; known: {sorted(names)}.")
        values = {
            key: getattr(self, name) if overrides.get(key) is None else overrides[key] for key, name in names.items()
        }
        return _retention_options(**values)

    # ---------------------------------------------------------------------------------------------- the configs it drives
    def evaluation_config(self) -> EvaluationConfig:
        """The evaluation's config (a copy of `evaluation`)."""
        return copy.deepcopy(self.evaluation)

    def peft_config(self):
        if self.method == "lora":
            return LoraConfig(
                r=self.rank, lora_alpha=self.alpha or self.rank, target_modules="all-linear", task_type="CAUSAL_LM"
            )
        if self.method == "geometry_projected":
            return GeometryProjectedConfig(
                rank=self.rank,
                alpha=self.alpha,
                tolerance=self.tolerance,
                norm_cap=self.norm_cap,
                calibration_weighting=self.calibration_weighting,
            )
        preset = SelectiveMLPConfig if self.method == "selective_mlp" else SAProjConfig
        return preset(rank=self.rank, alpha=self.alpha)

    def training_args(self, output_dir: Path, adapter_name: str, fisher_dir: Optional[Path]) -> ContinualDPOConfig:
        """The month's `ContinualDPOConfig`: `training`, and what the campaign sets itself (`CAMPAIGN_TRAINING_KEYS`)."""
        training = copy.deepcopy(self.training)
        # Under transformers 5's name: the old one (TRL's, our flag's) makes TrainingArguments warn that it is deprecated.
        training["activation_checkpointing"] = training.pop("gradient_checkpointing", None)
        return ContinualDPOConfig(
            **{"per_device_eval_batch_size": self.evaluation.batch_size, **training},
            output_dir=str(output_dir),
            adapter_name=adapter_name,
            seed=self.seed,
            fisher_dir=str(fisher_dir) if fisher_dir is not None else None,
            health_check=self.health_check,
            save_strategy="steps",
            logging_steps=1,
            report_to=[],
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
        )


def _flag_field(default: Any, metadata: Mapping[str, Any]) -> dataclasses.Field:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda value=default: copy.deepcopy(value), metadata=dict(metadata))
    return field(default=default, metadata=dict(metadata))


# ------------------------------------------------------------------------------------------------- retention dial
def _finite(value: Any, what: str, low: float = 0.0, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{what}` must be a number, got {value!r}.") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"`{what}` must be a finite number in [{low}, {high}], got {value!r}.")
    return number


def _retention_options(
    scale: Any, keep_learning: Any, budget: Any, scales: Any, layer_scales: Any, validation_fraction: Any
) -> Optional[dict[str, Any]]:
    """See [`CampaignConfig.retention_options`]."""
    text = str(scale).strip().lower()
    # only present when set: the options stored by a month registered before per-block factors compare equal
    per_block = {}
    if (parsed := parse_layer_scales(layer_scales)) is not None:
        per_block = {"layer_scales": parsed}
    if text != "auto":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"`retention_scale` must be 'auto' or a number >= 0, got {scale!r}.") from None
        value = _finite(value, "retention_scale")
        return None if value == 1.0 and not per_block else {"scale": value, **per_block}
    if isinstance(scales, (int, float, str)):
        scales = [scales]
    grid = sorted({_finite(s, "retention_scales") for s in scales or []} | {1.0})
    fraction = float(validation_fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction!r}.")
    return {
        "scale": "auto",
        "keep_learning": _finite(keep_learning, "retention_keep_learning", 0.0, 1.0),
        "budget": None if budget is None else _finite(budget, "retention_budget"),
        "scales": grid,
        "validation_fraction": fraction,
        **per_block,
    }
