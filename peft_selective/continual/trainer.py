"""[`ContinualDPOTrainer`]: TRL's `DPOTrainer` for monthly continual alignment.

Month t trains a new adapter on top of the frozen adapters of months 1..t−1 (all active together on one base), and
keeps what those months taught with three combinable terms added to the DPO loss:

- rehearsal: earlier months' pairs from a [`RehearsalBuffer`] mixed into the month's data (`rehearsal_ratio`), with
  an optional NLL on their chosen responses (`rehearsal_nll_coef`). By default (`rehearsal_reference="own_month"`)
  a rehearsed pair is scored against the DPO reference of the month that taught it: [`finish_month`] stores, with the
  rows it keeps, their reference log-probs under the month's own reference (TRL's `compute_ref_log_probs` on
  collated batches), and a later month uses them for those rows, so a rehearsed pair starts at the margin its month
  gave it instead of 0;
- a KL to the month t−1 model on anchor sequences (`kl_coef`, see `peft_selective.continual.anchors`): general prompts, earlier
  months' prompts and same-shape variants of the month's prompts (`kl_anchor_kinds`), continued by the month t−1
  model or, with `kl_anchor_refresh_steps`, regenerated from the policy every k steps;
- boundary pairs (`boundary_pairs`): off-scope prompts whose month t−1 answer is preferred over an answer in the
  month's style, added to the month's rows;
- EWC on the month's update, weighted by the earlier months' Fisher (`ewc_coef`, see `peft_selective.continual.ewc`).

The DPO reference is the month t−1 model (base plus adapters 1..t−1), not the bare base: a
[`PreviousMonthReference`] view of the policy, so no second model is held in memory. Each term is logged through the
Trainer's loggers (`retention/kl`, `retention/ewc`, `retention/rehearsal_nll`, `rehearsal/fraction`).

Where no public TRL / transformers API does what a term needs, the trainer relies on private code; every such seam is
listed in [`TRL_SEAMS`] (what we rely on and why), and `tests/continual/test_trl_seams.py` checks each against the
installed releases.

```python
from peft import PeftModel
from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer
from peft_selective import SelectiveMLPConfig

model = PeftModel.from_pretrained(base, "campaign/month-1", adapter_name="month-1")  # earlier months, frozen
args = ContinualDPOConfig("campaign/month-2", adapter_name="month-2", rehearsal_ratio=0.2, kl_coef=0.1,
                          ewc_coef=1.0, fisher_dir="campaign/fisher")
trainer = ContinualDPOTrainer(model, args=args, train_dataset=month_2, processing_class=tokenizer,
                              peft_config=SelectiveMLPConfig(), rehearsal_buffer=RehearsalBuffer("campaign/buffer"))
trainer.train()
trainer.finish_month("month-2")  # keep a sample for rehearsal, add this month's Fisher
```
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import torch
import trl
from accelerate.utils import gather_object
from datasets import Dataset, Value, concatenate_datasets
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoProcessor, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import create_model_from_path, get_config_model_id

from ..quantization import keep_4bit_layers_trainable
from ..utils.chat import encode_prompt
from ..utils.lock import DirectoryLock
from .anchors import (
    ANCHOR_KINDS,
    AnchorSet,
    anchor_kl,
    general_anchor_prompts,
    greedy_continuations,
    shape_variant_prompts,
    shape_variants,
)
from .config import ContinualDPOConfig
from .ewc import (
    FISHER_METADATA,
    FisherState,
    check_fisher_matches,
    estimate_fisher,
    ewc_penalty,
)
from .health import TrainingHealthCallback, check_loss
from .preference_data import PreferenceDataError, validate_preference_dataset
from .reference import PreviousMonthReference
from .rehearsal import (
    REFERENCE_LOGPS_KEY,
    STORED_REF_CHOSEN,
    STORED_REF_FINGERPRINT,
    STORED_REF_REJECTED,
    RehearsalBuffer,
)


logger = logging.getLogger(__name__)

#: Per-row flag column added to a mixed training set (1 for rehearsed rows); collated into the batch.
REHEARSAL_FLAG = "is_rehearsal"
#: Per-row flag column of the boundary rows (`boundary_pairs`), 1 for them; collated into the batch when present.
BOUNDARY_FLAG = "is_boundary"
_ROW_INDEX = "__row_index__"
_BUFFER_ROW = "__buffer_row__"
#: Per-row index column of the tokenized training set, collated into the batch: which rows' reference log-probs the
#: training computed (kept for `finish_month`, see `_month_reference_logps`).
_TRAIN_ROW = "__train_row__"
#: The file transformers writes last in a checkpoint (`Trainer._save_checkpoint`): its presence marks a complete one.
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


@dataclass(frozen=True)
class TrlSeam:
    """One place where [`ContinualDPOTrainer`] (or the [`PreviousMonthReference`] it hands TRL) relies on private or
    undocumented TRL / transformers code. `tests/continual/test_trl_seams.py` checks each against the installed
    releases and names the seam and the version when one moved."""

    name: str
    #: the class / function it lives on
    owner: str
    #: what we override, read or imitate, and the shape we rely on
    relies_on: str
    #: why no public API does it
    why: str


#: Every private TRL / transformers seam of this package (the rest goes through public API: `processing_class`, not
#: TRL's `_tokenizer`; our own metric store merged in `log`, not TRL's `_metrics`). Keep it in sync with the code; the
#: seam test fails for a seam it has no check for.
TRL_SEAMS: tuple[TrlSeam, ...] = (
    TrlSeam(
        "prepare_dataset",
        "trl.DPOTrainer._prepare_dataset",
        "overridden and called as `_prepare_dataset(dataset, processing_class, args, dataset_name)`; it keeps extra "
        "columns and drops rows whose `prompt_ids` reach `max_length` (we add a row index to name them)",
        "the only hook between TRL's tokenization and its silent filter of too-long prompts; without it they vanish",
    ),
    TrlSeam(
        "signature_columns",
        "transformers.Trainer._set_signature_columns_if_needed / _signature_columns",
        "overridden to add the flag and stored-reference columns to `_signature_columns` (a list of names)",
        "with `remove_unused_columns=True` the Trainer drops every other column before the collator sees it",
    ),
    TrlSeam(
        "fused_lm_head_forward",
        "trl.DPOTrainer._compute_loss / trl.trainer.utils.add_fused_lm_head",
        "the policy's DPO forward is `model(..., fused_lm_head=True)` returning `.log_probs` [2B, T-1] (chosen rows "
        "first); a forward hook keyed on that kwarg keeps the output for the rehearsal NLL (a missing capture raises)",
        "TRL's `sft` loss weighs every row; the rehearsal NLL is on rehearsed rows only, and a second forward costs",
    ),
    TrlSeam(
        "fused_lm_head_reference",
        "trl.trainer.utils.add_fused_lm_head",
        "patches `ref_model.forward` and reads `config.get_text_config()`, the backbone `base_model` and "
        "`get_output_embeddings()`, which `PreviousMonthReference` provides",
        "TRL patches whatever `ref_model` it is given; the month t-1 view must behave as a causal LM to it",
    ),
    TrlSeam(
        "precompute_ref_logps",
        "trl.DPOTrainer.precompute_ref_logps / _compute_loss",
        "set to True for one `compute_loss`, TRL reads `inputs['ref_chosen_logps'/'ref_rejected_logps']` instead "
        "of running the reference",
        "the only way to hand TRL per-row reference log-probs (the rehearsed rows' own month's; the month t-1 "
        "model's computed by us, whose values `finish_month` keeps for the month's rows)",
    ),
    TrlSeam(
        "compute_ref_log_probs",
        "trl.DPOTrainer.compute_ref_log_probs",
        "overridden and called as `compute_ref_log_probs(model, inputs) -> (chosen, rejected)` on a collated batch",
        "the reference log-probs exactly as TRL's precompute computes them, for the buffer's stored values (kept "
        "from the training batches, the rows never trained on computed in `finish_month`)",
    ),
    TrlSeam(
        "load_from_checkpoint",
        "transformers.Trainer._load_from_checkpoint",
        "overridden as `_load_from_checkpoint(resume_from_checkpoint, model=None)` to resume this month's adapter",
        "the Trainer reloads every adapter of the checkpoint and leaves the first (a frozen month) active",
    ),
    TrlSeam(
        "init_training_state",
        "transformers.Trainer._init_training_state / _inner_training_loop",
        "overridden as `_init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs, "
        "resume_from_checkpoint, trial) -> (epochs_trained, steps_trained_in_current_epoch)`, after which the loop runs "
        "`range(epochs_trained, num_train_epochs)`",
        "resumed from a checkpoint at max_steps, the loop runs one optimizer step more before it checks max_steps (a "
        "constant learning rate then moves the weights): returning `num_train_epochs` runs none",
    ),
    TrlSeam(
        "checkpoint_state_last",
        "transformers.Trainer._save_checkpoint",
        f"writes `{TRAINER_STATE}` after the weights, optimizer, scheduler and RNG states, so a checkpoint without a "
        "readable one was interrupted while being written ([`checkpoint_problem`])",
        "transformers does not mark a checkpoint complete; `get_last_checkpoint` returns a half-written one",
    ),
    TrlSeam(
        "loss_types",
        "trl.DPOTrainer.loss_types",
        "a list of the configured loss names (read for `'sft'`)",
        "the normalised form of `DPOConfig.loss_type` (a string or a list)",
    ),
    TrlSeam(
        "loss_in_parts",
        "trl.DPOTrainer._compute_loss / loss_weights / _metrics / use_weighting / aux_loss_enabled",
        "the loss is `sum(per-pair loss.mean() * weight)` over `loss_types` (TRL's `sft` term a mean over the "
        "batch's chosen tokens), weights in `loss_weights`; each call appends one value per metric to "
        "`_metrics['train'][key]`",
        "`score_retention_rows_apart` recombines the parts' losses exactly and merges their metrics into one value "
        "a step",
    ),
    TrlSeam(
        "model_card_tags",
        "trl.DPOTrainer._tag_names / _name",
        "class attributes TRL's model card and hub tags read",
        "how a TRL trainer subclass names itself on the Hub",
    ),
    TrlSeam(
        "trainer_utils",
        "trl.trainer.utils.create_model_from_path / get_config_model_id",
        "`create_model_from_path(model_id, **model_init_kwargs)` and `get_config_model_id(config)`",
        "a model id loaded exactly as `DPOTrainer` loads it (we add the adapter before TRL sees the model)",
    ),
)


#: Name of the frozen copy of an adapter that already holds an update when its month starts (TRL's name for it too).
REFERENCE_COPY = "ref"


def checkpoint_problem(folder: Union[str, os.PathLike]) -> Optional[str]:
    """Why the Trainer checkpoint `folder` cannot be resumed from, or None when it is complete. transformers writes
    `trainer_state.json` last (seam `checkpoint_state_last`): a checkpoint without a readable one was interrupted
    (a kill, a full disk) while being written."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        return f"no {TRAINER_STATE}"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} is unreadable: {error}"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} records no global_step"
    return None


