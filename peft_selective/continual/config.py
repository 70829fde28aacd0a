"""Configuration of [`ContinualDPOTrainer`]: TRL's `DPOConfig` plus rehearsal and retention options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from trl import DPOConfig

from .anchors import ANCHOR_KINDS


#: The retention terms we recommend (`ContinualDPOConfig` fields): rehearsal scored against each pair's own month, the
#: KL to the month t−1 model on general, same-shape and earlier-month anchors, an SFT term on the chosen answers and
#: boundary pairs. The protocol-2 benchmark's `ours` arm (`benchmarks/forgetting.py`, results in
#: `benchmarks/results/forgetting.md`) measures this set; `ContinualDPOConfig(**RECOMMENDED_RETENTION, ...)` uses it.
#: The KL is computed on every second step at twice the weight of the earlier every-step 0.1: the same weight per anchor
#: over a month, at half the cost (`benchmarks/results/month_cost.md`).
RECOMMENDED_RETENTION: dict[str, Any] = {
    "rehearsal_ratio": 0.2,
    "rehearsal_reference": "own_month",
    "kl_coef": 0.2,
    "kl_every": 2,
    "kl_anchor_kinds": ["general", "same_shape", "earlier_months"],
    "sft_weight": 1.0,
    "boundary_pairs": 8,
}


@dataclass
class ContinualDPOConfig(DPOConfig):
    r"""
    Configuration class for [`ContinualDPOTrainer`]: every [`~trl.DPOConfig`] option, plus the ones below. All
    retention terms are off by default (the trainer then behaves like `DPOTrainer`, except that the reference of a
    model with earlier months' adapters is the month t−1 model). The recommended ones, chosen by measurement
    (`benchmarks/results/forgetting.md`), are `RECOMMENDED_RETENTION`: `ContinualDPOConfig(**RECOMMENDED_RETENTION,
    ...)`; the `continual-dpo` campaign trains with them by default. With `HfArgumentParser` they become command-line
    flags like the others.

    Parameters:
        > Adapters of a monthly campaign

        adapter_name (`str`, *optional*, defaults to `"default"`):
            Name of this month's adapter, created from the trainer's `peft_config` (or, without one, an adapter of
            the given `PeftModel` to keep training).
        previous_adapters (`list[str]`, *optional*):
            The adapters of months 1..t−1, frozen and active under the new one; they make up the DPO reference and
            the KL anchor model. Defaults to every other adapter of the given `PeftModel`.

        > Rehearsal

        rehearsal_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of the training rows drawn from the `rehearsal_buffer` (earlier months' pairs), mixed in before
            tokenization. `0.25` with 300 new rows gives 100 rehearsed rows. The mix is logged.
        rehearsal_samples_per_month (`int`, *optional*, defaults to `200`):
            Rows of this month kept in the buffer by [`ContinualDPOTrainer.finish_month`].
        rehearsal_sampling (`str`, *optional*, defaults to `"reservoir"`):
            How those rows are chosen: `"reservoir"` (uniform) or `"stratified"` (proportional per value of
            `rehearsal_stratify_by`).
        rehearsal_stratify_by (`str`, *optional*):
            Column to stratify on with `rehearsal_sampling="stratified"` (e.g. a task or topic column).
        rehearsal_nll_coef (`float`, *optional*, defaults to `0.0`):
            Weight of a negative log-likelihood term on the chosen responses of rehearsed rows (per token), logged as
            `retention/rehearsal_nll`.
        rehearsal_reference (`str`, *optional*, defaults to `"own_month"`):
            The DPO reference a rehearsed pair is scored against. `"own_month"`: the reference of the month that
            taught it (the model at the start of that month), whose log-probs
            [`ContinualDPOTrainer.finish_month`] stores with the buffer rows; the pair then starts this month at the
            margin its month gave it (loss `-logsigmoid(β · margin)`), so rehearsal pushes back only where this month
            erodes it. `"previous_month"`: the month t−1 model, like the month's new rows; every rehearsed pair then
            starts at margin 0 (loss log 2) and is trained again as if it were new: on real data that gave the earlier
            month a second round of training (and pushed a refusal sentence further down) rather than protection.
            Rows stored without log-probs (a buffer written before format version 2) or whose tokens differ from
            those the log-probs were computed on (another tokenizer, chat template, `max_length`, `truncation_mode`
            or `ld_alpha`) fall back to `"previous_month"`, with a logged warning. The month's new rows always use
            the month t−1 model. Logged as `rehearsal/own_reference_rows`.

        > Learning the month by generation

        sft_weight (`float`, *optional*, defaults to `0.0`):
            Adds TRL's `"sft"` loss term with this weight: `loss_type` becomes `loss_type + ["sft"]` and
            `loss_weights` gets `sft_weight` appended (the other weights default to 1.0). The term is the mean NLL
            per token of the batch's chosen responses, so the month's chosen answers are learned by generation, not
            only ranked above the rejected ones; logged as `loss/sft`. It covers every row of the batch, rehearsed
            rows included: on those it is one more keep term (like `rehearsal_nll_coef`). An explicit `"sft"` in
            `loss_type` with another weight is an error; the same weight is accepted (the config was already
            expanded, e.g. reloaded from its `to_dict()`).

        > Retention KL on anchor prompts

        kl_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the KL between the policy and the month t−1 model on anchor sequences (the prompts of
            `kl_anchor_kinds`, each with the month t−1 model's own continuation), logged as `retention/kl`.
        kl_anchor_kinds (`list[str]`, *optional*, defaults to `["general", "earlier_months"]`):
            Where the anchor prompts come from (see `peft_selective.continual.anchors`): `"general"` (the fixed general prompts),
            `"earlier_months"` (earlier months' prompts from the rehearsal buffer) and `"same_shape"` (prompts shaped
            like this month's training prompts but about other attributes, made by
            `peft_selective.continual.anchors.shape_variant_prompts` from the month's own rows: "What is the capital of Indonesia?"
            gives "What is the population of Indonesia?"; none, with a logged reason, when the prompts have no
            template word). The trainer's `anchor_prompts={kind: prompts}` replaces a kind's default prompts. No
            kind uses evaluation items (the trainer has none). A comma-separated string is accepted too.
        kl_max_shape_anchors (`int`, *optional*, defaults to `64`):
            At most this many same-shape anchor prompts (`"same_shape"` in `kl_anchor_kinds`).
        kl_every (`int`, *optional*, defaults to `1`):
            Compute the KL term every `kl_every` optimizer steps (its weight is not rescaled).
        kl_direction (`str`, *optional*, defaults to `"forward"`):
            `"forward"`: KL(month t−1 ‖ policy), which keeps everything the old model said likely; `"reverse"`:
            KL(policy ‖ month t−1).
        kl_batch_size (`int`, *optional*):
            Anchor sequences per KL term; defaults to half of `per_device_train_batch_size` (at least 1).
        kl_anchor_max_new_tokens (`int`, *optional*, defaults to `16`):
            Length of the month t−1 model's greedy continuation of each anchor (and of the policy's, with
            `kl_anchor_refresh_steps`); `0` compares the next-token distributions at the prompt's end only. Generated
            once, when training starts, for the anchors the month's steps will draw (in `benchmarks/month_cost.py`, the
            recommended recipe's KL on 9 of 18 steps with a batch of 2 draws 17 distinct anchors of its 160); the others
            when first read (`AnchorSet.sequences`, `calibration_batches`).
        kl_anchor_refresh_steps (`int`, *optional*, defaults to `0`):
            `0`: the anchors keep the month t−1 model's continuations, generated once. `k > 0`: every `k` optimizer
            steps (at global steps k, 2k, ...) the continuations are regenerated from the *current policy* (greedy,
            no gradient, in eval mode), and the KL is scored on the policy's own tokens; use it with
            `kl_direction="reverse"`, whose per-token KL on the policy's samples is the on-policy estimate of
            KL(policy ‖ month t−1). The schedule depends on the global step only; a run resumed from a checkpoint
            at a multiple of `k` regenerates exactly like the uninterrupted run, one resumed elsewhere regenerates at
            its first step from the policy it resumed. Needs `kl_anchor_max_new_tokens > 0`.
        kl_max_anchor_length (`int`, *optional*, defaults to `128`):
            Anchors longer than this (prompt + continuation) are cut from the left.
        anchor_generation_batch_size (`int`, *optional*, defaults to `32`):
            Sequences per batch when the anchors' continuations and the boundary rows' answers are generated (greedy,
            no gradient). Larger batches read the weights once for more sequences: on CPU all 160 of the bundled
            model's anchors took 41 s of CPU at 32 against 63 s at 8 (two `benchmarks/results/month_cost.md` runs
            before the anchors were continued only when drawn); lower it if the generation runs out of memory.
        kl_max_general_anchors (`int`, *optional*):
            Use only the first this many of the 32 general anchor prompts (default: all).
        kl_max_rehearsal_anchors (`int`, *optional*, defaults to `64`):
            At most this many earlier months' prompts (from the buffer) join the general anchor prompts.

        > Boundary pairs

        boundary_pairs (`int`, *optional*, defaults to `0`):
            Extra preference rows added to the month's training set (before tokenization; flagged by the column
            `is_boundary`, logged as `boundary/fraction`) that teach where the month ends. Prompt: an off-scope
            prompt, a same-shape variant of a month prompt (see `kl_anchor_kinds`), topped up with the general
            anchor prompts. Chosen: the month t−1 model's (the DPO reference's) own greedy answer to it, generated
            once when the trainer is built. Rejected: the chosen answer of the month row the variant was made from
            (for a general prompt, of a random month row): it carries the month's style, but its content answers
            another question, so the pair also teaches "answer the question asked", not only "keep the old style".
            The rows are scored against the month t−1 model like the month's new rows (also with
            `rehearsal_reference="own_month"`), are not kept in the rehearsal buffer and are left out of the Fisher.
        boundary_max_new_tokens (`int`, *optional*, defaults to `48`):
            Token budget of the month t−1 model's greedy answers used as the boundary rows' chosen responses. An
            answer still going at the budget keeps its whole sentences only
            (`peft_selective.continual.trainer.whole_sentences`), and one with no complete sentence in it is skipped
            (logged): the chat template ends the turn after the chosen answer, so a cut answer would teach the model
            to stop mid-sentence. Fewer rows than half of `boundary_pairs` is a warning: too small a budget takes the
            guard away (the README's demo section shows a month bleeding its style far more at 24 tokens).
        score_retention_rows_apart (`bool`, *optional*, defaults to `True`):
            Score a training batch's rehearsed and boundary rows in a forward of their own, padded to their own
            longest pair, and the month's rows in another, instead of padding all of them to the batch's longest. The
            loss is the same (each part's DPO loss weighted by its share of the pairs, the SFT term re-weighted to the
            batch's token mean; TRL's logged metrics are the pair-weighted means of the parts'): the retention rows'
            answers are often longer than the month's (a verbose month's rejected answers, the previous model's
            boundary answers), and padded together they lengthen every row of the batch, in time and in memory (on
            CPU, TRL's log-prob kernel allocates temporaries for every padded position). Used when it saves padded
            positions, on one process, with loss types whose loss is a mean over pairs (`sigmoid`, `hinge`, `ipo`,
            plus `sft`), without `use_weighting` or a router loss; otherwise the batch is scored in one forward.

        > Elastic weight consolidation

        ewc_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the EWC penalty `Σ F̃ ΔW²` on this month's update of the adapted layers, F̃ the stored diagonal
            Fisher of the earlier months normalised to mean 1 (see `peft_selective.continual.ewc`); logged as `retention/ewc`.
        fisher_dir (`str`, *optional*):
            Directory of the stored Fisher (`fisher.<hash>.safetensors`, committed by `fisher.json`; see
            `peft_selective.continual.ewc`). Read when `ewc_coef > 0`; [`ContinualDPOTrainer.finish_month`] adds this
            month's estimate and commits it back, holding the store's lock.
        fisher_num_examples (`int`, *optional*, defaults to `64`):
            Rows of the month's data used to estimate its Fisher.
        fisher_decay (`float`, *optional*, defaults to `1.0`):
            Factor applied to the stored Fisher before this month's is added (online EWC; `1.0` sums the months).
        ewc_fisher_dtype (`str`, *optional*, defaults to `"float32"`):
            The dtype the stored Fisher is held in during training (on the adapted layers' device): `"bfloat16"`
            halves its memory (a dense `(out, in)` tensor per adapted layer: 5.8 GB instead of 11.5 GB for gate/up of
            a 7B Llama) at about 3 significant digits per entry. It is stored on disk in fp32 either way.

        > Data checks

        drop_long_prompts (`bool`, *optional*, defaults to `False`):
            Rows whose prompt alone fills `max_length` leave no response to learn from. By default they raise an
            error naming them; with `True` they are dropped and the count is logged.

        > Model health (`peft_selective.continual.health`)

        health_check (`bool`, *optional*, defaults to `True`):
            Refuse to keep training a broken model: a non-finite training loss on any step, or a total gradient norm
            of the trained parameters that is 0 or non-finite on one of the first `health_check_steps` optimizer steps,
            raises [`~peft_selective.continual.health.ModelHealthError`] naming the measured value and what to try. Costs one gather of
            the loss per micro-batch and one gradient norm per checked step.
        health_check_steps (`int`, *optional*, defaults to `5`):
            Optimizer steps, from the start, whose gradients are checked (`0`: the gradient check is off, the loss
            check stays). The first steps are where a model broken at load time shows (a corrupted quantized base
            gave `grad_norm` 0 from step 1); skipped under DeepSpeed/FSDP (sharded gradients), and with fp16 only a
            zero norm is refused (the loss scaler skips non-finite steps on purpose).
    """

    adapter_name: str = field(default="default", metadata={"help": "Name of this month's adapter."})
    previous_adapters: Optional[list[str]] = field(
        default=None, metadata={"help": "Adapters of months 1..t−1 (default: every other adapter of the PeftModel)."}
    )
    rehearsal_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of training rows from the rehearsal buffer."}
    )
    rehearsal_samples_per_month: int = field(default=200, metadata={"help": "Rows kept per month in the buffer."})
    rehearsal_sampling: str = field(default="reservoir", metadata={"help": "'reservoir' or 'stratified'."})
    rehearsal_stratify_by: Optional[str] = field(default=None, metadata={"help": "Column for stratified sampling."})
    rehearsal_nll_coef: float = field(
        default=0.0, metadata={"help": "Weight of the NLL on rehearsed chosen responses."}
    )
    rehearsal_reference: str = field(
        default="own_month",
        metadata={
            "help": "DPO reference of rehearsed pairs: 'own_month' (stored log-probs of the month that taught them) "
            "or 'previous_month' (the month t−1 model)."
        },
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "Weight of TRL's 'sft' term (NLL of the chosen responses); 0: off."}
    )
    kl_coef: float = field(default=0.0, metadata={"help": "Weight of the KL to the month t−1 model on anchors."})
    kl_every: int = field(default=1, metadata={"help": "Compute the KL term every k optimizer steps."})
    kl_direction: str = field(default="forward", metadata={"help": "'forward' KL(old‖new) or 'reverse' KL(new‖old)."})
    kl_batch_size: Optional[int] = field(default=None, metadata={"help": "Anchor sequences per KL term."})
    kl_anchor_max_new_tokens: int = field(default=16, metadata={"help": "Continuation length of each anchor."})
    kl_max_anchor_length: int = field(default=128, metadata={"help": "Maximum anchor length in tokens."})
    anchor_generation_batch_size: int = field(
        default=32,
        metadata={"help": "Sequences per batch when anchor continuations and boundary answers are generated."},
    )
    kl_max_general_anchors: Optional[int] = field(default=None, metadata={"help": "General anchor prompts used."})
    kl_max_rehearsal_anchors: int = field(default=64, metadata={"help": "Earlier months' prompts used as anchors."})
    kl_anchor_kinds: list[str] = field(
        default_factory=lambda: ["general", "earlier_months"],
        metadata={"help": "Anchor prompt kinds: 'general', 'same_shape', 'earlier_months'."},
    )
    kl_max_shape_anchors: int = field(default=64, metadata={"help": "Same-shape anchor prompts used."})
    kl_anchor_refresh_steps: int = field(
        default=0, metadata={"help": "Regenerate the anchors' continuations from the policy every k steps (0: never)."}
    )
    boundary_pairs: int = field(
        default=0, metadata={"help": "Extra rows: off-scope prompt, the previous model's answer over the month's."}
    )
    boundary_max_new_tokens: int = field(default=48, metadata={"help": "Length of the boundary rows' chosen answers."})
    score_retention_rows_apart: bool = field(
        default=True,
        metadata={"help": "Score rehearsed and boundary rows in their own forward (same loss, less padding)."},
    )
    ewc_coef: float = field(default=0.0, metadata={"help": "Weight of the EWC penalty."})
    fisher_dir: Optional[str] = field(default=None, metadata={"help": "Directory of the stored Fisher."})
    fisher_num_examples: int = field(default=64, metadata={"help": "Rows used to estimate a month's Fisher."})
    fisher_decay: float = field(default=1.0, metadata={"help": "Decay of the stored Fisher (online EWC)."})
    ewc_fisher_dtype: str = field(
        default="float32", metadata={"help": "'float32', 'bfloat16' or 'float16': dtype of the Fisher in training."}
    )
    drop_long_prompts: bool = field(default=False, metadata={"help": "Drop (and count) prompts that fill max_length."})
    health_check: bool = field(
        default=True, metadata={"help": "Refuse a non-finite loss, or vanished gradients on the first steps."}
    )
    health_check_steps: int = field(
        default=5, metadata={"help": "Optimizer steps whose gradient norm is checked (0: none)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.rehearsal_reference not in ("own_month", "previous_month"):
            raise ValueError(
                f"`rehearsal_reference` must be 'own_month' or 'previous_month', got {self.rehearsal_reference!r}."
            )
        self._add_sft_term()
        if not 0.0 <= self.rehearsal_ratio < 1.0:
            raise ValueError(f"`rehearsal_ratio` must be in [0, 1), got {self.rehearsal_ratio}.")
        for name in ("kl_coef", "ewc_coef", "rehearsal_nll_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.kl_every < 1:
            raise ValueError(f"`kl_every` must be >= 1, got {self.kl_every}.")
        if self.anchor_generation_batch_size < 1:
            raise ValueError(f"`anchor_generation_batch_size` must be >= 1, got {self.anchor_generation_batch_size}.")
        if self.kl_direction not in ("forward", "reverse"):
            raise ValueError(f"`kl_direction` must be 'forward' or 'reverse', got {self.kl_direction!r}.")
        self._check_anchor_options()
        if self.rehearsal_sampling not in ("reservoir", "stratified"):
            raise ValueError(
                f"`rehearsal_sampling` must be 'reservoir' or 'stratified', got {self.rehearsal_sampling!r}."
            )
        if self.ewc_coef > 0 and not self.fisher_dir:
            raise ValueError("`ewc_coef > 0` needs `fisher_dir`: the directory of the earlier months' Fisher.")
        if self.ewc_fisher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"`ewc_fisher_dtype` must be 'float32', 'bfloat16' or 'float16', got {self.ewc_fisher_dtype!r}."
            )
        if not 0.0 <= self.fisher_decay <= 1.0:
            raise ValueError(f"`fisher_decay` must be in [0, 1], got {self.fisher_decay}.")
        if self.health_check_steps < 0:
            raise ValueError(f"`health_check_steps` must be >= 0, got {self.health_check_steps}.")

    def _check_anchor_options(self) -> None:
        """Validate (and normalise) the anchor-kind, refresh and boundary options."""
        kinds = self.kl_anchor_kinds
        if isinstance(kinds, str):  # e.g. "general,same_shape" from a command line or a YAML string
            kinds = [kind.strip() for kind in kinds.split(",") if kind.strip()]
        kinds = list(kinds)
        unknown = [kind for kind in kinds if kind not in ANCHOR_KINDS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"`kl_anchor_kinds` must be a non-empty list of distinct values among {list(ANCHOR_KINDS)}, got "
                f"{self.kl_anchor_kinds!r}" + (f" ({unknown} not allowed)." if unknown else ".")
            )
        self.kl_anchor_kinds = kinds
        for name in ("kl_max_shape_anchors", "kl_anchor_refresh_steps", "boundary_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.boundary_max_new_tokens < 1:
            raise ValueError(f"`boundary_max_new_tokens` must be >= 1, got {self.boundary_max_new_tokens}.")
        if self.kl_anchor_refresh_steps > 0 and self.kl_anchor_max_new_tokens <= 0:
            raise ValueError(
                f"`kl_anchor_refresh_steps={self.kl_anchor_refresh_steps}` regenerates the anchors' continuations, "
                "but `kl_anchor_max_new_tokens=0` gives them none: set `kl_anchor_max_new_tokens > 0` or the refresh to 0."
            )

    def _add_sft_term(self) -> None:
        """`sft_weight > 0`: append TRL's "sft" term to `loss_type` / `loss_weights` (see the docstring)."""
        if self.sft_weight < 0:
            raise ValueError(f"`sft_weight` must be >= 0, got {self.sft_weight}.")
        if self.sft_weight == 0:
            return
        loss_types = list(self.loss_type)
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(loss_types)
        if "sft" in loss_types:
            if loss_types.count("sft") == 1 and weights[loss_types.index("sft")] == self.sft_weight:
                return  # already expanded (e.g. a config rebuilt from its `to_dict()`)
            raise ValueError(
                f"`sft_weight={self.sft_weight}` adds the 'sft' loss term itself, but `loss_type={loss_types}` already "
                f"has it with weight(s) {[w for t, w in zip(loss_types, weights) if t == 'sft']}. Either drop 'sft' "
                "from `loss_type` (and its `loss_weights` entry), or set `sft_weight=0` and weigh it in `loss_weights`."
            )
        self.loss_type = loss_types + ["sft"]
        self.loss_weights = weights + [float(self.sft_weight)]
