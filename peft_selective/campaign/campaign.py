"""A monthly continual-DPO campaign kept in one directory, the single source of truth.

```
campaign/
  campaign.json            format version, the fixed config, the base model's fingerprint, the knowledge pool
                           (candidate items stored at init, and those excluded so far: they overlap a month's prompts
                           or the KL anchors), and every month (status, data summary, checks or fitted style
                           signature, adapter checksum, training metrics)
  evaluations.json         evaluation results: "month-0" (the base) and one entry per month, with per-item scores
                           and {"mean", "ci95"} summaries (`peft_selective.evaluation.suites.evaluate_model`)
  data/<month>/            train.jsonl, test.jsonl (the month's pairs as used), reference_logps.json (base model's
                           log-probs of the test pairs: the reference of the implicit-reward figure),
                           before_behaviour.json (behavioural scores of the model before the month on its held-out
                           prompts: the paired baseline of what it learned), calibration.jsonl (geometry_projected:
                           the month's own calibration text, from --calibration_data)
  adapters/<month>/        the month's PEFT adapter (safetensors); geometry_report.json (geometry_projected: the
                           per-layer bounds of its calibration)
  buffer/                  the rehearsal buffer (peft_selective.continual.rehearsal)
  fisher/                  the summed Fisher, with EWC (peft_selective.continual.ewc)
  cards/<month>/           the model card (README.md) and its plot (retention.png)
  runs/<month>/            Trainer checkpoints while a month trains (removed when it is done)
```

Every file is written atomically (temp file + rename) and `campaign.json` last: a run killed at any point leaves the
previous consistent state, and `run_month` with the same month continues from the last checkpoint. Month t is
trained by [`ContinualDPOTrainer`] on top of the adapters of months 1..t−1, loaded from `adapters/` and checked
against their recorded SHA-256.

A month is only recorded when the model is healthy (`peft_selective.continual.health`, options `health_check`, `max_perplexity_ratio`,
`max_kl_to_base`): a non-finite loss or vanished gradients in training, or non-finite metrics, an exploded
reference-text perplexity or KL to the base in its evaluation, refuse it with `ModelHealthError`. The month's
adapter, rehearsal rows and Fisher are written only after its evaluation passed, and a refused month's data,
checkpoints and state entries are removed: the directory is left as before the month.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .. import GeometryProjectedConfig, SAProjConfig, SelectiveMLPConfig
from ..continual.config import ContinualDPOConfig
from ..continual.ewc import FISHER_METADATA
from ..continual.health import ModelHealthError, check_evaluation
from ..continual.preference_data import validate_preference_dataset
from ..continual.rehearsal import RehearsalBuffer
from ..continual.trainer import ContinualDPOTrainer
from ..evaluation.preference import retention_cells
from ..evaluation.suites import (
    EvaluationConfig,
    bleed_table,
    evaluate_model,
    fit_style_signature,
    general_table,
    implicit_reward_matrix,
    knowledge_table,
    learning_table,
    month_behaviour,
    ranking_table,
    reference_logps_for,
    retention_intervals,
    retention_matrix,
    retention_numbers,
)
from ..quantization import keep_4bit_layers_trainable
from ..utils.io import atomic_write, atomic_write_json, is_json_serializable


logger = logging.getLogger(__name__)

CAMPAIGN_FILE = "campaign.json"
EVALUATIONS_FILE = "evaluations.json"
FORMAT_VERSION = 1
BASELINE = "month-0"
EMBEDDED = "embedded"
METHODS = ("selective_mlp", "saproj", "lora", "geometry_projected")
#: TRL's `DPOConfig.loss_type` values (`trl.DPOTrainer` refuses others, but only once training starts).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
REHEARSAL_REFERENCES = ("own_month", "previous_month")
#: Characters of general reference text (`peft_selective.evaluation.preference.reference_text`) per calibration text of geometry_projected.
_CALIBRATION_CHUNK = 1000
_MONTH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Folders with one subfolder per month (`runs` first: see `Campaign._undo_month`).
_MONTH_FOLDERS = ("runs", "data", "adapters", "cards")


class CampaignError(RuntimeError):
    """The campaign directory is missing, corrupted, or asked to do something out of order."""


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

    Attributes:
        base_model (`str`): model id or local path, or `"embedded"` for the bundled SmolLM2-135M-Instruct.
        quantization (`str`, *optional*): `"4bit"` (bitsandbytes NF4) or `"8bit"`; `None` loads in full precision.
        method (`str`): `"selective_mlp"` (Gate&Up), `"saproj"` (self-attention projections), `"lora"` (PEFT LoRA
            on all linear layers) or `"geometry_projected"` (`peft_selective.GeometryProjectedConfig`: the selective
            update projected away from a protected subspace of each layer's inputs, calibrated before each month on
            general reference text, the earlier months' training chats and the month's `calibration_data`, see
            [`Campaign.run_month`]).
        rank (`int`): adapter rank; `0` trains the selective methods at full rank (the paper's recipe).
        alpha (`float`, *optional*): scaling numerator (`alpha / rank`); default: the rank (scale 1).
        seed (`int`): seed of training, data splits and sampling.
        learning_rate, max_steps, per_device_train_batch_size, gradient_accumulation_steps, beta, max_length,
        gradient_checkpointing: the DPO training of each month (`ContinualDPOConfig`).
        save_steps (`int`): checkpoint interval; an interrupted month resumes from the last checkpoint.
        rehearsal_ratio, rehearsal_samples_per_month, rehearsal_nll_coef, kl_coef, kl_every, kl_anchor_max_new_tokens,
        kl_anchors, ewc_coef: the retention terms (see `ContinualDPOConfig`); EWC stores a Fisher in `fisher/` when > 0.
        kl_direction, kl_anchor_kinds, kl_max_shape_anchors, kl_anchor_refresh_steps (`ContinualDPOConfig`'s, same
            defaults): the KL's direction (`"forward"` or `"reverse"`), where its anchor prompts come from
            (`"general"`, `"same_shape"`: variants of the month's prompts about other attributes, `"earlier_months"`),
            at most how many same-shape anchors, and every how many steps the anchors' continuations are regenerated
            from the policy (0: never).
        boundary_pairs, boundary_max_new_tokens (`ContinualDPOConfig`'s, same defaults): extra rows per month with
            an off-scope prompt whose month t−1 answer (of at most that many tokens) is preferred over a month answer.
        rehearsal_reference (`str`): the DPO reference of rehearsed pairs, `"own_month"` (default: the stored
            log-probs of the month that taught them) or `"previous_month"` (the month t−1 model), see
            `ContinualDPOConfig`.
        loss_type (`list[str]`), loss_weights (`list[float]`, *optional*), label_smoothing (`float`): TRL's
            `DPOConfig` options of the same names: the DPO loss(es) (default `["sigmoid"]`; one or more of
            `DPO_LOSS_TYPES`), their weights (default 1.0 each) and the label smoothing (`"exo_pair"` needs it > 0).
        sft_weight (`float`): weight of TRL's `"sft"` term (NLL of the chosen responses) appended to `loss_type` (see
            `ContinualDPOConfig.sft_weight`); 0 (default): off.
        tolerance, norm_cap (`float`): with `"geometry_projected"`, `GeometryProjectedConfig`'s allowed relative
            change of each layer's output on the protected data and cap on each layer's update norm.
        calibration_reference_chars (`int`): with `"geometry_projected"`, characters of general reference text
            (`peft_selective.evaluation.preference.reference_text`, in chunks of 1000) in every month's calibration data.
        eval_suites (`list[str]`): evaluation suites (`peft_selective.evaluation.suites.SUITES`).
        knowledge_questions (`int`): size of the knowledge pool stored at `init` (default 250 candidates from
            `peft_selective.demo.months.knowledge_items`); every pool item is scored at every evaluation and the report keeps those
            that overlap no month's prompts nor the KL anchors (chosen after the data is known).
        knowledge_data (`str`, *optional*): a JSONL file of the user's own knowledge items (`question`, `answer`,
            `distractors`, optional `aliases` and `entity`) used as the pool instead; a month whose prompts overlap
            one of them is refused at `run-month` before anything is registered.
        knowledge_exact_items (`int`): surviving pool items also answered by greedy generation (exact match).
        checks (`dict`, *optional*): month name -> its checks (a list of check specs, or `{"checks": [...],
            "bleed_checks": [...]}`, see `peft_selective.evaluation.Check`), for YAML configs; `run-month --checks`
            takes precedence.
        perplexity_max_tokens, refusal_prompts, drift_prompts (also the generic prompts of the bleed),
        eval_batch_size, eval_max_new_tokens (greedy answers of the behavioural suite, refusal and drift probes):
        their sizes.
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
    rank: int = field(default=16, metadata={"help": "Adapter rank; 0 trains the selective methods at full rank."})
    alpha: Optional[float] = field(
        default=None, metadata={"help": "Scaling numerator (alpha / rank); default: the rank."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of training, data splits and sampling."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of every month."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps per month."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Preference pairs per device and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    max_length: int = field(default=256, metadata={"help": "Prompt + response tokens kept."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    save_steps: int = field(
        default=5, metadata={"help": "Checkpoint interval (an interrupted month resumes from the last one)."}
    )
    rehearsal_ratio: float = field(
        default=0.2, metadata={"help": "Share of each month's training rows drawn from earlier months."}
    )
    rehearsal_samples_per_month: int = field(default=200, metadata={"help": "Rows of each month kept for rehearsal."})
    rehearsal_nll_coef: float = field(
        default=0.0, metadata={"help": "Weight of the NLL on rehearsed chosen responses."}
    )
    kl_coef: float = field(default=0.1, metadata={"help": "Weight of the KL to last month's model on anchor prompts."})
    kl_every: int = field(default=1, metadata={"help": "Compute the KL term every k steps."})
    kl_anchor_max_new_tokens: int = field(
        default=16, metadata={"help": "Length of last month's continuation of each anchor."}
    )
    kl_anchors: int = field(
        default=32,
        metadata={"help": "General anchor prompts (and at most as many earlier months' prompts) for the KL."},
    )
    kl_direction: str = field(
        default="forward", metadata={"help": "'forward' KL(month t-1 || policy) or 'reverse' KL(policy || month t-1)."}
    )
    kl_anchor_kinds: list[str] = field(
        default_factory=lambda: ["general", "earlier_months"],
        metadata={"help": "Anchor prompt kinds of the KL: general same_shape earlier_months (or comma-separated)."},
    )
    kl_max_shape_anchors: int = field(
        default=64, metadata={"help": "Same-shape anchor prompts (variants of the month's prompts) for the KL."}
    )
    kl_anchor_refresh_steps: int = field(
        default=0,
        metadata={"help": "Regenerate the anchors' continuations from the policy every k steps (0: never)."},
    )
    boundary_pairs: int = field(
        default=0,
        metadata={"help": "Extra rows per month: off-scope prompt, last month's answer preferred over the month's."},
    )
    boundary_max_new_tokens: int = field(
        default=48, metadata={"help": "Length of last month's answers used as the boundary rows' chosen answers."}
    )
    ewc_coef: float = field(
        default=0.0, metadata={"help": "Weight of the EWC penalty (> 0 stores a Fisher each month)."}
    )
    rehearsal_reference: str = field(
        default="own_month",
        metadata={
            "help": "DPO reference of rehearsed pairs: 'own_month' (stored log-probs of the month that taught them) "
            "or 'previous_month' (the month t-1 model)."
        },
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "TRL's DPO loss type(s): " + " ".join(DPO_LOSS_TYPES) + "."},
    )
    loss_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "TRL's weights of the loss types (default: 1.0 each)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "TRL's label smoothing (in [0, 0.5]; 'exo_pair' needs > 0)."}
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "Weight of TRL's 'sft' term (NLL of the chosen responses) added to the loss."}
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
    eval_suites: list[str] = field(
        default_factory=lambda: ["preference", "behaviour", "knowledge", "perplexity", "kl", "refusal", "drift"],
        metadata={"help": "Evaluation suites: preference behaviour knowledge perplexity kl refusal drift."},
    )
    knowledge_questions: int = field(
        default=250,
        metadata={"help": "Candidate knowledge items stored at init (scored by multiple choice at every evaluation)."},
    )
    knowledge_data: Optional[str] = field(
        default=None,
        metadata={"help": "JSONL of your own knowledge items {question, answer, distractors, aliases?, entity?}."},
    )
    knowledge_exact_items: int = field(
        default=40, metadata={"help": "Surviving knowledge items answered by greedy generation (exact match)."}
    )
    checks: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Month name -> its checks (list of specs or {checks, bleed_checks}), JSON or YAML."},
    )
    perplexity_max_tokens: int = field(default=4096, metadata={"help": "Reference-text tokens scored for perplexity."})
    refusal_prompts: int = field(default=20, metadata={"help": "Harmful (and benign) prompts for the refusal rates."})
    drift_prompts: int = field(
        default=12, metadata={"help": "Generic prompts for the drift probe, the KL to the base and the bleed."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the evaluation."})
    eval_max_new_tokens: int = field(
        default=24,
        metadata={
            "help": "Generation length of the behavioural suite, knowledge (at most 16), refusal and drift probes."
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
    validation_fraction: float = field(
        default=0.2, metadata={"help": "'auto': share of the month's training rows held out to choose the scale."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {list(METHODS)}.")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"`quantization` must be '4bit', '8bit' or None, got {self.quantization!r}.")
        if self.rank < 0 or (self.rank == 0 and self.method == "lora"):
            raise ValueError(f"`rank` must be > 0 (or 0 = full rank for the selective methods), got {self.rank}.")
        self._check_loss_options()
        self._check_trainer_options()
        self.evaluation_config()  # checks the suites
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
        self.retention_scale = str(self.retention_scale).strip()
        self.retention_options()  # checks the retention options
        self.retention_scales = [float(s) for s in self.retention_scales]

    def _check_loss_options(self) -> None:
        """Validate (and normalise) the loss and method options, so that a bad value fails at `init`, before anything
        is written, rather than when a month starts training."""
        if self.rehearsal_reference not in REHEARSAL_REFERENCES:
            raise ValueError(
                f"`rehearsal_reference` must be one of {list(REHEARSAL_REFERENCES)}, got {self.rehearsal_reference!r}."
            )
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type or [])
        unknown = [t for t in loss_types if t not in DPO_LOSS_TYPES]
        if not loss_types or unknown:
            raise ValueError(
                f"`loss_type` must be one or more of {list(DPO_LOSS_TYPES)} (TRL's DPOConfig.loss_type), got "
                f"{self.loss_type!r}."
            )
        self.loss_type = loss_types
        if self.loss_weights is not None:
            weights = [self.loss_weights] if isinstance(self.loss_weights, (int, float)) else list(self.loss_weights)
            self.loss_weights = [_finite(w, "loss_weights") for w in weights]
            if len(self.loss_weights) != len(loss_types):
                raise ValueError(
                    f"`loss_weights` needs one weight per loss type: {len(self.loss_weights)} weights for "
                    f"`loss_type={loss_types}`."
                )
        self.label_smoothing = _finite(self.label_smoothing, "label_smoothing", 0.0, 0.5)
        if "exo_pair" in loss_types and self.label_smoothing == 0:
            raise ValueError("`loss_type` 'exo_pair' needs `label_smoothing` > 0 (the EXO paper recommends 1e-3).")
        self.sft_weight = _finite(self.sft_weight, "sft_weight")
        if self.sft_weight > 0 and "sft" in loss_types:
            raise ValueError(
                f"`sft_weight={self.sft_weight}` appends TRL's 'sft' term itself, but `loss_type={loss_types}` already "
                "has it: drop 'sft' from `loss_type` (and its `loss_weights` entry), or set `sft_weight` to 0."
            )
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"`tolerance` must be a finite number > 0, got {self.tolerance!r}.")
        if not (math.isfinite(self.norm_cap) and self.norm_cap > 0):
            raise ValueError(f"`norm_cap` must be a finite number > 0, got {self.norm_cap!r}.")
        if self.calibration_reference_chars < 0:
            raise ValueError(f"`calibration_reference_chars` must be >= 0, got {self.calibration_reference_chars}.")

    def _check_trainer_options(self) -> None:
        """Validate the options passed on to the trainer with `ContinualDPOConfig`'s own checks (the same errors, at
        `init` rather than when a month starts training), and keep their normalised values (`kl_anchor_kinds`: a
        list, from a comma-separated string or items too)."""
        kinds = [self.kl_anchor_kinds] if isinstance(self.kl_anchor_kinds, str) else list(self.kl_anchor_kinds or [])
        self.kl_anchor_kinds = [kind.strip() for item in kinds for kind in str(item).split(",") if kind.strip()]
        with warnings.catch_warnings():  # TrainingArguments' deprecation notices belong to training, not to `init`
            warnings.simplefilter("ignore")
            scratch = Path(tempfile.gettempdir()) / "continual-dpo-check"
            # EWC needs a Fisher directory to be configured at all; the check only builds the config, reads nothing
            args = self.training_args(scratch, "check", scratch / "fisher" if self.ewc_coef > 0 else None)
        self.kl_anchor_kinds = list(args.kl_anchor_kinds)

    def retention_options(self, **overrides: Any) -> Optional[dict[str, Any]]:
        """The retention dial's options, the campaign's unless given in `overrides` (the keys of its fields without
        `retention_`: `scale`, `keep_learning`, `budget`, `scales`, `validation_fraction`): `None` when off (scale
        1), `{"scale": s}` for a fixed scale, and for `"auto"` `{"scale": "auto", "keep_learning", "budget",
        "scales" (sorted, 1 included), "validation_fraction"}`. Raises `ValueError` on a bad value."""
        names = {
            "scale": "retention_scale",
            "keep_learning": "retention_keep_learning",
            "budget": "retention_budget",
            "scales": "retention_scales",
            "validation_fraction": "validation_fraction",
        }
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"Unknown retention options {unknown}; known: {sorted(names)}.")
        values = {
            key: getattr(self, name) if overrides.get(key) is None else overrides[key] for key, name in names.items()
        }
        return _retention_options(**values)

    def evaluation_config(self) -> EvaluationConfig:
        return EvaluationConfig(
            suites=list(self.eval_suites),
            behaviour_max_new_tokens=self.eval_max_new_tokens,
            knowledge_exact_items=self.knowledge_exact_items,
            knowledge_max_new_tokens=min(16, self.eval_max_new_tokens),
            seed=self.seed,
            refusal_max_new_tokens=self.eval_max_new_tokens,
            drift_max_new_tokens=self.eval_max_new_tokens,
            perplexity_max_tokens=self.perplexity_max_tokens,
            refusal_prompts=self.refusal_prompts,
            drift_prompts=self.drift_prompts,
            max_length=self.max_length,
            batch_size=self.eval_batch_size,
        )

    def peft_config(self):
        rank = self.rank or None
        if self.method == "lora":
            return LoraConfig(
                r=self.rank, lora_alpha=self.alpha or self.rank, target_modules="all-linear", task_type="CAUSAL_LM"
            )
        if self.method == "geometry_projected":
            return GeometryProjectedConfig(
                rank=rank, alpha=self.alpha, tolerance=self.tolerance, norm_cap=self.norm_cap
            )
        preset = SelectiveMLPConfig if self.method == "selective_mlp" else SAProjConfig
        return preset(rank=rank, alpha=self.alpha)

    def training_args(self, output_dir: Path, adapter_name: str, fisher_dir: Optional[Path]) -> ContinualDPOConfig:
        return ContinualDPOConfig(
            output_dir=str(output_dir),
            adapter_name=adapter_name,
            seed=self.seed,
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            beta=self.beta,
            max_length=self.max_length,
            gradient_checkpointing=self.gradient_checkpointing,
            save_strategy="steps",
            save_steps=self.save_steps,
            logging_steps=1,
            rehearsal_ratio=self.rehearsal_ratio,
            rehearsal_samples_per_month=self.rehearsal_samples_per_month,
            rehearsal_nll_coef=self.rehearsal_nll_coef,
            kl_coef=self.kl_coef,
            kl_every=self.kl_every,
            kl_anchor_max_new_tokens=self.kl_anchor_max_new_tokens,
            kl_max_general_anchors=self.kl_anchors,
            kl_max_rehearsal_anchors=self.kl_anchors,
            kl_direction=self.kl_direction,
            kl_anchor_kinds=list(self.kl_anchor_kinds),
            kl_max_shape_anchors=self.kl_max_shape_anchors,
            kl_anchor_refresh_steps=self.kl_anchor_refresh_steps,
            boundary_pairs=self.boundary_pairs,
            boundary_max_new_tokens=self.boundary_max_new_tokens,
            ewc_coef=self.ewc_coef,
            rehearsal_reference=self.rehearsal_reference,
            loss_type=list(self.loss_type),
            loss_weights=list(self.loss_weights) if self.loss_weights is not None else None,
            label_smoothing=self.label_smoothing,
            sft_weight=self.sft_weight,
            fisher_dir=str(fisher_dir) if fisher_dir is not None else None,
            health_check=self.health_check,
            report_to=[],
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
        )


# ------------------------------------------------------------------------------------------------- retention dial
#: Fewest training rows held out to choose the retention scale ("auto").
MIN_VALIDATION_ROWS = 4


def _finite(value: Any, what: str, low: float = 0.0, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{what}` must be a number, got {value!r}.") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"`{what}` must be a finite number in [{low}, {high}], got {value!r}.")
    return number


def _retention_options(
    scale: Any, keep_learning: Any, budget: Any, scales: Any, validation_fraction: Any
) -> Optional[dict[str, Any]]:
    """See [`CampaignConfig.retention_options`]."""
    text = str(scale).strip().lower()
    if text != "auto":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"`retention_scale` must be 'auto' or a number >= 0, got {scale!r}.") from None
        value = _finite(value, "retention_scale")
        return None if value == 1.0 else {"scale": value}
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
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_file_mismatch(model: PeftModel, adapter_name: str, weights: Path) -> list[str]:
    """How the tensors of a loaded adapter's file differ from those of the adapter PEFT built from its config
    (missing, unexpected, other shape); empty when they agree. Reads the file's header only."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from ..tuners.selective.model import rename_legacy_keys

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    with safe_open(str(weights), framework="pt") as handle:
        saved = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    saved = rename_legacy_keys(saved)  # peft-selective 0.1.0 names, renamed the same way on load
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shared = sorted(expected.keys() & saved.keys())
    shapes = [f"{k} {list(saved[k])} (expected {list(expected[k])})" for k in shared if saved[k] != expected[k]]
    problems = []
    for what, keys in (("missing tensors", missing), ("unexpected tensors", unexpected), ("other shapes", shapes)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}")
    return problems