def last_complete_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The highest-step complete checkpoint (`checkpoint-<step>`) in `output_dir`, or None. Incomplete ones are
    skipped with a warning naming them: `transformers.trainer_utils.get_last_checkpoint` would return a half-written
    checkpoint, and every resume from it would fail."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = {}
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir():
            steps[int(match.group(1))] = path
    for step in sorted(steps, reverse=True):
        problem = checkpoint_problem(steps[step])
        if problem is None:
            return str(steps[step])
        logger.warning(
            "Skipping the incomplete checkpoint %s (%s): it was interrupted while being written. Resuming from the "
            "checkpoint before it, if any.",
            steps[step],
            problem,
        )
    return None


#: A sentence's end: `.`, `!` or `?` (not after a digit: "1." of a list, "3.5") before a space or the text's end, or a
#: line break.
_SENTENCE_END = re.compile(r"(?<![0-9])[.!?](?=\s|$)|\n")


def whole_sentences(text: str) -> Optional[str]:
    """`text` up to its last complete sentence (see `_SENTENCE_END`), or `None` when it has none: what is kept of an
    answer cut off by a token budget, so that a training row never ends mid-sentence."""
    ends = [match.end() if match.group() != "\n" else match.start() for match in _SENTENCE_END.finditer(text)]
    kept = text[: max(ends)].rstrip() if ends else ""
    return kept or None


def _starts_as_zero_update(peft_config: PeftConfig) -> bool:
    """Whether a new adapter of this config leaves the model unchanged at creation (PEFT's default initialisations:
    ours `init_weights=True`, LoRA's `init_lora_weights=True`). Anything else (random, PiSSA, OLoRA, ...) changes the
    model, so the month's starting model includes the new adapter."""
    for attribute in ("init_weights", "init_lora_weights"):
        if hasattr(peft_config, attribute):
            return getattr(peft_config, attribute) is True
    return False  # an unknown method: assume it moves the model, a frozen copy is then always right


def _freeze_copy_of_adapter(model: PeftModel, name: str, copy_name: str) -> str:
    """Add `copy_name` to `model` as a frozen, inactive copy of adapter `name` (weights and buffers, through PEFT's
    own state-dict functions, so every method's naming is respected). An older copy of that name is replaced."""
    if copy_name in model.peft_config:
        logger.info("Replacing the adapter %r left by an earlier trainer with a copy of %r.", copy_name, name)
        model.base_model.delete_adapter(copy_name)
        model.peft_config.pop(copy_name, None)
    active = list(model.base_model.active_adapters)
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    model.add_adapter(copy_name, copy.deepcopy(model.peft_config[name]))
    state = get_peft_model_state_dict(model, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=copy_name)
    missing = [key for key in result.missing_keys if f".{copy_name}" in key]
    if missing:
        raise RuntimeError(f"Could not copy adapter {name!r} for the reference: {len(missing)} keys missing.")
    model.base_model.set_adapter(active)
    for param, flag in requires_grad.items():
        param.requires_grad_(flag)
    model.base_model.set_requires_grad([copy_name], requires_grad=False)
    return copy_name


def reference_fingerprint(prompt_ids, chosen_ids, rejected_ids, args: DPOConfig) -> str:
    """Digest of what a row's reference log-probs depend on besides the model: the sequences TRL's collator builds from
    its token ids (cut to `max_length` by `truncation_mode`, with their completion masks) and `ld_alpha`. Stored with
    the log-probs; a later month uses them only for a row whose fingerprint is the same."""
    prompt_ids, chosen_ids, rejected_ids = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    cut = slice(None)
    if args.max_length is not None:
        cut = slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)
    payload = [args.ld_alpha]
    for completion in (chosen_ids, rejected_ids):
        mask = [0] * len(prompt_ids) + [1] * len(completion)
        payload += [(prompt_ids + completion)[cut], mask[cut]]
    return hashlib.blake2b(json.dumps(payload).encode("utf-8"), digest_size=12).hexdigest()


@contextlib.contextmanager
def _datasets_progress_bars(enabled: bool):
    """datasets' progress bars on (or off) for the block, as they were afterwards."""
    were_disabled = datasets.are_progress_bars_disabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_disabled:
            datasets.disable_progress_bars()
        else:
            datasets.enable_progress_bars()


#: Per-pair columns of a collated batch (one value per pair, not per sequence).
_PAIR_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: TRL loss types whose batch loss is the mean of per-pair terms, plus `"sft"` (a token mean, recombined by tokens):
#: a batch scored in parts gives the same loss (`ContinualDPOConfig.score_retention_rows_apart`).
_PART_SEPARABLE_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "sft"})


