"""A monthly continual-DPO campaign kept in one directory, the single source of truth.

```
campaign/
  campaign.json            format version, the fixed config, the base model's fingerprint, the knowledge probe,
                           and every month (status, data summary, adapter checksum, training metrics)
  evaluations.json         evaluation results: "month-0" (the base) and one entry per month
  data/<month>/            train.jsonl, test.jsonl (the month's pairs as used), reference_logps.json (base model's
                           log-probs of the test pairs: the fixed reference of the retention matrix)
  adapters/<month>/        the month's PEFT adapter (safetensors)
  buffer/                  the rehearsal buffer (trl_ext.rehearsal)
  fisher/                  the summed Fisher, with EWC (trl_ext.ewc)
  cards/<month>/           the model card (README.md) and its plot (retention.png)
  runs/<month>/            Trainer checkpoints while a month trains (removed when it is done)
```

Every file is written atomically (temp file + rename) and `campaign.json` last: a run killed at any point leaves the
previous consistent state, and `run_month` with the same month continues from the last checkpoint. Month t is
trained by [`ContinualDPOTrainer`] on top of the adapters of months 1..t−1, loaded from `adapters/` and checked
against their recorded SHA-256.

A month is only recorded when the model is healthy (`trl_ext.health`, options `health_check`, `max_perplexity_ratio`,
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

from peft_selective import SAProjConfig, SelectiveMLPConfig
from peft_selective.quantization import keep_4bit_layers_trainable

from ._io import atomic_write, atomic_write_json, is_json_serializable
from .continual_dpo_config import ContinualDPOConfig
from .continual_dpo_trainer import ContinualDPOTrainer
from .data import held_out_capital_questions
from .evaluation import (
    EvaluationConfig,
    evaluate_model,
    general_table,
    reference_logps_for,
    retention_matrix,
    retention_numbers,
)
from .ewc import FISHER_METADATA
from .health import ModelHealthError, check_evaluation
from .rehearsal import RehearsalBuffer
from .validation import validate_preference_dataset


logger = logging.getLogger(__name__)

CAMPAIGN_FILE = "campaign.json"
EVALUATIONS_FILE = "evaluations.json"
FORMAT_VERSION = 1
BASELINE = "month-0"
EMBEDDED = "embedded"
METHODS = ("selective_mlp", "saproj", "lora")
_MONTH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Folders with one subfolder per month (`runs` first: see `Campaign._undo_month`).
_MONTH_FOLDERS = ("runs", "data", "adapters", "cards")


class CampaignError(RuntimeError):
    """The campaign directory is missing, corrupted, or asked to do something out of order."""


@dataclass
class CampaignConfig:
    """Everything fixed for a campaign's life, written by `init` to `campaign.json`.

    Attributes:
        base_model (`str`): model id or local path, or `"embedded"` for the bundled SmolLM2-135M-Instruct.
        quantization (`str`, *optional*): `"4bit"` (bitsandbytes NF4) or `"8bit"`; `None` loads in full precision.
        method (`str`): `"selective_mlp"` (Gate&Up), `"saproj"` (self-attention projections) or `"lora"` (PEFT LoRA
            on all linear layers).
        rank (`int`): adapter rank; `0` trains the selective methods at full rank (the paper's recipe).
        alpha (`float`, *optional*): scaling numerator (`alpha / rank`); default: the rank (scale 1).
        seed (`int`): seed of training, data splits and sampling.
        learning_rate, max_steps, per_device_train_batch_size, gradient_accumulation_steps, beta, max_length,
        gradient_checkpointing: the DPO training of each month (`ContinualDPOConfig`).
        save_steps (`int`): checkpoint interval; an interrupted month resumes from the last checkpoint.
        rehearsal_ratio, rehearsal_samples_per_month, rehearsal_nll_coef, kl_coef, kl_every, kl_anchor_max_new_tokens,
        kl_anchors, ewc_coef: the retention terms (see `ContinualDPOConfig`); EWC stores a Fisher in `fisher/` when > 0.
        eval_suites (`list[str]`): evaluation suites (`trl_ext.evaluation.SUITES`).
        knowledge_questions, perplexity_max_tokens, refusal_prompts, drift_prompts, eval_batch_size,
        eval_max_new_tokens: their sizes.
        hub_repo (`str`, *optional*): Hub repo for `push`. license (`str`, *optional*): for the model cards.
        health_check (`bool`): the model-health guard (`trl_ext.health`), on by default: training stops on a
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
        metadata={"help": "'selective_mlp' (Gate&Up), 'saproj' (attention projections) or 'lora'."},
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
    ewc_coef: float = field(
        default=0.0, metadata={"help": "Weight of the EWC penalty (> 0 stores a Fisher each month)."}
    )
    eval_suites: list[str] = field(
        default_factory=lambda: ["preference", "knowledge", "perplexity", "kl", "refusal", "drift"],
        metadata={"help": "Evaluation suites: preference knowledge perplexity kl refusal drift."},
    )
    knowledge_questions: int = field(
        default=40, metadata={"help": "Held-out capital questions of the knowledge probe."}
    )
    perplexity_max_tokens: int = field(default=4096, metadata={"help": "Reference-text tokens scored for perplexity."})
    refusal_prompts: int = field(default=20, metadata={"help": "Harmful (and benign) prompts for the refusal rates."})
    drift_prompts: int = field(
        default=12, metadata={"help": "Generic prompts for the drift probe and the KL to the base."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the evaluation."})
    eval_max_new_tokens: int = field(
        default=24, metadata={"help": "Generation length of the knowledge (at most 16), refusal and drift probes."}
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {list(METHODS)}.")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"`quantization` must be '4bit', '8bit' or None, got {self.quantization!r}.")
        if self.rank < 0 or (self.rank == 0 and self.method == "lora"):
            raise ValueError(f"`rank` must be > 0 (or 0 = full rank for the selective methods), got {self.rank}.")
        self.evaluation_config()  # checks the suites
        if not self.max_perplexity_ratio >= 1.0:
            raise ValueError(f"`max_perplexity_ratio` must be >= 1, got {self.max_perplexity_ratio}.")
        if not self.max_kl_to_base > 0:
            raise ValueError(f"`max_kl_to_base` must be > 0, got {self.max_kl_to_base}.")

    def evaluation_config(self) -> EvaluationConfig:
        return EvaluationConfig(
            suites=list(self.eval_suites),
            knowledge_questions=self.knowledge_questions,
            knowledge_seed=self.seed,
            knowledge_max_new_tokens=min(16, self.eval_max_new_tokens),
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
            ewc_coef=self.ewc_coef,
            fisher_dir=str(fisher_dir) if fisher_dir is not None else None,
            health_check=self.health_check,
            report_to=[],
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
        )


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

    from peft_selective.tuners.selective.model import rename_legacy_keys

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
        directory.mkdir(parents=True, exist_ok=True)
        questions = held_out_capital_questions(n=config.knowledge_questions, seed=config.seed)
        state = {
            "format_version": FORMAT_VERSION,
            "created_at": _now(),
            "config": asdict(config),
            "base_fingerprint": None,
            "knowledge_questions": questions,
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
            from peft_selective.embedded import load_embedded_model

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
        self, name: str, data: Optional[Union[str, Path, Dataset]], test_data, test_fraction: float
    ) -> dict[str, Dataset]:
        folder = self._path("data", name)
        entry = self.month(name)
        if entry is not None:  # resuming: the month's data is the stored one
            splits = {split: Dataset.from_json(str(folder / f"{split}.jsonl")) for split in ("train", "test")}
            if data is not None:
                new = self._split(data, test_data, test_fraction)
                if _digest(new["train"]) != entry["data"]["train_sha256"]:
                    raise CampaignError(
                        f"Month {name!r} was started with other training data ({entry['data']['source']}); rerun it "
                        "without --data (or with the same data) to resume."
                    )
            return splits
        if data is None:
            raise CampaignError(f"Month {name!r} is new: pass its preference data (--data).")
        splits = self._split(data, test_data, test_fraction)
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
    ) -> dict[str, Any]:
        """Train month `name` on top of the done months, then evaluate it, write its card and mark it done.

        A month that was interrupted continues from its last checkpoint when run again (its data is the stored one);
        a done month is refused. Returns the month's entry of `campaign.json`.

        The model-health guard (`trl_ext.health`; `health_check`, `max_perplexity_ratio`, `max_kl_to_base`: the
        campaign's, unless given here for this month) refuses a broken month with [`~trl_ext.health.ModelHealthError`]:
        during training (non-finite loss, vanished gradients) or after its evaluation (non-finite metrics, perplexity
        or KL to the base over the limits). Its adapter, rehearsal rows and Fisher are only written once the
        evaluation passed; on a refusal the month's data, checkpoints and state entries are removed, so the directory
        is as it was before the month (byte for byte, for a month started by this call) and `campaign.json` still ends
        at the last good month. Fix the cause and run the month again, with its data. The measured values and limits
        are recorded in the month's entry (`health`).
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
        before = self._before_month(entry is None)
        splits = self._month_data(name, data, test_data, test_fraction)
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
            self.months.append(entry)
        self._save_state()

        evaluation_config = self.config.evaluation_config()
        if BASELINE not in self.evaluations and not previous and self._is_main:
            logger.info("Evaluating the base model (month 0).")
            self.evaluations[BASELINE] = evaluate_model(
                model,
                tokenizer,
                evaluation_config,
                knowledge_questions=self.state["knowledge_questions"],
                show_progress=True,
            )
            self._save_evaluations()
        reference_path = self._path("data", name, "reference_logps.json")
        if not reference_path.exists() and self._is_main:  # the base's log-probs: R[t][name] is measured against them
            context = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
            with context:
                atomic_write_json(
                    reference_path, reference_logps_for(model, tokenizer, splits["test"], evaluation_config)
                )

        self._barrier()
        run_dir = self._path("runs", name)
        fisher_dir = self._path("fisher") if self.config.ewc_coef > 0 else None
        trainer = ContinualDPOTrainer(
            model,
            args=self.config.training_args(run_dir, name, fisher_dir),
            train_dataset=splits["train"],
            processing_class=tokenizer,
            peft_config=self.config.peft_config(),
            rehearsal_buffer=RehearsalBuffer(self._path("buffer")),
            callbacks=callbacks,
        )
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
        # The main process evaluates; nothing of the month is written until the evaluation passed the guard.
        evaluation, health, refusal = None, None, None
        if self._is_main:
            policy = trainer.accelerator.unwrap_model(trainer.model)
            months = previous + [name]
            logger.info("Evaluating the model after month %r.", name)
            evaluation = evaluate_model(
                policy,
                tokenizer,
                evaluation_config,
                test_sets=self.test_sets(months),
                reference_logps=self._reference_logps(months),
                knowledge_questions=self.state["knowledge_questions"],
                show_progress=True,
            )
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
        self.write_card(name)
        self._save_state()
        if not keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        self._barrier()
        return entry

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
    def evaluate(self, month: Optional[str] = None) -> dict[str, Any]:
        """Evaluate the model after `month` (default: the last done one) on every month's held-out pairs up to it and
        on the general suites; stores and returns the result."""
        done = self.done_months
        if not done:
            raise CampaignError("No month is done yet: run one with `run-month`.")
        month = month or done[-1]
        model, tokenizer = self.load_model(upto=month)
        months = done[: done.index(month) + 1]
        self.evaluations[month] = evaluate_model(
            model,
            tokenizer,
            self.config.evaluation_config(),
            test_sets=self.test_sets(months),
            reference_logps=self._reference_logps(months),
            knowledge_questions=self.state["knowledge_questions"],
        )
        self._save_evaluations()
        return self.evaluations[month]

    def retention(self) -> dict[str, Any]:
        months = self.done_months
        return {
            "months": months,
            "R": retention_matrix(self.evaluations, months),
            **retention_numbers(self.evaluations, months),
        }

    def report(self) -> str:
        """The retention matrix and the general-ability table as markdown (and every month's card rewritten)."""
        months = self.done_months
        if not months:
            raise CampaignError("No month is done yet: nothing to report.")
        for name in months:
            self.write_card(name)
        return format_report(self.evaluations, months)

    # ---------------------------------------------------------------------------------------------- cards & hub
    def card_context(self, name: str) -> dict[str, Any]:
        done = self.done_months
        months = done[: done.index(name) + 1] if name in done else done + [name]
        config = self.config
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
                    "ewc_coef",
                    "seed",
                )
            },  # fmt: skip
            "data": {m: self.month(m)["data"] for m in months},
            "retention": {"months": months, "R": retention_matrix(self.evaluations, months)},
            "general": {c: self.evaluations[c]["general"] for c in [BASELINE, *months] if c in self.evaluations},
            "hub_repo": config.hub_repo,
            "license": config.license,
            "limitations": [],
        }

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


def format_report(evaluations: dict[str, Any], months: list[str]) -> str:
    """Markdown: the retention matrix (rows: after month t; columns: month i's held-out pairs), its average and BWT,
    and the general-ability table against month 0."""
    matrix = retention_matrix(evaluations, months)
    numbers = retention_numbers(evaluations, months)
    lines = ["| after \\ on | " + " | ".join(months) + " |", "|---|" + "---:|" * len(months)]
    for month, row in zip(months, matrix):
        lines.append(f"| {month} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += ["", f"Average accuracy {_fmt(numbers['average_accuracy'])}, backward transfer {_fmt(numbers['bwt'])}."]
    columns = [c for c in [BASELINE, *months] if c in evaluations]
    table = general_table(evaluations, columns)
    if table:
        lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for metric, row in table.items():
            lines.append(f"| {metric} | " + " | ".join(_fmt(row.get(c), 4) for c in columns) + " |")
    return "\n".join(lines)