def _chunks(text: str, size: int = _CALIBRATION_CHUNK) -> list[str]:
    pieces = (text[i : i + size].strip() for i in range(0, len(text), size))
    return [piece for piece in pieces if piece]


def _chat_text(tokenizer, row: dict[str, Any]) -> str:
    """A preference row's prompt + chosen answer as the model reads it (the chat template for conversations)."""
    prompt, chosen = row.get("prompt"), row["chosen"]
    if isinstance(chosen, list):  # conversational
        messages = list(prompt or []) + list(chosen)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(str(message.get("content", "")) for message in messages)
    return f"{prompt or ''}{chosen}"


def read_calibration_texts(path: Union[str, Path]) -> list[str]:
    """The user's calibration text for geometry_projected: a `.txt` file (paragraphs separated by blank lines) or a
    `.jsonl` file with a `"text"` string per line; texts longer than 1000 characters are cut into chunks (calibration
    reads at most `max_length` tokens of each). A clear error names a missing, unreadable, malformed or empty file."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"The calibration data {path} must be a .txt file or a .jsonl file with a 'text' field.")
    if not path.is_file():
        raise FileNotFoundError(f"The calibration data file {path} does not exist.")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the calibration data {path} as UTF-8 text: {error}") from error
    if path.suffix.lower() == ".txt":
        texts = [paragraph.strip() for paragraph in re.split(r"\n\s*\n", content)]
    else:
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error}).") from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {number}: expected an object with a 'text' string: {line[:200]}")
            texts.append(row["text"].strip())
    texts = [chunk for text in texts for chunk in _chunks(text)]
    if not texts:
        raise ValueError(f"The calibration data file {path} holds no text.")
    return texts


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CampaignError(
            f"{path} is corrupted ({error}); it is the campaign's {what}. Restore it from a backup, or start a new "
            "campaign with `continual-dpo init`."
        ) from error


def _write_jsonl(path: Path, dataset: Dataset) -> None:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset)
    atomic_write(path, lines.encode("utf-8"))


def load_preference_data(source: Union[str, Path], split: str = "train") -> Dataset:
    """A preference dataset from a local `.jsonl` / `.json` / `.parquet` / `.csv` file or a Hub dataset name."""
    path = Path(source)
    formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix in formats:
        if not path.is_file():
            raise FileNotFoundError(f"Preference data file {path} does not exist.")
        try:
            return load_dataset(formats[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds on a malformed file
            raise ValueError(f"Could not read {path} as {formats[path.suffix]}: {error}") from error
    if path.exists():
        raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .parquet or .csv.")
    return load_dataset(str(source), split=split)


def _base_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config.get_text_config()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {key: getattr(config, key, None) for key in keys}


# ------------------------------------------------------------------------------------------------- knowledge pool
_ITEM_KEYS = ("question", "answer", "distractors", "aliases", "entity")


def _item_dict(item: Any) -> dict[str, Any]:
    return {
        "question": item.question,
        "answer": item.answer,
        "distractors": list(item.distractors),
        "aliases": list(item.aliases),
        "entity": item.entity,
    }


def read_knowledge_items(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The user's knowledge items from a JSONL file: one `{"question", "answer", "distractors": [...], "aliases"?:
    [...], "entity"?}` object per line; a clear error names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The knowledge data file {path} does not exist.")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error}).") from error
        problem = None
        if not isinstance(row, dict):
            problem = "expected an object"
        elif unknown := sorted(set(row) - set(_ITEM_KEYS)):
            problem = f"unknown keys {unknown} (allowed: {list(_ITEM_KEYS)})"
        elif not all(isinstance(row.get(key), str) and row[key].strip() for key in ("question", "answer")):
            problem = "`question` and `answer` must be non-empty strings"
        elif not (isinstance(row.get("distractors"), list) and row["distractors"]):
            problem = "`distractors` must be a non-empty list of wrong answers (multiple choice needs them)"
        elif not all(isinstance(x, str) and x.strip() for x in row["distractors"] + list(row.get("aliases") or [])):
            problem = "`distractors` and `aliases` must hold non-empty strings"
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}: {line[:200]}")
        items.append(
            {
                "question": row["question"],
                "answer": row["answer"],
                "distractors": list(row["distractors"]),
                "aliases": list(row.get("aliases") or []),
                "entity": row.get("entity"),
            }
        )
    if not items:
        raise ValueError(f"The knowledge data file {path} holds no item.")
    return items


def _overlapping(items: list[dict[str, Any]], collections: list[Any]) -> dict[int, str]:
    """Index -> the `check_no_overlap` message, for the items that overlap one of `collections` (checked in chunks,
    then one by one inside a chunk that overlaps)."""
    from ..evaluation import check_no_overlap

    found: dict[int, str] = {}
    chunk = 32
    for start in range(0, len(items), chunk):
        try:
            check_no_overlap(items[start : start + chunk], *collections)
            continue
        except ValueError:
            pass
        for index in range(start, min(start + chunk, len(items))):
            try:
                check_no_overlap([items[index]], *collections)
            except ValueError as error:
                found[index] = str(error)
    return found


def _knowledge_pool(config: CampaignConfig) -> dict[str, Any]:
    """The candidate knowledge items stored at `init` (`campaign.json` "knowledge_pool"): the user's
    (`knowledge_data`) or the first `knowledge_questions` of `peft_selective.demo.months.knowledge_items`; the items that overlap
    the KL anchor prompts are refused (the user's) or excluded (the built-in ones) right away."""
    from ..continual.anchors import general_anchor_prompts
    from ..demo.months import knowledge_items

    if config.knowledge_data:
        items, source = read_knowledge_items(config.knowledge_data), str(config.knowledge_data)
    else:
        items, source = [_item_dict(item) for item in knowledge_items(n=None, seed=config.seed)], "builtin"
        items = items[: config.knowledge_questions]
    anchors = _overlapping(items, [general_anchor_prompts()])
    if anchors and source != "builtin":
        first = next(iter(anchors.values()))
        raise CampaignError(f"Your knowledge items overlap the KL anchor prompts of the training: {first}")
    return {"source": source, "items": items, "excluded": {str(index): "kl-anchors" for index in sorted(anchors)}}


# ------------------------------------------------------------------------------------------------- the campaign
class Campaign:
    """A campaign directory (see the module docstring). Open one with `Campaign(dir)`, create one with
    [`Campaign.init`]."""

    def __init__(self, directory: Union[str, Path]) -> None:
        self.directory = Path(directory)
        path = self.directory / CAMPAIGN_FILE
        if not path.is_file():
            raise CampaignError(f"No campaign in {self.directory} ({CAMPAIGN_FILE} missing): create one with `init`.")
        state = _read_json(path, "state")
        if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
            raise CampaignError(f"{path} is not a campaign state file (no format_version / config).")
        if state["format_version"] > FORMAT_VERSION:
            raise CampaignError(
                f"{path} has format {state['format_version']}; this peft-selective reads up to {FORMAT_VERSION}: "
                "upgrade the library."
            )
        known = {f.name for f in dataclasses.fields(CampaignConfig)}
        unknown = sorted(set(state["config"]) - known)
        if unknown:
            raise CampaignError(f"{path} has unknown config keys {unknown}: was it written by another version?")
        self.state = state
        self.config = CampaignConfig(**state["config"])
        evaluations = self.directory / EVALUATIONS_FILE
        self.evaluations: dict[str, Any] = (
            _read_json(evaluations, "evaluation history") if evaluations.exists() else {}
        )

    @classmethod
    def init(cls, directory: Union[str, Path], config: CampaignConfig, overwrite: bool = False) -> Campaign:
        directory = Path(directory)
        if (directory / CAMPAIGN_FILE).exists() and not overwrite:
            raise CampaignError(f"{directory} already holds a campaign; pick another directory.")
        pool = _knowledge_pool(config)  # before anything is written: a bad --knowledge_data file leaves no trace
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format_version": FORMAT_VERSION,
            "created_at": _now(),
            "config": asdict(config),
            "base_fingerprint": None,
            "knowledge_pool": pool,
            "months": [],
        }
        atomic_write_json(directory / CAMPAIGN_FILE, state)
        return cls(directory)

    # ---------------------------------------------------------------------------------------------- state
    @property
    def months(self) -> list[dict[str, Any]]:
        return self.state["months"]

    @property
    def done_months(self) -> list[str]:
        return [month["name"] for month in self.months if month["status"] == "done"]

    def month(self, name: str) -> Optional[dict[str, Any]]:
        return next((month for month in self.months if month["name"] == name), None)

    # Under `accelerate launch` every process runs the campaign; only the main one writes, and evaluates.
    @property
    def _is_main(self) -> bool:
        return PartialState().is_main_process

    def _barrier(self) -> None:
        PartialState().wait_for_everyone()

    def _save_state(self) -> None:
        if self._is_main:
            atomic_write_json(self.directory / CAMPAIGN_FILE, self.state)

    def _save_evaluations(self) -> None:
        if self._is_main:
            atomic_write_json(self.directory / EVALUATIONS_FILE, self.evaluations)

    def _path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts)

    # ---------------------------------------------------------------------------------------------- models
    def load_base(self):
        """The base model (quantized as configured) and its tokenizer; its fingerprint must match the campaign's."""
        config = self.config
        if config.base_model == EMBEDDED:
            from ..demo.embedded import load_embedded_model

            model, tokenizer = load_embedded_model(quantization=config.quantization)
        else:
            kwargs: dict[str, Any] = {}
            if config.quantization == "4bit":
                compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
                )
            elif config.quantization == "8bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            if config.quantization and torch.cuda.is_available():  # a quantized base goes to this process's GPU
                kwargs["device_map"] = {"": PartialState().local_process_index}
            model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.base_model)
        fingerprint = _base_fingerprint(model)
        recorded = self.state.get("base_fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise CampaignError(
                f"The base model {config.base_model!r} does not match the one this campaign was trained on "
                f"(recorded {recorded}, loaded {fingerprint})."
            )
        # Before the month-0 (or any) evaluation: on AVX512-BF16 CPUs bitsandbytes would repack the 4-bit weights,
        # cutting the next month's gradient and changing the evaluation's kernels (see `peft_selective.quantization`).
        keep_4bit_layers_trainable(model)
        return model.eval(), tokenizer

    def load_model(self, upto: Optional[str] = None):
        """The model after month `upto` (default: the last done month): the base with the adapters of every month up
        to it, all active and frozen, each checked against its recorded SHA-256. Returns `(model, tokenizer)`."""
        done = self.done_months
        if upto is not None:
            if upto not in done:
                raise CampaignError(f"Month {upto!r} is not done (done: {done}).")
            done = done[: done.index(upto) + 1]
        model, tokenizer = self.load_base()
        for index, name in enumerate(done):
            folder = self._path("adapters", name)
            weights = folder / "adapter_model.safetensors"
            if not weights.is_file():
                raise CampaignError(f"The adapter of month {name!r} is missing ({weights}).")
            recorded = self.month(name).get("adapter_sha256")
            if recorded and _sha256(weights) != recorded:
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) changed since it was trained (SHA-256 mismatch): the "
                    "file is corrupted or was replaced. Restore it, or rerun the campaign from that month."
                )
            try:
                if index == 0:
                    model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(folder, adapter_name=name, is_trainable=False)
            except RuntimeError as error:  # torch's load_state_dict: "size mismatch for ..."
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) does not fit the model its adapter_config.json "
                    f"describes: restore the month's adapter folder, or rerun the campaign from that month. {error}"
                ) from error
            # PEFT only warns about a missing tensor (the update would silently start from its init) and ignores an
            # unexpected one: the file must hold exactly the adapter's tensors, at the adapter's shapes.
            problems = _adapter_file_mismatch(model, name, weights)
            if problems:
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) does not match the adapter its adapter_config.json "
                    f"describes: {'; '.join(problems)}. The file is incomplete or belongs to another run: restore the "
                    "month's adapter folder, or rerun the campaign from that month."
                )
        if done:
            model.base_model.set_adapter(done)
            model.base_model.set_requires_grad(done, requires_grad=False)
        return model, tokenizer

    # ---------------------------------------------------------------------------------------------- data
    def _month_data(
        self,
        name: str,
        data: Optional[Union[str, Path, Dataset]],
        test_data,
        test_fraction: float,
        validation_fraction: Optional[float] = None,
    ) -> dict[str, Dataset]:
        """The month's `train` and `test` splits (and `validation`, held out of the training rows with
        `validation_fraction`, for the retention dial): split and written for a new month, read back when resuming."""
        folder = self._path("data", name)
        entry = self.month(name)
        if entry is not None:  # resuming: the month's data is the stored one
            names = ("train", "test", "validation") if (folder / "validation.jsonl").is_file() else ("train", "test")
            splits = {split: Dataset.from_json(str(folder / f"{split}.jsonl")) for split in names}
            if data is not None:
                new = self._split(data, test_data, test_fraction)
                if "validation" in splits:  # the same rows held out again (seeded)
                    new.update(self._hold_out(name, new["train"], rows=len(splits["validation"])))
                if _digest(new["train"]) != entry["data"]["train_sha256"]:
                    raise CampaignError(
                        f"Month {name!r} was started with other training data ({entry['data']['source']}); rerun it "
                        "without --data (or with the same data) to resume."
                    )
            return splits
        if data is None:
            raise CampaignError(f"Month {name!r} is new: pass its preference data (--data).")
        splits = self._split(data, test_data, test_fraction)
        if validation_fraction is not None:
            splits.update(self._hold_out(name, splits["train"], fraction=validation_fraction))
        pool = self.knowledge_pool
        if pool["source"] != "builtin":  # the user's own items must not be about what the month trains on
            found = _overlapping(pool["items"], [list(splits["train"]), list(splits["test"])])
            if found:
                shown = "; ".join(found[i] for i in sorted(found)[:3])
                raise CampaignError(
                    f"Month {name!r} was not registered: {len(found)} of your knowledge items ({pool['source']}) "
                    f"overlap its training or test prompts, so the knowledge probe would measure memorised training "
                    f"data. Remove them from the month's data or start a campaign with other items. {shown}"
                )
        if self._is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for split, dataset in splits.items():
                _write_jsonl(folder / f"{split}.jsonl", dataset)
        self._barrier()
        return splits

    def _split(self, data, test_data, test_fraction: float) -> dict[str, Dataset]:
        train = data if isinstance(data, Dataset) else load_preference_data(data)
        validate_preference_dataset(train, "train")
        if test_data is not None:
            test = test_data if isinstance(test_data, Dataset) else load_preference_data(test_data)
        else:
            if not 0 < test_fraction < 1 or len(train) < 2:
                raise ValueError(
                    f"Cannot hold out a test split (test_fraction={test_fraction}, {len(train)} rows): pass test data."
                )
            parts = train.train_test_split(test_size=test_fraction, seed=self.config.seed)
            train, test = parts["train"], parts["test"]
        validate_preference_dataset(test, "test")
        return {"train": train, "test": test}

    def _hold_out(
        self, name: str, train: Dataset, fraction: Optional[float] = None, rows: Optional[int] = None
    ) -> dict[str, Dataset]:
        """Hold `rows` (or `fraction`, at least `MIN_VALIDATION_ROWS`) of the month's training rows out of training,
        seeded: the rows on which the retention dial is chosen. They come from the training split, so they are never
        test rows."""
        if rows is None:
            rows = max(MIN_VALIDATION_ROWS, round(fraction * len(train)))
        if len(train) - rows < 1:
            raise CampaignError(
                f"Month {name!r} was not registered: its {len(train)} training rows are too few to hold out {rows} for "
                "retention_scale='auto' (at least 4): pass more data, or a fixed retention_scale."
            )
        parts = train.train_test_split(test_size=rows, seed=self.config.seed)
        return {"train": parts["train"], "validation": parts["test"]}

    # ---------------------------------------------------------------------------------------------- knowledge & checks
    @property
    def knowledge_pool(self) -> dict[str, Any]:
        """`{"source", "items", "excluded": {index: month or "kl-anchors"}}`: the candidate knowledge items stored at
        `init` and those excluded so far (they overlap a month's prompts or the KL anchors)."""
        if "knowledge_pool" not in self.state:  # a campaign from before the pool: built now, the done months excluded
            pool = _knowledge_pool(self.config)
            for month in self.months:
                folder = self._path("data", month["name"])
                if (folder / "train.jsonl").is_file():
                    rows = [Dataset.from_json(str(folder / f"{split}.jsonl")) for split in ("train", "test")]
                    self._exclude(pool, month["name"], [list(rows[0]), list(rows[1])])
            self.state["knowledge_pool"] = pool
            self.state.pop("knowledge_questions", None)
            self._save_state()
        return self.state["knowledge_pool"]

    @staticmethod
    def _exclude(pool: dict[str, Any], name: str, collections: list[Any]) -> int:
        candidates = [i for i in range(len(pool["items"])) if str(i) not in pool["excluded"]]
        found = _overlapping([pool["items"][i] for i in candidates], collections)
        for k in found:
            pool["excluded"][str(candidates[k])] = name
        return len(found)

    def knowledge_survivors(self) -> list[int]:
        """Indices of the pool items that overlap no month's prompts nor the KL anchors: every knowledge column of the
        report is re-aggregated on them."""
        pool = self.knowledge_pool
        return [i for i in range(len(pool["items"])) if str(i) not in pool["excluded"]]

    def _exact_indices(self) -> list[int]:
        return self.knowledge_survivors()[: self.config.knowledge_exact_items]

    def month_spec(self, name: str) -> dict[str, Any]:
        """The month's behavioural spec for `peft_selective.evaluation.suites.month_tests`: its checks, bleed checks and fitted
        style signature (or why there is none)."""
        entry = self.month(name) or {}
        checks = entry.get("checks") or {}
        return {
            "checks": checks.get("checks") or [],
            "bleed_checks": checks.get("bleed_checks") or [],
            "style_signature": entry.get("style_signature"),
            "style_note": entry.get("style_note"),
        }

    def _before_behaviour(self, months: list[str]) -> dict[str, Any]:
        """Per month, the behavioural scores of the model before it on its held-out prompts (`before_behaviour.json`)."""
        found = {}
        for name in months:
            path = self._path("data", name, "before_behaviour.json")
            if path.is_file():
                found[name] = _read_json(path, "behaviour before the month")
        return found

    def _evaluate(self, model, tokenizer, months: list[str], show_progress: bool = False) -> dict[str, Any]:
        """`evaluate_model` with everything the campaign knows: the months' held-out pairs and specs, the base's
        log-probs and off-scope generations, the knowledge pool and its exact-match subset."""
        evaluation_config = self.config.evaluation_config()
        survivors = self.knowledge_survivors()
        if 0 < len(survivors) < evaluation_config.knowledge_min_items:
            logger.warning(
                "Only %d knowledge items survive the overlap checks (of %d): the knowledge intervals are wide.",
                len(survivors),
                len(self.knowledge_pool["items"]),
            )
        return evaluate_model(
            model,
            tokenizer,
            evaluation_config,
            test_sets=self.test_sets(months),
            reference_logps=self._reference_logps(months),
            knowledge_items=self.knowledge_pool["items"],
            show_progress=show_progress,
            month_specs={name: self.month_spec(name) for name in months},
            exact_indices=self._exact_indices(),
            base_offscope=self.evaluations.get(BASELINE, {}).get("offscope_generations"),
        )

    def test_sets(self, months: list[str]) -> dict[str, Dataset]:
        return {name: Dataset.from_json(str(self._path("data", name, "test.jsonl"))) for name in months}

    def _reference_logps(self, months: list[str]) -> dict[str, Any]:
        return {name: _read_json(self._path("data", name, "reference_logps.json"), "reference") for name in months}

    # ---------------------------------------------------------------------------------------------- a month
    def run_month(
        self,
        name: str,
        data: Optional[Union[str, Path, Dataset]] = None,
        test_data: Optional[Union[str, Path, Dataset]] = None,
        test_fraction: float = 0.2,
        callbacks: Optional[list[TrainerCallback]] = None,
        keep_checkpoints: bool = False,
        health_check: Optional[bool] = None,
        max_perplexity_ratio: Optional[float] = None,
        max_kl_to_base: Optional[float] = None,
        checks: Optional[Union[str, list, dict]] = None,
        retention_scale: Optional[Union[str, float]] = None,
        retention_keep_learning: Optional[float] = None,
        retention_budget: Optional[float] = None,
        retention_scales: Optional[list[float]] = None,
        validation_fraction: Optional[float] = None,
        calibration_data: Optional[Union[str, Path]] = None,
    ) -> dict[str, Any]:
        """Train month `name` on top of the done months, then evaluate it, write its card and mark it done.

        `checks` declares what the month teaches, for its behavioural learning and bleed: a list of check specs
        (`peft_selective.evaluation.Check.from_spec`: regex / JSON schema / "module:function"), or `{"checks": [...],
        "bleed_checks": [...]}`, or a path / JSON / YAML string of either; default: the campaign config's `checks`
        entry for the month. They are validated, and the user's own knowledge items checked against the month's
        prompts, before the month is registered. A month without checks is scored by agreement, and its bleed by a
        style signature fitted on its chosen vs rejected answers.

        A month that was interrupted continues from its last checkpoint when run again (its data is the stored one);
        a done month is refused. Returns the month's entry of `campaign.json`.

        The model-health guard (`peft_selective.continual.health`; `health_check`, `max_perplexity_ratio`, `max_kl_to_base`: the
        campaign's, unless given here for this month) refuses a broken month with [`~peft_selective.continual.health.ModelHealthError`]:
        during training (non-finite loss, vanished gradients) or after its evaluation (non-finite metrics, perplexity
        or KL to the base over the limits). Its adapter, rehearsal rows and Fisher are only written once the
        evaluation passed; on a refusal the month's data, checkpoints and state entries are removed, so the directory
        is as it was before the month (byte for byte, for a month started by this call) and `campaign.json` still ends
        at the last good month. Fix the cause and run the month again, with its data. The measured values and limits
        are recorded in the month's entry (`health`).

        The retention dial (`retention_scale`, `retention_keep_learning`, `retention_budget`, `retention_scales`,
        `validation_fraction`: the campaign's, unless given here; fixed when the month is registered, a resumed month
        keeps them) multiplies the month's update after training by a scale, baked into its adapter before the
        evaluation (`peft_selective.retention.scale_adapter`). With `"auto"`, `validation_fraction` of the training
        rows are held out (`data/<month>/validation.jsonl`, never trained on, never test rows); after training, for
        each scale of the grid (scale 1 included) the month's adapter is scaled temporarily and measured: the
        learning gain = behavioural score on the validation rows (greedy answers scored by the month's checks, else
        agreement, as the evaluation does) minus that of the model before the month on the same rows, and the
        forgetting = KL to the month t−1 model (the earlier adapters only) on the generic prompts (nats per token).
        `peft_selective.retention.choose_scale` picks the scale: the most learning within `retention_budget` when
        set, else the least forgetting keeping `retention_keep_learning` of the full update's gain. The month's entry
        records `retention: {"scale", "rule", "curve": [{"scale", "score", "learning_gain", "forgetting"}], ...}`
        and its card shows it.

        With `method="geometry_projected"` the month's adapter is calibrated before training
        (`peft_selective.calibrate`, with the last month's adapter as `previous_adapter`, so the subspace it protected
        stays protected) on: `calibration_reference_chars` of general reference text (`peft_selective.evaluation.preference.reference_text`),
        every earlier month's training chats (prompt + chosen answer, from `data/<month>/train.jsonl`) and the month's
        own `calibration_data` (a `.txt` file, paragraphs separated by blank lines, or a `.jsonl` file with a `"text"`
        field per line; checked before the month is registered, stored in `data/<month>/calibration.jsonl` so that a
        resumed month is calibrated the same). The month's entry records `calibration` (the texts per source, the
        calibration tokens, the tolerance, norm cap and the largest per-layer bound of the relative output change on
        the protected data); the full per-layer report is `adapters/<month>/geometry_report.json`. A calibration that
        fails (too little protected text for a layer) leaves no trace of the month, as a health refusal.
        """
        if not _MONTH_NAME.match(name):
            raise ValueError(f"Invalid month name {name!r}: use letters, digits, '.', '_' and '-' (e.g. 2025-07).")
        entry = self.month(name)
        if entry is not None and entry["status"] == "done":
            raise CampaignError(f"Month {name!r} is already done; evaluate it with `eval`, or pick a new name.")
        pending = [month["name"] for month in self.months if month["status"] != "done" and month["name"] != name]
        if pending:
            raise CampaignError(f"Month {pending[0]!r} was interrupted: run it again to finish it first.")
        overrides = dict(
            health_check=health_check, max_perplexity_ratio=max_perplexity_ratio, max_kl_to_base=max_kl_to_base
        )
        limits = {key: getattr(self.config, key) if value is None else value for key, value in overrides.items()}
        if checks is None and entry is None:
            checks = (self.config.checks or {}).get(name)
        try:
            month_checks = normalize_checks(checks, f"checks of month {name!r}") if checks is not None else None
        except ValueError as error:
            raise CampaignError(f"Month {name!r} was not registered: {error}") from error
        if entry is not None and month_checks is not None and month_checks != entry.get("checks"):
            raise CampaignError(
                f"Month {name!r} was started with other checks ({entry.get('checks')}); rerun it without --checks "
                "(or with the same checks) to resume."
            )
        retention_overrides = dict(
            scale=retention_scale,
            keep_learning=retention_keep_learning,
            budget=retention_budget,
            scales=retention_scales,
            validation_fraction=validation_fraction,
        )
        if entry is None:
            retention = self.config.retention_options(**retention_overrides)
        else:  # a resumed month keeps the options it was registered with (its held-out rows depend on them)
            retention = entry.get("retention_options")
            if any(v is not None for v in retention_overrides.values()) and (
                self.config.retention_options(**retention_overrides) != retention
            ):
                raise CampaignError(
                    f"Month {name!r} was started with other retention options ({retention or 'off'}); rerun it "
                    "without them (or with the same) to resume."
                )
        user_calibration = self._user_calibration(name, entry, calibration_data)
        before = self._before_month(entry is None)
        holdout = retention["validation_fraction"] if retention and retention["scale"] == "auto" else None
        splits = self._month_data(name, data, test_data, test_fraction, holdout)
        calibration_path = self._path("data", name, "calibration.jsonl")
        if entry is None and user_calibration and self._is_main:
            atomic_write(calibration_path, "".join(json.dumps({"text": t}) + "\n" for t in user_calibration).encode())
        previous = self.done_months
        model, tokenizer = self.load_model()
        if self.state["base_fingerprint"] is None:
            self.state["base_fingerprint"] = _base_fingerprint(model)
        if entry is None:
            source = data if isinstance(data, (str, Path)) else "in-memory Dataset"
            entry = {
                "name": name,
                "status": "training",
                "started_at": _now(),
                "data": {
                    "source": str(source),
                    "train_rows": len(splits["train"]),
                    "test_rows": len(splits["test"]),
                    "train_sha256": _digest(splits["train"]),
                },
            }
            if "validation" in splits:
                entry["data"]["validation_rows"] = len(splits["validation"])
            if retention is not None:
                entry["retention_options"] = retention
            if month_checks and (month_checks["checks"] or month_checks["bleed_checks"]):
                entry["checks"] = month_checks
            if not (month_checks and (month_checks["checks"] or month_checks["bleed_checks"])):
                # Bleed of a month without checks: a style signature of its chosen vs rejected answers, if any.
                train = splits["train"]
                entry["style_signature"], entry["style_note"] = fit_style_signature(train["chosen"], train["rejected"])
            pool = self.knowledge_pool
            excluded = self._exclude(pool, name, [list(splits["train"]), list(splits["test"])])
            if excluded:
                logger.info("%d knowledge items overlap month %r's prompts: excluded from the report.", excluded, name)
            self.months.append(entry)
        self._save_state()

        evaluation_config = self.config.evaluation_config()
        if BASELINE not in self.evaluations and not previous and self._is_main:
            logger.info("Evaluating the base model (month 0).")
            self.evaluations[BASELINE] = evaluate_model(
                model,
                tokenizer,
                evaluation_config,
                knowledge_items=self.knowledge_pool["items"],
                show_progress=True,
                exact_indices=self._exact_indices(),
                keep_offscope=True,  # the base's rate of every later month's style on the same off-scope prompts
            )
            self._save_evaluations()
        reference_path = self._path("data", name, "reference_logps.json")
        if not reference_path.exists() and self._is_main:  # the base's log-probs: R[t][name] is measured against them
            context = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
            with context:
                atomic_write_json(
                    reference_path, reference_logps_for(model, tokenizer, splits["test"], evaluation_config)
                )
        before_path = self._path("data", name, "before_behaviour.json")
        if "behaviour" in evaluation_config.suites and not before_path.exists() and self._is_main:
            # The model before the month on the month's held-out prompts: the paired baseline of what it learned.
            atomic_write_json(
                before_path,
                month_behaviour(model, tokenizer, splits["test"], self.month_spec(name), evaluation_config),
            )

        self._barrier()
        run_dir = self._path("runs", name)
        fisher_dir = self._path("fisher") if self.config.ewc_coef > 0 else None
        trainer = ContinualDPOTrainer(
            model,
            args=self.config.training_args(run_dir, name, fisher_dir),
            train_dataset=splits["train"],
            train_dataset_validated=True,  # checked by `_split` when the month was registered
            processing_class=tokenizer,
            peft_config=self.config.peft_config(),
            rehearsal_buffer=RehearsalBuffer(self._path("buffer")),
            callbacks=callbacks,
        )
        calibration = None
        if self.config.method == "geometry_projected":
            try:
                calibration = self._calibrate(trainer.model, tokenizer, name, previous, user_calibration)
            except ValueError as error:  # too little protected text for a layer, no layer with room
                if self._is_main:
                    raise CampaignError(
                        f"Month {name!r}: the geometry_projected calibration failed: {error} (raise "
                        f"`calibration_reference_chars`, now {self.config.calibration_reference_chars}, or pass more "
                        f"text with --calibration_data). {self._undo_month(name, before)}"
                    ) from error
                raise
        checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if checkpoint:
            logger.info("Month %r resumes from %s.", name, checkpoint)
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        except ModelHealthError as error:  # raised on every process alike (the loss is gathered, gradients reduced)
            if self._is_main:
                raise ModelHealthError(
                    f"{error} {self._undo_month(name, before)}", error.measured, error.limits
                ) from error
            raise
        policy = trainer.accelerator.unwrap_model(trainer.model)
        dial = self._retention_dial(policy, tokenizer, name, previous, splits, retention) if retention else None
        # The main process evaluates; nothing of the month is written until the evaluation passed the guard.
        evaluation, health, refusal = None, None, None
        if self._is_main:
            months = previous + [name]
            logger.info("Evaluating the model after month %r.", name)
            evaluation = self._evaluate(policy, tokenizer, months, show_progress=True)
            if limits["health_check"]:
                try:
                    health = check_evaluation(
                        name,
                        evaluation,
                        self.evaluations.get(BASELINE),
                        limits["max_perplexity_ratio"],
                        limits["max_kl_to_base"],
                    )
                except ModelHealthError as error:
                    refusal = error
        (refused,) = broadcast_object_list([refusal is not None])  # every process stops, or goes on, together
        if refused:
            if not self._is_main:
                raise ModelHealthError(f"Month {name!r} was refused by the main process's health check.")
            raise ModelHealthError(
                f"{refusal} {self._undo_month(name, before)}", refusal.measured, refusal.limits
            ) from refusal
        if self._is_main:
            self._save_adapter(trainer.model, name)
            if calibration is not None:
                calibration[0].save(self._path("adapters", name))  # geometry_report.json: the per-layer bounds
        finish = trainer.finish_month(name, overwrite=True)
        entry["data"]["rehearsal_rows"] = sum(v for k, v in trainer.rehearsal_summary.items() if k != "new")
        if not self._is_main:
            self._barrier()  # the main process writes the month's results
            return entry
        self.evaluations[name] = evaluation
        self._save_evaluations()
        entry.update(
            status="done",
            finished_at=_now(),
            adapter_sha256=_sha256(self._path("adapters", name, "adapter_model.safetensors")),
            training={"train_loss": result.training_loss, "steps": result.global_step, **finish},
        )
        if health is not None:
            entry["health"] = health
        if dial is not None:
            entry["retention"] = dial
        if calibration is not None:
            entry["calibration"] = calibration[1]
        self.write_card(name)
        self._save_state()
        if not keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        self._barrier()
        return entry

    # ---------------------------------------------------------------------------------------------- calibration
    def _user_calibration(
        self, name: str, entry: Optional[dict[str, Any]], calibration_data: Optional[Union[str, Path]]
    ) -> list[str]:
        """The month's own calibration texts (geometry_projected): read from `calibration_data` for a new month, the
        stored ones for a resumed month (which `calibration_data`, if given again, must match). Checked before the
        month is registered."""
        texts = None
        if calibration_data is not None:
            if self.config.method != "geometry_projected":
                raise CampaignError(
                    f"Month {name!r} was not registered: --calibration_data is only used by method "
                    f"'geometry_projected' (this campaign trains {self.config.method!r})."
                )
            try:
                texts = read_calibration_texts(calibration_data)
            except (OSError, ValueError) as error:
                raise CampaignError(f"Month {name!r} was not registered: {error}") from error
        if entry is None:
            return texts or []
        stored_path = self._path("data", name, "calibration.jsonl")
        stored = read_calibration_texts(stored_path) if stored_path.is_file() else []
        if texts is not None and texts != stored:
            raise CampaignError(
                f"Month {name!r} was started with other calibration data; rerun it without --calibration_data (or with "
                "the same file) to resume."
            )
        return stored

    def calibration_texts(self, tokenizer, months: Sequence[str], user_texts: Sequence[str] = ()) -> dict[str, list]:
        """The protected data of a geometry_projected month, by source: `reference_text` (the first
        `calibration_reference_chars` of `peft_selective.evaluation.preference.reference_text`, in chunks of 1000 characters),
        `earlier_months` (every training row of `months`, prompt + chosen answer, as the chat template writes them)
        and `calibration_data` (the month's own texts)."""
        from ..evaluation.preference import reference_text

        reference = reference_text()[: self.config.calibration_reference_chars]
        earlier = []
        for month in months:
            rows = Dataset.from_json(str(self._path("data", month, "train.jsonl")))
            earlier += [_chat_text(tokenizer, row) for row in rows]
        return {
            "reference_text": _chunks(reference),
            "earlier_months": [text for text in earlier if text.strip()],
            "calibration_data": list(user_texts),
        }

    def _calibrate(self, model, tokenizer, name: str, previous: list[str], user_texts: list[str]):
        """Calibrate the month's GeometryProjected adapter (every process, the same data). Returns the report and the
        month's `calibration` record."""
        from .. import calibrate

        sources = self.calibration_texts(tokenizer, previous, user_texts)
        texts = [text for group in sources.values() for text in group]
        if not texts:
            raise ValueError(
                "no protected text (calibration_reference_chars is 0, no earlier month, no calibration_data)"
            )
        report = calibrate(
            model,
            texts,
            tokenizer,
            adapter_name=name,
            previous_adapter=previous[-1] if previous else None,
            batch_size=self.config.eval_batch_size,
            max_length=self.config.max_length,
            show_progress=False,
        )
        layers = report.layers.values()
        record = {
            "texts": {source: len(group) for source, group in sources.items()},
            "previous_adapter": previous[-1] if previous else None,
            "calibration_tokens": report.calibration_tokens,
            "tolerance": report.tolerance,
            "norm_cap": report.norm_cap,
            "layers": len(report.layers),
            "max_bound": report.max_bound,
            "protected_dim": {
                "min": min(g.protected_dim for g in layers),
                "max": max(g.protected_dim for g in layers),
            },
            "free_dim": {"min": min(g.free_dim for g in layers), "max": max(g.free_dim for g in layers)},
            "soft_projector_layers": sum(g.soft_projector for g in layers),
            "report": f"adapters/{name}/geometry_report.json",
        }
        logger.info(
            "Month %r calibrated on %d protected tokens: %d layers, largest bound %.4f (tolerance %g).",
            name,
            report.calibration_tokens,
            len(report.layers),
            report.max_bound,
            report.tolerance,
        )
        return report, record

    # ---------------------------------------------------------------------------------------------- retention dial
    def _retention_dial(
        self, policy, tokenizer, name: str, previous: list[str], splits: dict[str, Dataset], options: dict[str, Any]
    ) -> dict[str, Any]:
        """Bake the month's retention scale into its adapter (every process), the fixed one or, for `"auto"`, the one
        the main process chooses on the validation rows (see [`run_month`]). Returns the month's `retention` record."""
        from ..retention import scale_adapter

        if options["scale"] == "auto":
            record = self._choose_retention(policy, tokenizer, name, previous, splits["validation"], options)
            (record,) = broadcast_object_list([record])  # the main process chose; every process bakes the same
        else:
            record = {"scale": options["scale"], "rule": "fixed", "curve": []}
        scale_adapter(policy, name, record["scale"])
        logger.info("Month %r: retention scale %g (%s).", name, record["scale"], record["rule"])
        return record

    def _choose_retention(
        self, policy, tokenizer, name: str, previous: list[str], validation: Dataset, options: dict[str, Any]
    ) -> Optional[dict[str, Any]]:
        """The curve over `options["scales"]` on the validation rows and the choice (main process; `None` elsewhere)."""
        from ..continual.reference import active_adapters
        from ..evaluation.preference import generic_prompts, kl_to_reference
        from ..retention import choose_scale, scaled_adapter

        if not self._is_main:
            return None
        evaluation_config = self.config.evaluation_config()
        spec = self.month_spec(name)
        prompts = generic_prompts()[: evaluation_config.drift_prompts]

        def score() -> tuple[float, str]:
            result = month_behaviour(policy, tokenizer, validation, spec, evaluation_config)
            return _mean(result["scores"]), result["scored_by"]

        with active_adapters(policy, previous):  # the month t-1 model, on the same rows
            before, scored_by = score()
        curve = []
        for scale in options["scales"]:
            with scaled_adapter(policy, name, scale):
                after, _ = score()
                forgetting = kl_to_reference(
                    policy,
                    lambda: active_adapters(policy, previous),
                    tokenizer,
                    prompts,
                    batch_size=evaluation_config.batch_size,
                    max_length=evaluation_config.max_length,
                )
            curve.append({"scale": scale, "score": after, "learning_gain": after - before, "forgetting": forgetting})
            logger.info(
                "Month %r at scale %g: validation score %.3f (gain %+.3f), KL to the month before %.5f.",
                name,
                scale,
                after,
                after - before,
                forgetting,
            )
        if options["budget"] is not None:
            choice = choose_scale(curve, forgetting_budget=options["budget"])
        else:
            choice = choose_scale(curve, keep_learning_share=options["keep_learning"])
        if not choice["met"]:
            logger.warning("Month %r: %s (scale %g).", name, choice["rule"], choice["scale"])
        return {
            "scale": choice["scale"],
            "rule": choice["rule"],
            "met": choice["met"],
            "curve": curve,
            "before": before,
            "scored_by": scored_by,
            "validation_rows": len(validation),
            "forgetting": "KL to the month t-1 model on the generic prompts (nats per token)",
        }

    # ---------------------------------------------------------------------------------------------- health guard
    def _before_month(self, new: bool) -> dict[str, Any]:
        """What [`_undo_month`] needs to put the directory back as it was before a month: for a month started by this
        call the bytes of the two state files, and which of the shared folders existed."""

        def content(path: Path) -> Optional[bytes]:
            return path.read_bytes() if path.is_file() else None

        return {
            "new": new,
            "state": content(self.directory / CAMPAIGN_FILE) if new else None,
            "evaluations": content(self.directory / EVALUATIONS_FILE) if new else None,
            "folders": {folder: self._path(folder).is_dir() for folder in (*_MONTH_FOLDERS, "buffer", "fisher")},
        }

    def _undo_month(self, name: str, before: dict[str, Any]) -> str:
        """Remove every trace of the refused month `name` (main process): its checkpoints, data, adapter, card,
        buffer rows and Fisher, folders it created, then its entries in the state files (last, as every write of the
        campaign). Returns the sentence for the error message."""
        if not self._is_main:
            return ""
        for folder in _MONTH_FOLDERS:  # runs/ first: a rerun must never resume from the broken checkpoints
            shutil.rmtree(self._path(folder, name), ignore_errors=True)
        kept = []
        buffer_dir, fisher_dir = self._path("buffer"), self._path("fisher")
        if not before["folders"]["buffer"]:
            shutil.rmtree(buffer_dir, ignore_errors=True)
        elif (buffer_dir / "manifest.json").is_file():  # only a resumed month can have reached the buffer
            buffer = RehearsalBuffer(buffer_dir)
            if name in buffer:
                buffer.remove_month(name)
        if not before["folders"]["fisher"]:
            shutil.rmtree(fisher_dir, ignore_errors=True)
        elif (fisher_dir / FISHER_METADATA).is_file() and name in _read_json(
            fisher_dir / FISHER_METADATA, "Fisher metadata"
        ).get("months", []):
            kept.append(f"fisher/ (it already sums month {name!r}: restore it from a backup before the rerun)")
        for folder in _MONTH_FOLDERS:
            path = self._path(folder)
            if not before["folders"][folder] and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        state_path, evaluations_path = self.directory / CAMPAIGN_FILE, self.directory / EVALUATIONS_FILE
        if before["new"]:
            atomic_write(state_path, before["state"])
            if before["evaluations"] is None:
                evaluations_path.unlink(missing_ok=True)
            else:
                atomic_write(evaluations_path, before["evaluations"])
        else:  # a resumed month: the campaign without it
            self.state["months"] = [month for month in self.months if month["name"] != name]
            self._save_state()
            if self.evaluations.pop(name, None) is not None:
                self._save_evaluations()
        self.state = _read_json(state_path, "state")
        self.evaluations = _read_json(evaluations_path, "evaluation history") if evaluations_path.exists() else {}
        last = self.done_months[-1] if self.done_months else None
        sentence = (
            f"Nothing of month {name!r} was kept: campaign.json still ends at "
            + (f"month {last!r}" if last else "no done month")
            + "; no evaluation, card, adapter, rehearsal rows or Fisher of it were written, and its data and "
            "checkpoints were removed. Fix the cause and run the month again with its data."
        )
        if kept:
            sentence += " Left as it was: " + "; ".join(kept) + "."
        return sentence

    def _save_adapter(self, model, name: str) -> None:
        policy = model.module if hasattr(model, "module") else model
        target = self._path("adapters", name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as staging:
            policy.save_pretrained(staging, selected_adapters=[name])
            saved = Path(staging) / name if name != "default" else Path(staging)
            if target.exists():
                shutil.rmtree(target)
            saved.rename(target)

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate(
        self,
        month: Optional[str] = None,
        lm_eval_tasks: Optional[Sequence[str]] = None,
        lm_eval_include_path: Optional[Union[str, Path]] = None,
        lm_eval_limit: Optional[int] = None,
    ) -> dict[str, Any]:
        """Evaluate the model after `month` (default: the last done one) on every month's held-out pairs up to it and
        on the general suites; stores and returns the result.

        `lm_eval_tasks` adds EleutherAI lm-evaluation-harness tasks (`mmlu`, `arc_easy`, ... with Hub access, or local
        task definitions in `lm_eval_include_path`, e.g. written by `peft_selective.evaluation.write_knowledge_task`)
        run on the same model, every month's adapter stacked; stored under `"lm_eval"` (needs the `lm-eval` extra).
        """
        done = self.done_months
        if not done:
            raise CampaignError("No month is done yet: run one with `run-month`.")
        month = month or done[-1]
        model, tokenizer = self.load_model(upto=month)
        months = done[: done.index(month) + 1]
        evaluation = self._evaluate(model, tokenizer, months)
        if lm_eval_tasks:
            from ..evaluation import run_lm_eval

            evaluation["lm_eval"] = run_lm_eval(
                model, tokenizer, list(lm_eval_tasks), include_path=lm_eval_include_path, limit=lm_eval_limit
            )
        self.evaluations[month] = evaluation
        self._save_evaluations()
        return self.evaluations[month]

    def retention(self) -> dict[str, Any]:
        """The behavioural retention matrix of the done months (`R`, its intervals `ci95`), the average and BWT with
        their intervals, and the implicit-reward matrix kept under its own name (`implicit_reward`)."""
        months = self.done_months
        return {
            "months": months,
            "R": retention_matrix(self.evaluations, months),
            "ci95": retention_intervals(self.evaluations, months),
            **retention_numbers(self.evaluations, months),
            "implicit_reward": implicit_reward_matrix(self.evaluations, months),
        }

    def report_inputs(self, months: Optional[list[str]] = None) -> dict[str, Any]:
        """What [`format_report`] needs besides the evaluations: the surviving knowledge items, each month's behaviour
        before it, and notes (knowledge items excluded, months whose bleed is not measured)."""
        months = self.done_months if months is None else months
        pool = self.knowledge_pool
        survivors = self.knowledge_survivors()
        notes = [
            f"Knowledge: {len(survivors)} of the {len(pool['items'])} pool items ({pool['source']}) overlap no "
            f"month's prompts nor the KL anchors and are reported in every column; {len(pool['excluded'])} excluded."
        ]
        minimum = self.config.evaluation_config().knowledge_min_items
        if len(survivors) < minimum:
            notes.append(
                f"Only {len(survivors)} knowledge items survive (fewer than {minimum}): the knowledge intervals are "
                "wide; use a larger pool (`knowledge_questions`, or more items in `knowledge_data`)."
            )
        for name in months:
            spec = self.month_spec(name)
            if not (spec["checks"] or spec["bleed_checks"] or spec["style_signature"]):
                notes.append(f"Month {name}: bleed not measured ({spec['style_note'] or 'no style test'}).")
        return {"surviving": survivors, "before": self._before_behaviour(months), "notes": notes}

    def report(self) -> str:
        """The retention matrix and the general-ability table as markdown (and every month's card rewritten)."""
        months = self.done_months
        if not months:
            raise CampaignError("No month is done yet: nothing to report.")
        for name in months:
            self.write_card(name)
        return format_report(self.evaluations, months, **self.report_inputs(months))

    # ---------------------------------------------------------------------------------------------- cards & hub
    def card_context(self, name: str) -> dict[str, Any]:
        done = self.done_months
        months = done[: done.index(name) + 1] if name in done else done + [name]
        config = self.config
        inputs = self.report_inputs(months)
        numbers = retention_numbers(self.evaluations, months)
        columns = [c for c in [BASELINE, *months] if c in self.evaluations]
        return {
            "month": name,
            "months": months,
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"
            if config.base_model == EMBEDDED
            else config.base_model,
            "quantization": config.quantization,
            "method": config.method,
            "method_config": {
                key: getattr(value, "value", value)  # enums (peft_type) by their value
                for key, value in self.config.peft_config().to_dict().items()
                if is_json_serializable(getattr(value, "value", value))
            },
            "training": {
                k: getattr(config, k)
                for k in (
                    "learning_rate",
                    "max_steps",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "beta",
                    "max_length",
                    "rehearsal_ratio",
                    "rehearsal_nll_coef",
                    "kl_coef",
                    "kl_every",
                    "kl_direction",
                    "kl_anchor_kinds",
                    "kl_max_shape_anchors",
                    "kl_anchor_refresh_steps",
                    "boundary_pairs",
                    "boundary_max_new_tokens",
                    "ewc_coef",
                    "rehearsal_reference",
                    "loss_type",
                    "loss_weights",
                    "label_smoothing",
                    "sft_weight",
                    "seed",
                )
            }  # fmt: skip
            | self._geometry_settings(name),
            "data": {m: self.month(m)["data"] for m in months},
            "retention": {
                "months": months,
                "R": retention_matrix(self.evaluations, months),
                "ci95": retention_intervals(self.evaluations, months),
                "scored_by": {m: _scored_by(self.evaluations, m) for m in months},
                **{k: v for k, v in numbers.items() if k in ("average", "bwt_interval")},
            },
            "learning": learning_table(self.evaluations, months, inputs["before"]),
            "ranking": ranking_table(self.evaluations, months),
            "bleed": bleed_table(self.evaluations, months),
            "knowledge": {
                **knowledge_table(self.evaluations, columns, inputs["surviving"]),
                "pool": len(self.knowledge_pool["items"]),
            },
            "general": {c: self.evaluations[c]["general"] for c in columns},
            "retention_dial": {
                m: self.month(m)["retention"] for m in months if (self.month(m) or {}).get("retention")
            },
            "hub_repo": config.hub_repo,
            "license": config.license,
            "limitations": inputs["notes"][1:],  # the first note (how many knowledge items) is in the card's table
        }

    def _geometry_settings(self, name: str) -> dict[str, Any]:
        """geometry_projected: the calibration settings, and the month's calibration (tokens, largest bound)."""
        if self.config.method != "geometry_projected":
            return {}
        settings: dict[str, Any] = {"calibration_reference_chars": self.config.calibration_reference_chars}
        record = (self.month(name) or {}).get("calibration")
        if record:
            settings["calibration"] = {
                key: record[key] for key in ("texts", "calibration_tokens", "max_bound", "previous_adapter")
            }
        return settings

    def write_card(self, name: str) -> Path:
        from .model_card import render_model_card

        return render_model_card(self.card_context(name), self._path("cards", name))

    def push(self, repo_id: Optional[str] = None, dry_run: bool = False, token: Optional[str] = None) -> list[str]:
        from .hub import push_campaign

        repo_id = repo_id or self.config.hub_repo
        if not repo_id:
            raise CampaignError("No Hub repo: pass one, or set `hub_repo` at `init`.")
        return push_campaign(self.directory, repo_id, dry_run=dry_run, token=token)


def _digest(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _scored_by(evaluations: dict[str, Any], month: str) -> Optional[str]:
    """How month's held-out answers are scored: "checks: a, b" or "agreement" (from its own evaluation)."""
    cell = evaluations.get(month, {}).get("behaviour", {}).get(month)
    if not cell:
        return None
    return "checks: " + ", ".join(cell["checks"]) if cell.get("scored_by") == "checks" else "agreement"


def _ci(summary: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    """`0.812 [0.700, 0.900]` from a `{"mean", "ci95"}` summary ("" when None)."""
    if not summary:
        return ""
    sign = "+" if signed else ""
    lo, hi = summary["ci95"]
    return f"{summary['mean']:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def format_report(
    evaluations: dict[str, Any],
    months: list[str],
    surviving: Optional[list[int]] = None,
    before: Optional[dict[str, Any]] = None,
    notes: Optional[list[str]] = None,
) -> str:
    """Markdown: what was learned and kept, judged by behaviour (generation-based), with 95% intervals, then what is
    not generation-based.

    - The behavioural retention matrix R[t][i] (rows: after month t; columns: month i's held-out prompts, scored by
      its checks or by agreement), the average and the backward transfer (paired interval, same items).
    - Learning per month: the score before the month (`before`, the campaign's `before_behaviour.json`), right after
      it, the paired gain, and whether it learned (the gain's interval above 0).
    - Bleed: share of off-scope answers carrying each month's style, and the base's rate on the same prompts.
    - Knowledge: multiple-choice and exact-match accuracy on the `surviving` pool items (the same in every column).
    - Ranking of the held-out pairs (log-likelihood, not generation) and the implicit-reward accuracy against the base.
    - The general-ability table against month 0 (perplexity, KL, refusals, drift).
    """
    lines = [
        "Behavioural retention R[t][i]: greedy answers to month i's held-out prompts after month t, scored by the "
        "month's checks (else agreement with its chosen answers), with 95% intervals.",
        "",
        "| after \\ on | " + " | ".join(months) + " |",
        "|---|" + "---:|" * len(months),
    ]
    intervals = retention_intervals(evaluations, months)
    cells = retention_cells(retention_matrix(evaluations, months), intervals, bold_diagonal=False, missing="")
    lines += [f"| {month} | " + " | ".join(row) + " |" for month, row in zip(months, cells)]
    numbers = retention_numbers(evaluations, months)
    bwt = _ci(numbers["bwt_interval"], signed=True)
    bwt = f"{bwt} (paired, same items)" if bwt else "n/a (a single month)"
    lines += ["", f"Average score {_ci(numbers['average']) or 'n/a'}, backward transfer {bwt}."]

    learning = learning_table(evaluations, months, before)
    if learning:
        lines += ["", "| month | scored by | before the month | right after | gain (paired) | learned |"]
        lines.append("|---|---|---:|---:|---:|---|")
        for month, entry in learning.items():
            learned = {True: "yes", False: "no"}.get(entry.get("learned"), "")
            lines.append(
                f"| {month} | {_scored_by(evaluations, month)} | {_ci(entry.get('before'))} | {_ci(entry['after'])} | "
                f"{_ci(entry.get('gain'), signed=True)} | {learned} |"
            )
    bleed = bleed_table(evaluations, months)
    if bleed:
        lines += [
            "",
            "Bleed: share of off-scope answers (generic prompts, knowledge questions, the other months' prompts) that "
            "carry the month's style.",
            "",
            "| month's style | tested by | " + " | ".join(f"after {m}" for m in months) + " | base, same prompts |",
            "|---|---|" + "---:|" * (len(months) + 1),
        ]
        for month, entry in bleed.items():
            cells = [_ci(entry["after"].get(m)) for m in months]
            tested = entry["styles"] or f"none: {entry['note']}"
            lines.append(f"| {month} | {tested} | " + " | ".join(cells) + f" | {_ci(entry.get('base'))} |")
    columns = [c for c in [BASELINE, *months] if c in evaluations]
    knowledge = knowledge_table(evaluations, columns, surviving)
    if knowledge["mc"]:
        lines += ["", "| knowledge | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines.append(
            f"| multiple choice (n={knowledge['n_mc']}) | "
            + " | ".join(_ci(knowledge["mc"].get(c)) for c in columns)
            + " |"
        )
        if knowledge["exact"]:
            lines.append(
                f"| exact match (n={knowledge['n_exact']}) | "
                + " | ".join(_ci(knowledge["exact"].get(c)) for c in columns)
                + " |"
            )
    ranking = ranking_table(evaluations, months)
    if ranking:
        lines += [
            "",
            f"Ranking of the held-out pairs after {months[-1]} (log-likelihood, not generation): length-normalised "
            "accuracy and mean margin (nats/token); the implicit-reward accuracy against the base only shows that "
            "training moved the log-probs.",
            "",
            "| pairs | ranking accuracy | mean margin | implicit-reward accuracy |",
            "|---|---:|---:|---:|",
        ]
        for month, entry in ranking.items():
            lines.append(
                f"| {month} | {_ci(entry['ranking_accuracy'])} | {_fmt(entry['ranking_margin'], 4)} | "
                f"{_fmt(entry['implicit_reward_accuracy'])} |"
            )
    table = general_table(evaluations, columns)
    if table:
        lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for metric, row in table.items():
            lines.append(f"| {metric} | " + " | ".join(_fmt(row.get(c), 4) for c in columns) + " |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)