def _batch_rows(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The pairs `rows` of a collated preference batch (its tensors hold the chosen sequences, then the rejected ones;
    `_PAIR_COLUMNS` one value per pair), without the trailing columns that are padding in all of them."""
    pairs = inputs["input_ids"].shape[0] // 2
    rows = rows.to(inputs["input_ids"].device)
    pick = torch.cat([rows, rows + pairs])
    width = inputs["input_ids"].shape[1]
    keep = _padded_width(inputs["attention_mask"], rows) or width
    picked = {}
    for key, value in inputs.items():
        if key in _PAIR_COLUMNS and torch.is_tensor(value):
            value = value[rows.to(value.device)]
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 2 * pairs:
            value = value[pick]
            if value.dim() > 1 and value.shape[1] == width:
                value = value[:, :keep]
        picked[key] = value
    return picked


def _padded_width(attention_mask: torch.Tensor, rows: torch.Tensor) -> int:
    """Columns of a right-padded preference batch that the chosen and rejected sequences of pairs `rows` reach (0 when
    all of them are padding)."""
    pairs = attention_mask.shape[0] // 2
    rows = rows.to(attention_mask.device)
    real = attention_mask[torch.cat([rows, rows + pairs])].any(dim=0).nonzero()
    return int(real.max()) + 1 if real.numel() else 0


def _padded_positions(attention_mask: torch.Tensor, rows: torch.Tensor) -> int:
    """Positions the chosen and rejected sequences of pairs `rows` fill once padded to their longest one."""
    return 2 * len(rows) * _padded_width(attention_mask, rows)


class _RehearsalFlagCollator:
    """Wraps TRL's preference collator: also collates the per-row rehearsal flag (0 where a dataset has none) and,
    when the rows have them, the rehearsed rows' stored reference log-probs (NaN for rows without)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch[REHEARSAL_FLAG] = torch.tensor([int(example.get(REHEARSAL_FLAG, 0) or 0) for example in examples])
        if examples and BOUNDARY_FLAG in examples[0]:
            batch[BOUNDARY_FLAG] = torch.tensor([int(example.get(BOUNDARY_FLAG) or 0) for example in examples])
        if examples and _TRAIN_ROW in examples[0]:
            batch[_TRAIN_ROW] = torch.tensor([int(example[_TRAIN_ROW]) for example in examples])
        if examples and STORED_REF_CHOSEN in examples[0]:
            for column in (STORED_REF_CHOSEN, STORED_REF_REJECTED):
                values = [math.nan if example.get(column) is None else example[column] for example in examples]
                batch[column] = torch.tensor(values, dtype=torch.float32)
        return batch


class ContinualDPOTrainer(DPOTrainer):
    """A `DPOTrainer` for one month of a continual campaign (see the module docstring).

    Args:
        model: a model id or path, a `PreTrainedModel` (month 1, with `peft_config`), or a `PeftModel` holding the
            earlier months' adapters (this month's is added from `peft_config` as `args.adapter_name`).
        ref_model: leave `None` for PEFT models (the reference is then the month t−1 view). For full fine-tuning,
            TRL's rules apply: the model at the start of the month is the reference.
        args ([`ContinualDPOConfig`]): `DPOConfig` options plus rehearsal / KL / EWC options.
        rehearsal_buffer ([`RehearsalBuffer`], *optional*): earlier months' pairs; mixed in at `rehearsal_ratio`, and
            [`finish_month`] adds a sample of this month to it.
        anchor_prompts (*optional*): prompts (strings or conversations) for the retention KL. A sequence replaces
            every kind; a mapping `{kind: prompts}` replaces the default prompts of those kinds of `kl_anchor_kinds`
            (each must be selected there). Defaults per kind: `"general"` the general anchor prompts (up to
            `kl_max_general_anchors`), `"earlier_months"` up to `kl_max_rehearsal_anchors` earlier months' prompts
            from the buffer, `"same_shape"` up to `kl_max_shape_anchors` same-shape variants of this month's training
            prompts (`peft_selective.continual.anchors.shape_variant_prompts`). Never evaluation items: pass your own same-shape
            prompts if the variants could coincide with prompts you evaluate on.

        train_dataset_validated (`bool`, *optional*): `True` when the caller already ran
            [`~peft_selective.continual.preference_data.validate_preference_dataset`] on `train_dataset` (or on the
            dataset it was split from): the row check is then not repeated. Default `False`.

    The other arguments are `DPOTrainer`'s. The training data is checked row by row before tokenization, once
    ([`peft_selective.continual.preference_data`], the package's one row schema; see `train_dataset_validated`);
    rows whose prompt fills `max_length` raise an error naming them unless `drop_long_prompts=True`, which drops them
    and logs the count.

    With `health_check=True` (the default) training stops with [`~peft_selective.continual.health.ModelHealthError`] on a non-finite
    loss (any step) or when the trained parameters' total gradient norm is 0 or non-finite on one of the first
    `health_check_steps` optimizer steps: the signs of a model broken before or while training (see
    `peft_selective.continual.health`).
    """

    _tag_names = ["trl", "dpo", "continual-dpo", "peft-selective"]
    _name = "Continual DPO"

    def __init__(
        self,
        model: Union[str, torch.nn.Module],
        ref_model: Optional[torch.nn.Module] = None,
        args: Optional[ContinualDPOConfig] = None,
        data_collator=None,
        train_dataset: Optional[Dataset] = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config: Optional[PeftConfig] = None,
        rehearsal_buffer: Optional[RehearsalBuffer] = None,
        anchor_prompts: Optional[Union[Sequence[Union[str, list]], Mapping[str, Sequence[Union[str, list]]]]] = None,
        train_dataset_validated: bool = False,
    ):
        args = self._continual_args(model, args)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if not train_dataset_validated:  # the caller may have run the same check already (the campaign does)
            validate_preference_dataset(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            for name, dataset in eval_dataset.items():
                validate_preference_dataset(dataset, name)
        elif eval_dataset is not None:
            validate_preference_dataset(eval_dataset, "eval")

        # Rehearsal: mixed on the raw columns, before TRL tokenizes
        self.rehearsal_buffer = rehearsal_buffer
        self.month_dataset = train_dataset
        self.rehearsal_summary: dict[str, int] = {}
        if args.rehearsal_ratio > 0:
            if rehearsal_buffer is None:
                raise ValueError("`rehearsal_ratio > 0` needs a `rehearsal_buffer` of earlier months' pairs.")
            if len(rehearsal_buffer) == 0:
                logger.info("The rehearsal buffer is empty (first month?): training on this month's rows only.")
            else:
                train_dataset, self.rehearsal_summary = rehearsal_buffer.mix_into(
                    train_dataset,
                    args.rehearsal_ratio,
                    seed=args.seed,
                    return_summary=True,
                    with_reference_logps=args.rehearsal_reference == "own_month",
                )
                train_dataset = train_dataset.map(
                    lambda row: {REHEARSAL_FLAG: int(row["source"] != "new")}, desc="Flagging rehearsed rows"
                )

        # This month's adapter on top of the earlier ones
        if isinstance(model, str):
            model_init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                model_init_kwargs["quantization_config"] = quantization_config
                quantization_config = None
            model = create_model_from_path(model, **model_init_kwargs)
        self.previous_adapters: list[str] = []
        # The adapters that make up the reference (the model at the start of the month); see `_add_month_adapter`.
        self.reference_adapters: list[str] = []
        # The new adapter's initialisation draws random numbers: seed first (as TRL does before creating the model), so
        # a month's result depends on its seed, not on what the process ran before.
        set_seed(args.seed)
        if peft_config is not None or isinstance(model, PeftModel):
            model = self._add_month_adapter(model, peft_config, args)
            if ref_model is None:
                ref_model = PreviousMonthReference(model, self.reference_adapters)
        elif args.ewc_coef > 0:
            raise ValueError("EWC applies to a month's adapter update: pass a `peft_config` (or a `PeftModel`).")
        # Before anything evaluates (the anchor continuations below): keeps every 4-bit layer's input gradient on
        # CPUs where bitsandbytes would repack it, also for PEFT LoRA models (see `peft_selective.quantization`).
        keep_4bit_layers_trainable(model)

        # Boundary pairs: raw rows, added before TRL tokenizes (and precomputes reference log-probs) like the others
        self.boundary_rows = 0
        # (model, {prompt ids: its greedy answer}) of the boundary rows: anchors with the same prompt reuse them
        self._boundary_answers: Optional[tuple[torch.nn.Module, dict[tuple[int, ...], list[int]]]] = None
        if args.boundary_pairs > 0:
            if processing_class is None:  # as TRL loads it, once, so the rows are tokenized with the trainer's own
                processing_class = AutoProcessor.from_pretrained(
                    get_config_model_id(model.config), trust_remote_code=args.trust_remote_code
                )
            reference = ref_model if ref_model is not None else model  # full fine-tuning: the untrained model
            train_dataset = self._add_boundary_rows(train_dataset, reference, processing_class, args)

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
        )
        self.data_collator = _RehearsalFlagCollator(self.data_collator)
        # Rehearsed rows scored against their own month's reference (stored log-probs checked against their tokens)
        self.own_reference_rows = 0
        if isinstance(self.train_dataset, Dataset) and STORED_REF_FINGERPRINT in self.train_dataset.column_names:
            self.train_dataset = self._check_stored_reference(self.train_dataset)
        # The month's own rows' DPO reference log-probs, as the training batches computed them ({training row index:
        # (chosen, rejected)}): `finish_month` stores those of the rows the buffer keeps instead of computing them again.
        self._seen_reference_logps: dict[int, tuple[float, float]] = {}
        self._keep_reference_logps = (
            rehearsal_buffer is not None
            and self.ref_model is not None
            and not self.precompute_ref_logps  # precomputed: the dataset's columns hold them all
            and isinstance(self.train_dataset, Dataset)
        )
        if self._keep_reference_logps:
            self.train_dataset = self.train_dataset.add_column(_TRAIN_ROW, list(range(len(self.train_dataset))))
        if args.health_check:  # the gradient half of the health guard (the loss half is in `compute_loss`)
            self._add_health_callback()
        self._rehearsal_logged = False
        # This trainer's own metrics (`retention/*`, `rehearsal/fraction`, ...), averaged and logged by `log` next to
        # TRL's, but kept apart from TRL's private store of them.
        self._retention_metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._captured_policy_output = None
        self._capture_policy_output = False
        # The policy's own DPO forward is read back for the rehearsal NLL and for the logged SFT term.
        self._needs_policy_output = args.rehearsal_nll_coef > 0 or "sft" in self.loss_types
        if self._needs_policy_output:
            self.model.register_forward_hook(self._capture_hook, with_kwargs=True)
        self._anchor_prompts = anchor_prompts
        self.anchors = self._build_anchors(anchor_prompts) if args.kl_coef > 0 else None
        # The global step whose policy gave the anchors' continuations (None: the month t−1 model's, from the start)
        self._anchors_refreshed_at: Optional[int] = None
        if args.kl_anchor_refresh_steps > 0 and args.kl_coef == 0:
            logger.warning("`kl_anchor_refresh_steps` has no effect without the retention KL (`kl_coef > 0`).")
        # (global step, draws in it): the anchor batches depend on the step only, so a resumed run draws the same ones
        self._anchor_draws = (-1, 0)
        # What `finish_month` checks: a month is finished once, by name, after its training.
        self._trained = False
        self._finished_month: Optional[str] = None
        # Set by `_init_training_state`: the resumed checkpoint had already reached max_steps.
        self._resumed_at_end = False
        # Normalised (and cast) once, in place: the penalty then weighs the update with it as it is, with no copy.
        fisher = self._load_fisher() if args.ewc_coef > 0 else None
        dtype = getattr(torch, args.ewc_fisher_dtype)
        self.fisher = fisher.normalized(dtype, in_place=True) if fisher is not None else None

    # ------------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _continual_args(model, args) -> ContinualDPOConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return ContinualDPOConfig(f"{str(name).split('/')[-1]}-ContinualDPO")
        if isinstance(args, ContinualDPOConfig):
            return args
        if isinstance(args, DPOConfig):  # a plain DPOConfig: same options, retention terms off
            values = {f.name: getattr(args, f.name) for f in fields(DPOConfig) if f.init}
            return ContinualDPOConfig(**values)
        raise TypeError(f"`args` must be a `ContinualDPOConfig`, got {type(args).__name__}.")

    def _add_month_adapter(self, model, peft_config: Optional[PeftConfig], args: ContinualDPOConfig) -> PeftModel:
        name = args.adapter_name
        if name == REFERENCE_COPY:
            raise ValueError(f"`adapter_name={REFERENCE_COPY!r}` is reserved for the reference; choose another name.")
        if isinstance(model, PeftModel):
            if peft_config is not None:
                if name in model.peft_config:
                    raise ValueError(
                        f"The model already has an adapter named {name!r}. Set `adapter_name` in the config to this "
                        f"month's name (the model has {sorted(model.peft_config)})."
                    )
                model.add_adapter(name, peft_config)
            elif name not in model.peft_config:
                raise ValueError(
                    f"No `peft_config` and no adapter {name!r} in the model (it has {sorted(model.peft_config)}): pass "
                    "this month's `peft_config`, or set `adapter_name` to the adapter to keep training."
                )
        else:
            model = get_peft_model(model, peft_config, adapter_name=name)
        others = [adapter for adapter in model.peft_config if adapter not in (name, REFERENCE_COPY)]
        previous = list(args.previous_adapters) if args.previous_adapters is not None else others
        unknown = [adapter for adapter in previous if adapter not in others]
        if unknown:
            raise ValueError(
                f"`previous_adapters` {unknown} are not in the model (it has {sorted(model.peft_config)})."
            )
        model.base_model.set_adapter(previous + [name])
        if previous:
            model.base_model.set_requires_grad(previous, requires_grad=False)
        self.previous_adapters = previous
        # The reference is the model as it is at the start of the month. A fresh adapter starts as a zero update, so
        # the earlier adapters alone are that model; an adapter that already holds an update (training continues, or a
        # non-zero initialisation) is kept as a frozen copy, as TRL does with its "ref" adapter.
        self.reference_adapters = previous
        if peft_config is None or not _starts_as_zero_update(peft_config):
            self.reference_adapters = previous + [_freeze_copy_of_adapter(model, name, REFERENCE_COPY)]
        logger.info("Training adapter %r on top of frozen %s.", name, previous or "nothing (bare base)")
        return model

    def _build_anchors(self, anchor_prompts) -> AnchorSet:
        """The anchors of `kl_anchor_kinds` (see the `anchor_prompts` argument), continued by the month t−1 model."""
        args = self.args
        if anchor_prompts is not None and not isinstance(anchor_prompts, Mapping):
            prompts, kinds = list(anchor_prompts), ["custom"] * len(anchor_prompts)
        else:
            given = dict(anchor_prompts or {})
            unknown = [kind for kind in given if kind not in ANCHOR_KINDS]
            if unknown:
                raise ValueError(f"`anchor_prompts` kinds must be among {list(ANCHOR_KINDS)}, got {unknown}.")
            unselected = [kind for kind in given if kind not in args.kl_anchor_kinds]
            if unselected:
                raise ValueError(
                    f"`anchor_prompts` gives prompts of kind(s) {unselected}, which `kl_anchor_kinds="
                    f"{args.kl_anchor_kinds}` does not select; add them there."
                )
            prompts, kinds = [], []
            for kind in args.kl_anchor_kinds:
                chosen = list(given[kind]) if kind in given else self._default_anchor_prompts(kind)
                prompts += chosen
                kinds += [kind] * len(chosen)
            if not prompts:
                raise ValueError(
                    f"The retention KL has no anchor prompt: the kinds {args.kl_anchor_kinds} gave none (see the log); "
                    "add a kind to `kl_anchor_kinds` or pass `anchor_prompts`."
                )
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's tokenizer
        anchors = AnchorSet(prompts, tokenizer, max_length=args.kl_max_anchor_length, kinds=kinds)
        reference = self._reference_model()
        # The same prompts' boundary answers (same-shape variants), by the same model: not generated twice
        boundary_model, boundary_answers = self._boundary_answers or (None, None)
        # Continued when first needed: `_init_training_state` generates those the month's steps will draw
        anchors.continue_with(
            reference,
            args.kl_anchor_max_new_tokens,
            batch_size=args.anchor_generation_batch_size,
            show_progress=not args.disable_tqdm,
            known=boundary_answers if boundary_model is not None and boundary_model is reference else None,
        )
        logger.info(
            "%d anchor sequences %s, continued by the month t-1 model when first drawn.",
            len(anchors),
            anchors.kind_counts(),
        )
        return anchors

    def off_scope_anchors(self) -> AnchorSet:
        """The retention KL's anchors (`kl_anchor_kinds`, `anchor_prompts`), continued by the month t−1 model: the
        trainer's own when the KL is on, else built the same way for the caller (not used in training). E.g. the
        protected data of a GeometryProjected adapter aimed where a month's style bleeds:
        `calibrate(trainer.model, {"bleed_region": trainer.off_scope_anchors().calibration_batches(), ...})`."""
        return self.anchors if self.anchors is not None else self._build_anchors(self._anchor_prompts)

    def _default_anchor_prompts(self, kind: str) -> list:
        args = self.args
        if kind == "general":
            return general_anchor_prompts()[: args.kl_max_general_anchors]
        if kind == "earlier_months":
            if self.rehearsal_buffer is None or len(self.rehearsal_buffer) == 0:
                logger.info("No earlier months' anchor prompts: no rehearsal buffer, or an empty one.")
                return []
            count = min(args.kl_max_rehearsal_anchors, len(self.rehearsal_buffer))
            rows = self.rehearsal_buffer.sample(count, seed=args.seed)
            return [row["prompt"] for row in rows if row.get("prompt")]
        if kind == "same_shape":
            if "prompt" not in self.month_dataset.column_names:
                logger.info("No same-shape anchor prompts: the month's dataset has no `prompt` column.")
                return []
            # the month's own rows only (not the rehearsed ones, not evaluation items)
            month_prompts = self.month_dataset["prompt"]
            return shape_variant_prompts(month_prompts, max_prompts=args.kl_max_shape_anchors, seed=args.seed)
        raise ValueError(f"Unknown anchor kind {kind!r}; allowed: {list(ANCHOR_KINDS)}.")

    def _refresh_anchors_if_due(self) -> None:
        """`kl_anchor_refresh_steps = k > 0`: at global steps k, 2k, ... (once per step, before its first micro-batch)
        regenerate the anchors' continuations from the current policy. Keyed on the global step only."""
        every = self.args.kl_anchor_refresh_steps
        if every <= 0 or self.anchors is None:
            return
        due = (self.state.global_step // every) * every
        if due == 0 or due == self._anchors_refreshed_at:
            return
        self.anchors.refresh_continuations(
            self._policy(),
            self.args.kl_anchor_max_new_tokens,
            batch_size=self.args.anchor_generation_batch_size,
            indices=self._planned_anchor_draws(due, min(due + every, self.state.max_steps)),
        )
        self._anchors_refreshed_at = due
        logger.info("Anchor continuations regenerated from the policy at step %d.", self.state.global_step)

    def _add_boundary_rows(self, train_dataset: Dataset, reference, processing_class, args) -> Dataset:
        """`train_dataset` plus up to `boundary_pairs` boundary rows (see `ContinualDPOConfig.boundary_pairs`), with
        the flag column `is_boundary`. The chosen answers are `reference`'s greedy ones, generated here, once."""
        month = self.month_dataset
        if "prompt" not in month.column_names or len(month) == 0:
            logger.warning("No boundary rows: the month's dataset has no `prompt` column (or no rows).")
            return train_dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        month_prompts = month["prompt"]
        conversational = not isinstance(month_prompts[0], str)
        picked = [(v.prompt, v.source) for v in shape_variants(month_prompts, args.boundary_pairs, seed=args.seed)]
        rng = random.Random(f"{args.seed}/boundary")
        general = general_anchor_prompts()
        rng.shuffle(general)
        for prompt in general[: max(0, args.boundary_pairs - len(picked))]:  # topped up with general prompts
            picked.append(
                ([{"role": "user", "content": prompt}] if conversational else prompt, rng.randrange(len(month)))
            )
        # tokenized as TRL tokenizes a row: a string prompt as plain text, a conversation through the chat template
        ids = [encode_prompt(tokenizer, prompt, use_chat_template=False) for prompt, _ in picked]
        answers = greedy_continuations(
            reference,
            tokenizer,
            ids,
            args.boundary_max_new_tokens,
            batch_size=args.anchor_generation_batch_size,
            show_progress=not args.disable_tqdm,
            desc="Boundary answers",
        )
        self._boundary_answers = (reference, {tuple(prompt_ids): answer for prompt_ids, answer in zip(ids, answers)})
        defaults = {REHEARSAL_FLAG: 0, "source": "boundary"}
        rows, skipped, cut, unfinished = [], 0, 0, 0
        for (prompt, source), answer in zip(picked, answers):
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            finished = len(answer) < args.boundary_max_new_tokens or answer[-1] == tokenizer.eos_token_id
            if not finished:
                # Cut off by the budget: its whole sentences only (the chat template closes the turn after the
                # chosen answer, so a cut answer would teach the model to stop mid-sentence)
                whole = whole_sentences(text)
                if whole is None:
                    unfinished += 1
                    continue
                cut += whole != text
                text = whole
            row = dict(month[source])
            rejected = row["chosen"]
            chosen = [{"role": "assistant", "content": text}] if isinstance(rejected, list) else text
            if not text or chosen == rejected:
                skipped += 1
                continue
            row.update(prompt=prompt, chosen=chosen, rejected=rejected)
            rows.append({column: row.get(column, defaults.get(column)) for column in train_dataset.column_names})
        if skipped:
            logger.info("%d boundary rows skipped: the reference's answer was empty or the month's own.", skipped)
        if cut or unfinished:
            logger.info(
                "Boundary answers longer than boundary_max_new_tokens=%d: %d cut to their whole sentences, %d skipped "
                "(no complete sentence in the budget; raise it to keep them).",
                args.boundary_max_new_tokens,
                cut,
                unfinished,
            )
        self.boundary_rows = len(rows)
        if len(rows) < args.boundary_pairs / 2:  # the month trains with much less of the guard than it asked for
            logger.warning(
                "Only %d of boundary_pairs=%d boundary rows: %d answers had no complete sentence within "
                "boundary_max_new_tokens=%d, %d were empty or the month's own. Raise boundary_max_new_tokens to keep "
                "more.",
                len(rows),
                args.boundary_pairs,
                unfinished,
                args.boundary_max_new_tokens,
                skipped,
            )
        flags = [0] * len(train_dataset)
        if rows:
            boundary = Dataset.from_list(rows, features=train_dataset.features)
            validate_preference_dataset(boundary, "boundary")
            train_dataset = concatenate_datasets([train_dataset, boundary])
            flags += [1] * len(rows)
        logger.info(
            "Added %d boundary rows (off-scope prompt, the month t−1 model's answer over a month answer) to %d rows.",
            len(rows),
            len(flags) - len(rows),
        )
        return train_dataset.add_column(BOUNDARY_FLAG, flags)

    def _reference_model(self) -> torch.nn.Module:
        if self.ref_model is None:
            raise ValueError(
                "The retention KL needs the previous model: with full fine-tuning and `precompute_ref_log_probs=True` "
                "TRL drops it; pass a `ref_model` or use a PEFT adapter."
            )
        return self.accelerator.unwrap_model(self.ref_model)

    def _load_fisher(self) -> Optional[FisherState]:
        directory = Path(self.args.fisher_dir)
        if not (directory / FISHER_METADATA).exists() and not self.previous_adapters:
            logger.info("No stored Fisher in %s and no earlier month: the EWC penalty is off this month.", directory)
            return None
        state = FisherState.load(directory)
        coverage = check_fisher_matches(self.model, self.args.adapter_name, state)
        logger.info("EWC on %(covered)d adapted layers (%(uncovered)d without a stored Fisher).", coverage)
        return state

    # ------------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization, with too-long prompts reported by row instead of dropped silently. Its progress bars
        ("Tokenizing train dataset", ...) follow `disable_tqdm`, also where datasets' own bars are switched off (the
        `continual-dpo` command hides those of every other map)."""
        if not isinstance(dataset, Dataset) or args.max_length is None or "prompt_ids" in dataset.column_names:
            with _datasets_progress_bars(not args.disable_tqdm):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        indexed = dataset.add_column(_ROW_INDEX, list(range(len(dataset))))
        with _datasets_progress_bars(not args.disable_tqdm):
            prepared = super()._prepare_dataset(indexed, processing_class, args, dataset_name)
        kept = set(prepared[_ROW_INDEX])
        dropped = [index for index in range(len(dataset)) if index not in kept]
        if dropped:
            if not args.drop_long_prompts:
                shown = ", ".join(str(index) for index in dropped[:10]) + (" ..." if len(dropped) > 10 else "")
                raise PreferenceDataError(
                    f"{len(dropped)} row(s) of the {dataset_name} dataset have a prompt of at least "
                    f"max_length={args.max_length} tokens, leaving no response to train on: rows {shown}. Raise "
                    "`max_length`, shorten these prompts, or set `drop_long_prompts=True` to drop them (counted in "
                    "the log)."
                )
            logger.warning(
                "Dropped %d of %d rows of the %s dataset whose prompt fills max_length=%d (drop_long_prompts=True).",
                len(dropped),
                len(dataset),
                dataset_name,
                args.max_length,
            )
        return prepared.remove_columns(_ROW_INDEX)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (REHEARSAL_FLAG, BOUNDARY_FLAG, STORED_REF_CHOSEN, STORED_REF_REJECTED, _TRAIN_ROW):
            if column not in self._signature_columns:
                self._signature_columns = list(self._signature_columns) + [column]

    def _check_stored_reference(self, dataset: Dataset) -> Dataset:
        """Keep the stored reference log-probs of the rehearsed rows whose tokens match those they were computed on;
        the others (none stored: an older buffer; other tokens: the tokenization changed) fall back to the month
        t−1 model, with a warning. Drops the fingerprint column."""
        columns = ["prompt_ids", "chosen_ids", "rejected_ids", STORED_REF_CHOSEN, STORED_REF_REJECTED]
        columns += [STORED_REF_FINGERPRINT, REHEARSAL_FLAG, "source"]
        chosen, rejected = [], []
        missing: Counter = Counter()
        mismatched: Counter = Counter()
        for row in dataset.select_columns(columns).with_format(None):
            keep = False
            if row[REHEARSAL_FLAG]:
                if row[STORED_REF_CHOSEN] is None or row[STORED_REF_REJECTED] is None:
                    missing[row["source"]] += 1
                elif row[STORED_REF_FINGERPRINT] != reference_fingerprint(
                    row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], self.args
                ):
                    mismatched[row["source"]] += 1
                else:
                    keep = True
            chosen.append(row[STORED_REF_CHOSEN] if keep else None)
            rejected.append(row[STORED_REF_REJECTED] if keep else None)
        self.own_reference_rows = sum(value is not None for value in chosen)
        if missing:
            logger.warning(
                "%d rehearsed rows have no stored reference log-probs (%s): a buffer written before format version 2 "
                "or a month whose finish_month could not compute them. They are scored against the month t−1 model "
                "(as with rehearsal_reference='previous_month'), so they start at margin 0.",
                sum(missing.values()),
                dict(missing),
            )
        if mismatched:
            logger.warning(
                "%d rehearsed rows (%s) tokenize differently from when their reference log-probs were stored (another "
                "tokenizer, chat template, max_length, truncation_mode or ld_alpha): they are scored against the "
                "month t−1 model (as with rehearsal_reference='previous_month').",
                sum(mismatched.values()),
                dict(mismatched),
            )
        logger.info("%d rehearsed rows are scored against their own month's reference.", self.own_reference_rows)
        dataset = dataset.remove_columns([STORED_REF_CHOSEN, STORED_REF_REJECTED, STORED_REF_FINGERPRINT])
        dataset = dataset.add_column(STORED_REF_CHOSEN, chosen, feature=Value("float64"))
        return dataset.add_column(STORED_REF_REJECTED, rejected, feature=Value("float64"))

    # ------------------------------------------------------------------------------------------------- loss
    def _capture_hook(self, module, args, kwargs, output) -> None:
        # The policy's own DPO forward (fused LM head, with grad) carries the log-probs the rehearsal NLL needs.
        if self._capture_policy_output and torch.is_grad_enabled() and kwargs.get("fused_lm_head"):
            self._captured_policy_output = output
            self._capture_policy_output = False

    def compute_ref_log_probs(self, model, inputs):
        inputs = {
            key: value for key, value in inputs.items() if key not in (REHEARSAL_FLAG, BOUNDARY_FLAG, _TRAIN_ROW)
        }
        return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        flags = (inputs.pop(REHEARSAL_FLAG, None), inputs.pop(BOUNDARY_FLAG, None))
        stored = (inputs.pop(STORED_REF_CHOSEN, None), inputs.pop(STORED_REF_REJECTED, None))
        train_rows = inputs.pop(_TRAIN_ROW, None)
        is_rehearsal, is_boundary = flags
        mode = "train" if self.model.training else "eval"
        args = self.args
        if mode == "train":
            self._refresh_anchors_if_due()
        parts = None if return_outputs or mode != "train" else self._scoring_parts(inputs, flags)
        if parts is None:
            loss, outputs, output = self._dpo_loss(
                model, inputs, flags, stored, train_rows, mode, return_outputs, num_items_in_batch
            )
            scored = [(output, inputs, is_rehearsal)]
        else:
            loss, scored = self._dpo_loss_in_parts(model, inputs, flags, stored, train_rows, parts, num_items_in_batch)
            outputs = None

        if is_rehearsal is not None:
            self._retention_metrics[mode]["rehearsal/fraction"].append(self._gathered_mean(is_rehearsal.float()))
        if is_boundary is not None:
            self._retention_metrics[mode]["boundary/fraction"].append(self._gathered_mean(is_boundary.float()))
        if scored[0][0] is not None and "sft" in self.loss_types:
            nll = self._chosen_nll(scored)
            if nll is not None:
                self._retention_metrics[mode]["loss/sft"].append(self._gathered_mean(nll.detach()))
        if scored[0][0] is not None and is_rehearsal is not None and args.rehearsal_nll_coef > 0:
            nll = self._chosen_nll(scored, rehearsed_only=True)
            if nll is not None:
                loss = loss + args.rehearsal_nll_coef * nll
                self._retention_metrics[mode]["retention/rehearsal_nll"].append(self._gathered_mean(nll.detach()))
        if self.anchors is not None and mode == "train" and self.state.global_step % args.kl_every == 0:
            batch = self.anchors.sample(self._kl_batch_size(), self._anchor_rng(), self.accelerator.device)
            # The unwrapped policy: a second forward through DDP before one backward is not needed, its gradient
            # hooks fire either way.
            kl = anchor_kl(self.accelerator.unwrap_model(model), self._reference_model(), batch, args.kl_direction)
            loss = loss + args.kl_coef * kl
            self._retention_metrics[mode]["retention/kl"].append(self._gathered_mean(kl.detach()))
        if self.fisher is not None:
            with torch.set_grad_enabled(mode == "train"):
                penalty = ewc_penalty(model, args.adapter_name, self.fisher, fisher_mean=1.0)
            loss = loss + args.ewc_coef * penalty
            self._retention_metrics[mode]["retention/ewc"].append(self._gathered_mean(penalty.detach()))
        if args.health_check and mode == "train":
            # Gathered, so that every process refuses together (a NaN on one rank reaches all through the gradients).
            losses = self.accelerator.gather(loss.detach().float().reshape(1))
            finite = torch.isfinite(losses)
            if not finite.all():
                check_loss(losses[~finite][0].item(), self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def _dpo_loss(self, model, inputs, flags, stored, train_rows, mode, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss of a batch (or part of one) with each row's reference: its own month's stored log-probs for
        rehearsed rows, the month t−1 model's otherwise (those of the month's own rows kept for `finish_month`).
        Returns `(loss, TRL's outputs or None, the policy's captured DPO forward or None)`."""
        (is_rehearsal, is_boundary), (stored_chosen, stored_rejected) = flags, stored
        own = None if stored_chosen is None else ~torch.isnan(stored_chosen)
        own_reference = own is not None and bool(own.any())
        keep_reference = self._keep_reference_logps and train_rows is not None and mode == "train"
        if own_reference:
            inputs = self._with_own_month_reference(inputs, stored_chosen, stored_rejected, own)
        elif keep_reference and "ref_chosen_logps" not in inputs:
            # The reference forward TRL would run inline, through its `compute_ref_log_probs` (as for the batches with
            # own-month rows above), so that its per-row values can be kept for `finish_month`.
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model, inputs)
            inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        if keep_reference:
            self._keep_month_reference_logps(inputs, train_rows, is_rehearsal, is_boundary)
        self._capture_policy_output = self._needs_policy_output and mode == "train"
        self._captured_policy_output = None
        precompute = self.precompute_ref_logps
        # TRL then reads the reference columns of the batch
        self.precompute_ref_logps = precompute or own_reference or "ref_chosen_logps" in inputs
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.precompute_ref_logps = precompute
            self._capture_policy_output = False
        loss, outputs = result if return_outputs else (result, None)
        output, self._captured_policy_output = self._captured_policy_output, None
        if self._needs_policy_output and mode == "train" and output is None:
            raise RuntimeError(
                "The policy's DPO forward was not captured (the `fused_lm_head` forward-hook seam, see `TRL_SEAMS` in "
                f"peft_selective.continual.trainer): TRL {trl.__version__} no longer calls the model with "
                "`fused_lm_head=True`, so the rehearsal NLL / logged SFT term cannot be computed. Pin a TRL release the "
                "seam tests pass on (tests/continual/test_trl_seams.py)."
            )
        return loss, outputs, output

    def _scoring_parts(self, inputs, flags) -> Optional[list[torch.Tensor]]:
        """The batch's month rows and its rehearsed and boundary rows, as two parts to score apart, when that is exact
        (see `score_retention_rows_apart`) and leaves fewer padded positions than one forward; else `None`."""
        if not self.args.score_retention_rows_apart or self.accelerator.num_processes > 1:
            return None  # TRL gathers its metrics once per forward: every process must run as many
        if not set(self.loss_types) <= _PART_SEPARABLE_LOSSES or self.aux_loss_enabled or self.use_weighting:
            return None
        retention = None
        for flag in flags:
            if flag is not None:
                retention = flag.bool() if retention is None else retention | flag.bool()
        if retention is None or bool(retention.all()) or not bool(retention.any()):
            return None
        parts = [(~retention).nonzero().flatten(), retention.nonzero().flatten()]
        mask = inputs["attention_mask"]
        if sum(_padded_positions(mask, part) for part in parts) >= mask.numel():
            return None
        return parts

    def _dpo_loss_in_parts(self, model, inputs, flags, stored, train_rows, parts, num_items_in_batch=None):
        """The DPO loss of a training batch scored in `parts` (one forward each, each padded to its own longest pair):
        each part's loss weighted by its share of the pairs, and TRL's SFT term re-weighted from each part's token
        mean to the batch's; TRL's metrics of the step become the pair-weighted means of the parts'. Returns the loss
        and `[(captured policy forward, part inputs, part rehearsal flags)]`."""
        pairs = inputs["input_ids"].shape[0] // 2
        shares = [len(part) / pairs for part in parts]
        metrics = self._metrics["train"]
        logged = {key: len(values) for key, values in metrics.items()}
        loss, scored = 0.0, []
        for part, share in zip(parts, shares):
            part_inputs = _batch_rows(inputs, part)
            part_flags = tuple(None if flag is None else flag[part.to(flag.device)] for flag in flags)
            part_stored = tuple(None if value is None else value[part.to(value.device)] for value in stored)
            part_rows = None if train_rows is None else train_rows[part.to(train_rows.device)]
            part_loss, _, output = self._dpo_loss(
                model, part_inputs, part_flags, part_stored, part_rows, "train", num_items_in_batch=num_items_in_batch
            )
            loss = loss + part_loss * share
            scored.append((output, part_inputs, part_flags[0]))
        if "sft" in self.loss_types:
            # TRL's SFT term is a mean over the part's chosen tokens; the batch's is over all of them
            weight = self.loss_weights[self.loss_types.index("sft")]
            for (output, part_inputs, _), share in zip(scored, shares):
                part_mean = self._chosen_nll([(output, part_inputs, None)])
                if part_mean is not None:
                    loss = loss - weight * part_mean * share
            loss = loss + weight * self._chosen_nll(scored)
        for key, values in metrics.items():
            if len(values) == logged.get(key, 0) + len(parts):  # appended once per part: one value for the step
                merged = sum(share * value for share, value in zip(shares, values[-len(parts) :]))
                del values[-len(parts) :]
                values.append(merged)
        return loss, scored

    def _with_own_month_reference(self, inputs, stored_chosen, stored_rejected, own: torch.Tensor) -> dict[str, Any]:
        """The batch with `ref_chosen_logps` / `ref_rejected_logps` for every row: the stored values (the reference
        of the month that taught them) where `own`, the month t−1 model's elsewhere (TRL's precomputed columns, or
        TRL's `compute_ref_log_probs` on this batch)."""
        device = inputs["input_ids"].device
        own = own.to(device)
        stored_chosen, stored_rejected = stored_chosen.to(device), stored_rejected.to(device)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif bool(own.all()):
            ref_chosen, ref_rejected = stored_chosen, stored_rejected
        else:  # the reference forward on the other rows only (the stored values replace it on the own rows)
            reference = self.ref_model if self.ref_model is not None else self.model
            others = (~own).nonzero().flatten()
            sub_chosen, sub_rejected = self.compute_ref_log_probs(reference, _batch_rows(inputs, others))
            ref_chosen = sub_chosen.new_zeros(own.shape[0]).index_copy(0, others.to(sub_chosen.device), sub_chosen)
            ref_rejected = sub_rejected.new_zeros(own.shape[0]).index_copy(
                0, others.to(sub_rejected.device), sub_rejected
            )
        ref_chosen = torch.where(own, stored_chosen.to(ref_chosen.dtype), ref_chosen.to(device))
        ref_rejected = torch.where(own, stored_rejected.to(ref_rejected.dtype), ref_rejected.to(device))
        return {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}

    def _keep_month_reference_logps(self, inputs, train_rows, is_rehearsal, is_boundary) -> None:
        """Keep the batch's reference log-probs of the month's own rows (not rehearsed, not boundary rows) by training
        row index: the month's DPO reference of those rows, which `finish_month` stores with the rows it keeps."""
        month_row = torch.ones(train_rows.shape[0], dtype=torch.bool)
        for flag in (is_rehearsal, is_boundary):
            if flag is not None:
                month_row &= ~flag.cpu().bool()
        if not bool(month_row.any()):
            return
        chosen = inputs["ref_chosen_logps"].detach().float().cpu()
        rejected = inputs["ref_rejected_logps"].detach().float().cpu()
        for index in month_row.nonzero().flatten().tolist():
            self._seen_reference_logps[int(train_rows[index])] = (chosen[index].item(), rejected[index].item())

    def _add_health_callback(self) -> None:
        """Check the trained parameters' gradient norm on the first `health_check_steps` optimizer steps
        ([`~peft_selective.continual.health.TrainingHealthCallback`]); not under DeepSpeed/FSDP, whose gradients are sharded."""
        if self.args.health_check_steps == 0:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            logger.info("No gradient health check under DeepSpeed/FSDP (sharded gradients); the loss check stays.")
            return
        self.add_callback(TrainingHealthCallback(self.args.health_check_steps, allow_non_finite=self.args.fp16))

    def _kl_batch_size(self) -> int:
        return self.args.kl_batch_size or max(1, self.args.per_device_train_batch_size // 2)

    def _anchor_rng(self) -> random.Random:
        step, draws = self._anchor_draws
        draws = draws + 1 if step == self.state.global_step else 0
        self._anchor_draws = (self.state.global_step, draws)
        return self._anchor_rng_at(self.state.global_step, draws)

    def _anchor_rng_at(self, step: int, draw: int) -> random.Random:
        """The generator of the `draw`-th anchor batch of optimizer step `step` (one batch per micro-batch)."""
        return random.Random(f"{self.args.seed}/{self.args.process_index}/{step}/{draw}")

    def _planned_anchor_draws(self, start: int, stop: int) -> list[int]:
        """The anchors the retention KL will draw at the optimizer steps `start..stop-1`: one batch per micro-batch
        (`gradient_accumulation_steps` a step) on the steps it is computed (`kl_every`). A step with fewer micro-batches
        (an epoch's last) draws fewer; an unplanned draw is continued when drawn."""
        args = self.args
        indices = []
        for step in range(start, stop):
            if step % args.kl_every:
                continue
            for draw in range(args.gradient_accumulation_steps):
                indices += self.anchors.draw(self._kl_batch_size(), self._anchor_rng_at(step, draw))
        return indices

    @staticmethod
    def _chosen_nll(scored, rehearsed_only: bool = False) -> Optional[torch.Tensor]:
        """Mean per-token NLL of the chosen responses (of the rehearsed pairs only, with `rehearsed_only`: the
        rehearsal NLL) over the scored batch or parts `[(policy DPO forward, inputs, rehearsal flags)]`; `None`
        without such a token. Over the whole batch it is TRL's `"sft"` term, unweighted."""
        total, count = 0.0, 0
        for output, inputs, is_rehearsal in scored:
            shift_mask = inputs["completion_mask"][:, 1:]
            log_probs = output.log_probs[:, -shift_mask.size(1) :]
            chosen_logps, _ = log_probs.chunk(2, dim=0)
            chosen_mask, _ = shift_mask.chunk(2, dim=0)
            mask = chosen_mask.bool()
            if rehearsed_only:
                if is_rehearsal is None:
                    continue
                mask = mask & is_rehearsal.to(mask.device).bool().unsqueeze(1)
            total = total - chosen_logps[mask].sum()
            count += int(mask.sum())
        return total / count if count else None

    def _gathered_mean(self, value: torch.Tensor) -> float:
        value = value.to(self.accelerator.device)
        return self.accelerator.gather_for_metrics(value.reshape(-1)).float().mean().item()

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if not self._rehearsal_logged and self.model.training and self.rehearsal_summary:
            total = sum(self.rehearsal_summary.values())
            logs["rehearsal/rows"] = float(total - self.rehearsal_summary.get("new", 0))
            logs["rehearsal/mixed_ratio"] = logs["rehearsal/rows"] / max(total, 1)
            logs["rehearsal/own_reference_rows"] = float(self.own_reference_rows)
            self._rehearsal_logged = True
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""  # as TRL prefixes its own evaluation metrics
        metrics = self._retention_metrics[mode]
        logs.update({f"{prefix}{key}": sum(values) / len(values) for key, values in metrics.items() if values})
        metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------- resume
    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, resuming safely. `resume_from_checkpoint=True` takes the last *complete* checkpoint of
        `output_dir` (an incomplete one, interrupted while being written, is skipped with a warning); a named one
        must be complete. A run resumed from a checkpoint that already reached `max_steps` runs no further step (so it
        ends exactly as the uninterrupted run), and its `training_loss` is the mean of the losses the run logged."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        elif resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(
                    f"Checkpoint {resume_from_checkpoint} is incomplete ({problem}): the run that wrote it was "
                    "interrupted. Resume from the last complete checkpoint with `resume_from_checkpoint=True`, or "
                    "delete it."
                )
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self._trained = True
        if self._resumed_at_end:
            losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
            loss = sum(losses) / len(losses) if losses else math.nan
            output = TrainOutput(output.global_step, loss, {**output.metrics, "train_loss": loss})
        return output

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        self._resumed_at_end = resume_from_checkpoint is not None and self.state.global_step >= max_steps
        if self.anchors is not None:
            self._continue_planned_anchors(max_steps)
        if self._resumed_at_end:
            # transformers checks max_steps after a step only: resumed at it, it would run one more (seam
            # `init_training_state`). No epoch left: the loop runs none.
            logger.info(
                "Checkpoint %s already reached max_steps=%d: nothing left to train.", resume_from_checkpoint, max_steps
            )
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    def _continue_planned_anchors(self, max_steps: int) -> None:
        """Generate, in one go, the month t−1 model's continuations of the anchors the month's steps will draw (up to
        the first refresh, with `kl_anchor_refresh_steps`), not of every anchor (17 of 160 in an 18-step month). Planned
        from step 0 also on resume, so the generation batches, and so the continuations, are the uninterrupted
        run's."""
        every = self.args.kl_anchor_refresh_steps
        stop = max_steps if every <= 0 else min(max_steps, every)
        if self.state.global_step < stop:  # (else a refresh from the resumed policy comes first)
            generated = self.anchors.ensure_continued(self._planned_anchor_draws(0, stop))
            logger.info(
                "Continued the %d anchors (of %d) that the steps before %d draw.", generated, len(self.anchors), stop
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume this month's adapter only. `Trainer` would reload every adapter of the checkpoint and leave just the
        first active one (an earlier, frozen month); the earlier months are already loaded and never change."""
        policy = self._policy()
        if not isinstance(policy, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        name = self.args.adapter_name
        folder = Path(resume_from_checkpoint) / (name if name != "default" else "")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"Checkpoint {resume_from_checkpoint} has no weights for adapter {name!r} ({weights}); it was not "
                "written by this month's run. Delete it or pass the right `resume_from_checkpoint`."
            )
        result = set_peft_model_state_dict(policy, load_file(str(weights)), adapter_name=name)
        missing = [key for key in result.missing_keys if f".{name}" in key]
        if missing:
            raise ValueError(
                f"Checkpoint {weights} lacks {len(missing)} weights of adapter {name!r}, e.g. {missing[0]}."
            )
        policy.base_model.set_adapter(self.previous_adapters + [name])
        if self.previous_adapters:
            policy.base_model.set_requires_grad(self.previous_adapters, requires_grad=False)

    # ------------------------------------------------------------------------------------------------- month end
    def finish_month(self, month: str, overwrite: bool = False) -> dict[str, Any]:
        """End-of-month bookkeeping, after `train()`: keep a sample of this month's pairs in the rehearsal buffer and,
        with `fisher_dir` set, estimate this month's Fisher on its own rows and add it to the stored one.

        The rows kept for rehearsal are stored with their reference log-probs under this month's own DPO reference
        (the model at the start of the month), computed with TRL's `compute_ref_log_probs` on collated batches, so
        that later months can score them against it (`rehearsal_reference="own_month"`). This is a second commit of
        the buffer: a crash between the two leaves the month's rows without them (later months then fall back to
        their month t−1 model, with a warning) until `finish_month(month, overwrite=True)` is run again.

        With `overwrite=True` it can be repeated (e.g. after a crash in the middle of it): the month's buffer sample is
        replaced (the same rows: the sampling is seeded) and a Fisher that already covers the month is left as is.
        Returns a summary (`rehearsal_rows`, `rehearsal_reference_rows`, `fisher_examples`, `fisher_months`). Every
        process computes; only the main process writes.
        """
        if not self._trained:
            raise RuntimeError(
                f"finish_month({month!r}) was called before `train()` (or after a `train()` that failed): it records "
                "the month's trained adapter (its Fisher, its rehearsal rows' reference), which does not exist yet. "
                "Call `train()` first."
            )
        if self._finished_month not in (None, month):
            raise ValueError(
                f"This trainer already finished month {self._finished_month!r}: finishing its training again as "
                f"{month!r} would count it twice (rehearsal rows, Fisher). One trainer trains one month; to redo its "
                f"bookkeeping, call `finish_month({self._finished_month!r}, overwrite=True)`."
            )
        self._finished_month = month
        args = self.args
        summary: dict[str, Any] = {}
        if self.rehearsal_buffer is not None:
            if self.accelerator.is_main_process:
                info = self.rehearsal_buffer.add_month(
                    month,
                    self.month_dataset,
                    capacity_per_month=args.rehearsal_samples_per_month,
                    sampling=args.rehearsal_sampling,
                    stratify_by=args.rehearsal_stratify_by,
                    seed=args.seed,
                    overwrite=overwrite,
                )
                summary["rehearsal_rows"] = info.count
            self.accelerator.wait_for_everyone()
            if not self.accelerator.is_main_process:
                self.rehearsal_buffer.reload()
                summary["rehearsal_rows"] = self.rehearsal_buffer.month_info(month).count
            summary["rehearsal_reference_rows"] = self._store_reference_logps(month)
        if args.fisher_dir:
            summary.update(self._add_month_fisher(month, Path(args.fisher_dir), overwrite))
        return summary

    def _add_month_fisher(self, month: str, stored: Path, overwrite: bool) -> dict[str, Any]:
        """Estimate this month's Fisher and add it to the store `stored` (`fisher_examples`, `fisher_months`). The
        main process holds the store's lock from reading it to committing the sum, so no other process's month can
        slip in between (and be lost), and the month is counted once: a store that lists it is left as is."""
        main = self.accelerator.is_main_process
        lock = DirectoryLock(stored, f"finish_month {month}", "Fisher store") if main else contextlib.nullcontext()
        with lock:
            existing = FisherState.load(stored) if (stored / FISHER_METADATA).exists() else None
            self.accelerator.wait_for_everyone()  # every process has read the store before the main one changes it
            if existing is not None and month in existing.months:
                if not overwrite:
                    raise ValueError(f"The Fisher in {stored} already covers month {month!r}; pass `overwrite=True`.")
                return {"fisher_examples": existing.num_examples, "fisher_months": existing.months}
            if not isinstance(self._policy(), PeftModel):
                return {}
            state = estimate_fisher(
                self._policy(), self._fisher_batches(), self.args.adapter_name, month, not self.args.disable_tqdm
            )
            if existing is not None:
                state = existing.merged(state, decay=self.args.fisher_decay)
            if main:
                state.save(stored)
        self.accelerator.wait_for_everyone()
        return {"fisher_examples": state.num_examples, "fisher_months": state.months}

    def _policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _store_reference_logps(self, month: str) -> int:
        """Store the month's reference log-probs with its buffer rows; returns how many rows carry them."""
        buffer = self.rehearsal_buffer
        rows = buffer.rows(month)
        if not rows:
            return 0
        if self.ref_model is None:
            logger.warning(
                "No reference model is held (full fine-tuning with precompute_ref_log_probs=True drops it): the "
                "rehearsal rows of month %r are stored without reference log-probs, and later months score them "
                "against their month t−1 model.",
                month,
            )
            return buffer.month_info(month).reference_logps
        values = self._reference_logps_of_rows(
            rows, f"Reference log-probs (rehearsal rows of {month})", known=self._month_reference_logps()
        )
        if isinstance(self._policy(), PeftModel):
            description = f"the DPO reference of month {month!r}: the base with adapters {self.reference_adapters}"
        else:
            description = f"the DPO reference of month {month!r} ({type(self._reference_model()).__name__})"
        if self.accelerator.is_main_process:
            buffer.set_reference_logps(month, values, reference=description)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            buffer.reload()
        return buffer.month_info(month).reference_logps

    def _month_reference_logps(self) -> dict[str, tuple[float, float]]:
        """The month's own rows' reference log-probs the training already has, by `reference_fingerprint`: TRL's
        precomputed columns (`precompute_ref_log_probs=True`), or those kept from the training batches (gathered from
        every process). Rehearsed and boundary rows are not the month's and are left out."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset):
            return {}
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        flags = [column for column in (REHEARSAL_FLAG, BOUNDARY_FLAG) if column in dataset.column_names]
        if self.precompute_ref_logps and "ref_chosen_logps" in dataset.column_names:
            selected = dataset.select_columns(columns + flags + ["ref_chosen_logps", "ref_rejected_logps"])
            values = {
                index: (row["ref_chosen_logps"], row["ref_rejected_logps"])
                for index, row in enumerate(selected.with_format(None))
                if not any(row[flag] for flag in flags)
            }
        else:
            values = dict(self._seen_reference_logps)
            if self.accelerator.num_processes > 1:  # each process saw its own share of the batches
                for seen in gather_object([values]):
                    values.update(seen)
            if not values:
                return {}
        indices = sorted(values)
        known = {}
        for index, row in zip(indices, dataset.select(indices).select_columns(columns).with_format(None)):
            fingerprint = reference_fingerprint(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], self.args)
            known[fingerprint] = values[index]
        return known

    def _reference_logps_of_rows(
        self,
        rows: list[dict[str, Any]],
        desc: str = "Reference log-probs",
        known: Optional[Mapping[str, tuple[float, float]]] = None,
    ) -> list[Optional[dict[str, Any]]]:
        """TRL's reference log-probs (`compute_ref_log_probs` on batches of TRL's collator, as its precompute does) of
        buffer rows, tokenized as TRL tokenizes the training data; `None` for a row the tokenization drops. Rows whose
        `reference_fingerprint` is in `known` (`{fingerprint: (chosen, rejected)}`, the same reference's values from
        the training batches) take those; only the others are computed. A progress bar labelled `desc` unless
        `disable_tqdm`."""
        ignored = {"month", REFERENCE_LOGPS_KEY}
        dataset = Dataset.from_list([{k: v for k, v in row.items() if k not in ignored} for row in rows])
        dataset = dataset.add_column(_BUFFER_ROW, list(range(len(rows))))
        prepared = self._prepare_dataset(dataset, self.processing_class, self.args, "rehearsal")
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        values: list[Optional[dict[str, Any]]] = [None] * len(rows)
        tokenized, taken = [], 0
        for row in prepared.select_columns(columns + [_BUFFER_ROW]).with_format(None):
            fingerprint = reference_fingerprint(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], self.args)
            if known is not None and fingerprint in known:
                chosen_logp, rejected_logp = known[fingerprint]
                values[row[_BUFFER_ROW]] = {
                    "chosen": chosen_logp,
                    "rejected": rejected_logp,
                    "fingerprint": fingerprint,
                }
                taken += 1
            else:
                tokenized.append({**row, "fingerprint": fingerprint})
        if known is not None:
            logger.info(
                "Reference log-probs of %d rehearsal rows taken from the training, %d computed.",
                taken,
                len(tokenized),
            )
        if not tokenized:
            return values
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        try:
            starts = range(0, len(tokenized), batch_size)
            for start in tqdm(starts, desc=desc, disable=self.args.disable_tqdm, unit="batch"):
                chunk = tokenized[start : start + batch_size]
                batch = self.data_collator.collator([{column: row[column] for column in columns} for row in chunk])
                batch = {key: value.to(self.accelerator.device) for key, value in batch.items()}
                chosen, rejected = self.compute_ref_log_probs(self.ref_model, batch)
                for row, chosen_logp, rejected_logp in zip(chunk, chosen.tolist(), rejected.tolist()):
                    values[row[_BUFFER_ROW]] = {
                        "chosen": chosen_logp,
                        "rejected": rejected_logp,
                        "fingerprint": row["fingerprint"],
                    }
        finally:
            policy.train(was_training)
        return values

    def _fisher_batches(self) -> list[dict[str, torch.Tensor]]:
        """Chosen halves of collated batches of this month's own rows (rehearsed and boundary rows excluded)."""
        dataset = self.train_dataset
        if REHEARSAL_FLAG in dataset.column_names:
            dataset = dataset.filter(lambda row: not row[REHEARSAL_FLAG])
        if BOUNDARY_FLAG in dataset.column_names:
            dataset = dataset.filter(lambda row: not row[BOUNDARY_FLAG])
        dataset = dataset.select(range(min(self.args.fisher_num_examples, len(dataset))))
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        rows = [{column: row[column] for column in columns} for row in dataset]
        batch_size = self.args.per_device_train_batch_size
        batches = []
        for start in range(0, len(rows), batch_size):
            batch = self.data_collator.collator(rows[start : start + batch_size])
            half = batch["input_ids"].shape[0] // 2
            batches.append({key: batch[key][:half] for key in ("input_ids", "attention_mask", "completion_mask")})
        return batches
