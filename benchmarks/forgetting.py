"""Forgetting vs learning, protocol 2: what the model generates, at matched learning, with 95% intervals.

Protocol 1 (retired) called a month "learned" when the DPO implicit reward against the base had the right sign, which
any update in the right direction satisfies: it picked the smallest learning rates and showed months "learned" whose
greedy answers had not changed. Protocol 2 judges by behaviour (`peft_selective.evaluation`):

* **Months as data.** A month sequence is a JSON spec (`--months-spec`): per month, `train` / `val` / `test` JSONL
  files of TRL preference rows, optional `checks` (regex / JSON schema / `"module:function"`: what the month's style
  is) and `bleed_checks` (what counts as its style leaking elsewhere; default: the checks, else a `StyleSignature`
  fitted on the month's chosen vs rejected answers), and an optional `family` (the knowledge items of that kind are
  in scope for it). Without a spec the built-in sequence (`peft_selective.demo.months`: `safety`, `capitals`, `currency`) is
  written to `--work-dir` as such a spec and read back, so both paths are the same code.
* **Learning** of month t = its held-out prompts answered greedily right after month t, scored by its checks (all
  must pass) or, for a month without checks, by `agreement` (closer to the chosen than to the rejected answer).
* **Forgetting**, after the last month: `retention_behaviour` = score on each earlier month's held-out prompts minus
  the score right after that month (negative = lost); `bleed_rate` = share of off-scope answers (general prompts,
  the other months' held-out prompts, knowledge questions outside a month's `family`) that carry a month's style;
  `knowledge_mc` = multiple-choice log-likelihood accuracy on >= 150 country facts chosen after the months are known
  (no country of any month; checked against every training, test and anchor prompt); `knowledge_exact` = greedy
  exact match on a subset of them after answer extraction; `kl_to_base` = per-token KL to the base on general
  prompts. Beside the bar, the **style reference**: the base answering the exact-match questions in the style of the
  month they are in scope for (shown it by that month's training pairs), what a method could keep there without
  teaching new facts (`style_reference`).
* **Matched learning.** Each arm is trained once per (order, seed); its months' updates are then scaled after
  training by alpha (`--alphas`: the model after month t is base + alpha * (W_t - W_0), i.e. every month's update
  times alpha, exact for merged LoRA and for our stacked adapters), which traces a learning-vs-forgetting curve.
  Each of our arms is compared with PEFT LoRA all-linear at the learning LoRA reaches at alpha = 1, interpolated
  linearly per item between the two alphas around it on our curve.
* **Learning rates** are chosen per arm on the first month's *validation* prompts: the smallest rate of `--lrs`
  whose behavioural learning reaches `--learning-target` (else the one that learns most). Test prompts never choose.
* **Intervals**: percentile bootstrap over items (2000 resamples); every difference and share between two arms is a
  paired bootstrap on the same items. The verdict's shares are ours / LoRA's of: learning gained over the base,
  bleed above the base, knowledge lost from the base, earlier-month behaviour lost. `meets_bar`: learning share
  >= 0.95 and every loss share <= 0.20 (point estimates; the intervals are reported beside them).

Arms (`--methods`): `lora_all` (PEFT LoRA r16 all-linear with plain TRL `DPOTrainer`, merged after each month: what
users do today), `ours` (the recommended configuration: `ContinualDPOTrainer` + SelectiveMLP r16 with
`RECOMMENDED_RETENTION`), `ours_plain` (the same adapters without retention terms), one arm per retention mechanism
alone (`ours_rehearsal`, `ours_kl`, `ours_kl_shape`, `ours_sft`, `ours_boundary`), `ours_v1` (0.1.x's defaults) and
`ours_geometry` (`ours_kl_shape` on GeometryProjected gate/up, calibrated each month on general text, the earlier
months' chats and the bleed region: the month t-1 model's answers to the anchor prompts, each source weighing the same;
`ours_geometry_grad`: the same, each protected token weighted by the keep loss's gradient; `ours_geometry_all`: every
recommended term on that projection). `ours_lower_blocks` is `ours`'s training (reused, not repeated) with the
retention dial's per-block option: blocks 0-14 of 30 at half the scale of the others (`LOWER_BLOCKS_CLOSER`).

Usage:

    python benchmarks/forgetting.py                 # CPU default: lora_all + ours, order A, seed 0, alpha {0.5, 1}
    python benchmarks/forgetting.py --full --device cuda   # 3 months, 2 orders, 2 seeds, every arm, 4 alphas
    python benchmarks/forgetting.py --model tiny --steps 2 --n-test 4 ...   # smoke test (numbers mean nothing)
    python benchmarks/forgetting.py --render-only   # re-render the committed JSON

Every trained month and every evaluation is saved under `--work-dir`, so an interrupted run resumes where it stopped.
A work dir serves one set of months, knowledge items and generation settings (`work-dir.json`), and each run in it one
recipe (`runs/*/recipe.json`); a run that asks for others is refused rather than served stale results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


if __package__ in (None, ""):  # `python benchmarks/<name>.py`: import the `benchmarks` package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    load_average,
    load_frozen_base,
    machine_info,
    markdown_table,
    prefixed_log,
    report_header,
    runtime_note,
    short_month_dpo_options,
    write_results,
)
from benchmarks.methods import peft_config  # noqa: E402
from peft_selective.continual.config import RECOMMENDED_RETENTION  # noqa: E402
from peft_selective.demo.months import MONTH_CHECKS  # noqa: E402


log = prefixed_log("forgetting")

PROTOCOL = 2
BUILTIN_MONTHS = ("safety", "capitals", "currency")
#: The built-in months' checks (the styles they teach: `peft_selective.demo.months.MONTH_CHECKS`), each with the kind
#: of knowledge question in scope for it. Safety has no learning check: its pairs prefer a refusal on harmful prompts
#: and an answer on benign ones, which only the agreement score sees. Its bleed is refusing off-scope prompts.
BUILTIN_CHECKS: dict[str, dict[str, Any]] = {
    "safety": MONTH_CHECKS["safety"],
    "capitals": {**MONTH_CHECKS["capitals"], "family": "capital"},
    "currency": {**MONTH_CHECKS["currency"], "family": "currency"},
}
LEARNING_SHARE = 0.95
LOSS_SHARE = 0.20
METRICS = ("learning_behaviour", "retention_behaviour", "bleed_rate", "knowledge_mc", "knowledge_exact", "kl_to_base")


# --------------------------------------------------------------------------------------------------- the arms
@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    ours: bool
    trainer: str  # "plain": TRL DPOTrainer + merge each month; "continual": ContinualDPOTrainer, stacked adapters
    #: retention mechanisms switched on (see `continual_options`): "rehearsal", "kl", "shape_anchors", "sft",
    #: "boundary"; an empty tuple trains the same adapters with plain DPO
    mechanisms: tuple[str, ...] = ()
    calibrate: bool = False
    #: with `calibrate`: `GeometryProjectedConfig.calibration_weighting`
    calibration_weighting: str = "inputs"
    #: the arm whose cached training this arm reuses (trained once, evaluated twice): an arm that only changes how the
    #: trained months are scaled afterwards
    trained_as: Optional[str] = None
    #: per-block factors on top of alpha ("0-14:0.5,15-:1": `peft_selective.retention.layer_factor`), the retention
    #: dial's per-block option applied to every month's update
    layer_scales: Optional[str] = None
    #: the arm the verdict judges; fixed before any result is seen (never the best of the ablation on test items)
    recommended: bool = False


RECOMMENDED_MECHANISMS = ("rehearsal", "kl", "shape_anchors", "sft", "boundary")
#: the per-block dial of `ours_lower_blocks`, fixed before it was measured: the issue's example ("lower blocks kept
#: closer"), the lower half of SmolLM2-135M's 30 blocks at half the scale
LOWER_BLOCKS_CLOSER = "0-14:0.5,15-:1"
ARMS: dict[str, Arm] = {
    arm.key: arm
    for arm in (
        Arm("lora_all", "PEFT LoRA all-linear + TRL DPOTrainer", False, "plain"),
        Arm("ours", "ContinualDPOTrainer + SelectiveMLP r16, every retention mechanism (recommended)", True,
            "continual", RECOMMENDED_MECHANISMS, recommended=True),
        Arm("ours_plain", "ContinualDPOTrainer + SelectiveMLP r16, no retention", True, "continual"),
        Arm("ours_rehearsal", "ours_plain + rehearsal scored against each pair's own month", True, "continual",
            ("rehearsal",)),
        Arm("ours_kl", "ours_plain + KL to month t-1 on general and earlier-month anchors", True, "continual",
            ("kl",)),
        Arm("ours_kl_shape", "ours_kl + same-shape anchors (month prompts about other attributes)", True,
            "continual", ("kl", "shape_anchors")),
        Arm("ours_sft", "ours_plain + SFT term on the month's chosen answers", True, "continual", ("sft",)),
        Arm("ours_boundary", "ours_plain + boundary pairs (previous model's answer chosen off-scope)", True,
            "continual", ("boundary",)),
        Arm("ours_v1", "0.1.x defaults: rehearsal against the month t-1 model + KL (general, earlier months)", True,
            "continual", ("rehearsal_previous_month", "kl")),
        Arm("ours_geometry", "ours_kl_shape on GeometryProjected gate/up r16, calibrated on general text, earlier "
            "months and the bleed region (the anchors' answers)", True, "continual", ("kl", "shape_anchors"),
            calibrate=True),
        Arm("ours_geometry_grad", "ours_geometry with the subspace weighted by the keep loss's gradient", True,
            "continual", ("kl", "shape_anchors"), calibrate=True, calibration_weighting="keep_loss_gradient"),
        Arm("ours_geometry_all", "ours (every recommended term) on GeometryProjected gate/up, calibrated as "
            "ours_geometry_grad", True, "continual", RECOMMENDED_MECHANISMS, calibrate=True,
            calibration_weighting="keep_loss_gradient"),
        Arm("ours_lower_blocks", "ours with the lower half of the blocks (0-14 of the bundled model's 30) kept closer: "
            "their update at half the scale of the upper half's (the per-block retention dial)", True, "continual",
            RECOMMENDED_MECHANISMS, trained_as="ours", layer_scales=LOWER_BLOCKS_CLOSER),
    )
}  # fmt: skip
DEFAULT_LRS = {arm: [1e-4, 3e-4, 1e-3] for arm in ARMS}


def continual_options(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    """`ContinualDPOConfig` fields of an arm's retention mechanisms (all off for `ours_plain`)."""
    mechanisms = set(arm.mechanisms)
    rehearsal = {"rehearsal", "rehearsal_previous_month"} & mechanisms
    options: dict[str, Any] = {"rehearsal_ratio": args.rehearsal_ratio if rehearsal else 0.0}
    if "rehearsal_previous_month" in mechanisms:  # what 0.1.x did: rehearsed pairs restart at margin 0
        options["rehearsal_reference"] = "previous_month"
    if "kl" in mechanisms:
        options["kl_coef"] = args.kl_coef
        options["kl_every"] = args.kl_every
        if "shape_anchors" in mechanisms:
            options["kl_anchor_kinds"] = list(RECOMMENDED_RETENTION["kl_anchor_kinds"])
    if "sft" in mechanisms:
        options["sft_weight"] = args.sft_weight
    if "boundary" in mechanisms:
        options["boundary_pairs"] = args.boundary_pairs
    return options


def geometry_mechanisms(arm: Arm) -> list[str]:
    if not arm.calibrate:
        return []
    return ["geometry_bleed_region"] + (["keep_loss_gradient"] if arm.calibration_weighting != "inputs" else [])


def arm_mechanisms(arm: Arm) -> list[str]:
    """What the ablation table lists for an arm: its retention terms, its projection, its per-block dial."""
    dial = [f"per-block dial {arm.layer_scales}"] if arm.layer_scales else []
    return list(arm.mechanisms) + geometry_mechanisms(arm) + dial


def needs_buffer(arm: Arm) -> bool:
    """Rehearsal draws from the buffer, and the KL's earlier-month anchors are the buffer's prompts."""
    return bool({"rehearsal", "rehearsal_previous_month", "kl"} & set(arm.mechanisms))


def peft_config_for(arm: Arm, args: argparse.Namespace):
    """The arm's adapter from the registry (`benchmarks.methods`), as the cached runs were trained: LoRA all-linear with
    `lora_alpha` = 2 x rank and no task type, GeometryProjected at its default alpha, SelectiveMLP with alpha = 2 x rank."""
    if arm.key == "lora_all":
        return peft_config("lora_all", args.rank, 2 * args.rank, task_type=None)
    if arm.calibrate:  # the same modules and alpha as SelectiveMLP: only the projection differs from ours_kl_shape
        return peft_config("geometry_mlp", args.rank, 2 * args.rank, calibration_weighting=arm.calibration_weighting)
    return peft_config("selective_mlp_lowrank", args.rank, 2 * args.rank)


# --------------------------------------------------------------------------------------------------- the months
def builtin_spec(args: argparse.Namespace, work_dir: Path) -> Path:
    """Write the built-in sequence as data (JSONL splits + spec) and return the spec's path."""
    from peft_selective.demo.months import monthly_sequence

    folder = work_dir / "months"
    folder.mkdir(parents=True, exist_ok=True)
    months = []
    sequence = monthly_sequence(BUILTIN_MONTHS, n_train=args.n_train + args.n_val, n_eval=args.n_test, seed=0)
    for name, splits in sequence:
        train = splits["train"]
        parts = {
            "train": train.select(range(args.n_train)),
            "val": train.select(range(args.n_train, args.n_train + args.n_val)),
            "test": splits["test"],
        }
        entry: dict[str, Any] = {"name": name, **BUILTIN_CHECKS.get(name, {})}
        for split, dataset in parts.items():
            path = folder / f"{name}.{split}.jsonl"
            buffer = io.BytesIO()
            dataset.to_json(buffer, lines=True)
            _write_if_changed(path, buffer.getvalue())
            entry[split] = path.name
        months.append(entry)
    spec = folder / "months.json"
    _write_if_changed(spec, json.dumps({"months": months}, indent=2).encode())
    return spec


def _write_if_changed(path: Path, data: bytes) -> None:
    """Leave a file that already holds `data` untouched: another run sharing the work dir may be reading it."""
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


@dataclass
class Month:
    name: str
    train: Any
    val: Any
    test: Any
    checks: list  # Check objects (learning: all must pass); empty: agreement
    bleed: list  # Check / StyleSignature objects (any one counts)
    family: Optional[str]


def load_months(spec_path: Path) -> dict[str, Month]:
    """Read a month-sequence spec; clear errors for missing files, bad rows and bad checks."""
    from datasets import load_dataset

    from peft_selective.continual.preference_data import validate_preference_dataset
    from peft_selective.evaluation import Check, StyleSignature

    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"Cannot read the month spec {spec_path}: {error}") from error
    if not isinstance(spec, dict) or not spec.get("months"):
        raise SystemExit(f"{spec_path}: expected {{'months': [{{'name', 'train', 'val', 'test', ...}}]}}.")
    months = {}
    for entry in spec["months"]:
        name = entry.get("name")
        if not name or name in months:
            raise SystemExit(f"{spec_path}: every month needs a unique 'name' (got {name!r}).")
        splits = {}
        for split in ("train", "val", "test"):
            if split not in entry:
                raise SystemExit(f"{spec_path}: month {name!r} has no {split!r} file.")
            path = (spec_path.parent / entry[split]).resolve()
            if not path.is_file():
                raise SystemExit(f"{spec_path}: month {name!r}: {path} does not exist.")
            splits[split] = load_dataset("json", data_files=str(path), split="train")
            validate_preference_dataset(splits[split], f"{name}/{split}")
            if "prompt" not in splits[split].column_names:
                raise SystemExit(f"{path}: protocol 2 needs an explicit 'prompt' column (it generates from it).")
        try:
            checks = [Check.from_spec(c) for c in entry.get("checks", [])]
            bleed = [Check.from_spec(c) for c in entry.get("bleed_checks", [])] or list(checks)
        except (ValueError, TypeError, ImportError) as error:
            raise SystemExit(f"{spec_path}: month {name!r}: {error}") from error
        if not bleed:
            train = splits["train"]
            try:
                bleed = [StyleSignature.fit(list(train["chosen"]), list(train["rejected"]))]
            except ValueError as error:
                raise SystemExit(f"{spec_path}: month {name!r}: {error}") from error
        months[name] = Month(name, splits["train"], splits["val"], splits["test"], checks, bleed, entry.get("family"))
    return months


def knowledge_probe(months: dict[str, Month], args: argparse.Namespace) -> list:
    """Country facts chosen after the months are known: none about a country the months use, none overlapping a
    training, validation, test or anchor prompt (`check_no_overlap` raises otherwise)."""
    from peft_selective.continual.anchors import general_anchor_prompts
    from peft_selective.demo.months import countries_in, knowledge_items
    from peft_selective.evaluation import check_no_overlap

    splits = [split for m in months.values() for split in (m.train, m.val, m.test)]
    collections = [list(split["prompt"]) for split in splits] + [general_anchor_prompts()]
    candidates = knowledge_items(n=None, seed=0, exclude_countries=countries_in(splits))
    items = []
    for item in candidates:  # a country name inside another's ("Guinea" in "Guinea-Bissau") still overlaps: drop it
        try:
            check_no_overlap([item], *collections)
        except ValueError:
            continue
        items.append(item)
        if len(items) == args.knowledge_items:
            break
    check_no_overlap(items, *collections)
    return items


def general_prompts(args: argparse.Namespace) -> list[str]:
    from peft_selective.evaluation.preference import generic_prompts

    return generic_prompts()[: args.general_prompts]


#: training pairs of the in-scope month shown to the base before each question by `style_reference`
STYLE_SHOTS = 4


def _as_turns(prompt, chosen) -> list[dict]:
    """A training pair as chat turns: its prompt (a string or a conversation) and its chosen answer."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    reply = chosen if isinstance(chosen, str) else chosen[-1]["content"]
    return turns + [{"role": "assistant", "content": reply}]


def in_style(answer: str, month: Month) -> bool:
    """Whether `answer` carries `month`'s style: its checks (all), else its bleed tests (any)."""
    if month.checks:
        return all(check.matches(answer) for check in month.checks)
    return _carries(answer, month)


def style_reference(base, tokenizer, months: dict[str, Month], probe, args) -> dict[str, Any]:
    """The base answering the exact-match knowledge questions in the style of the month they are in scope for.

    A knowledge question in scope for a month (its kind is the month's `family`: a capital question and the capitals
    month) is *supposed* to change style when that month is learned, so what the base knows in that style bounds the
    exact-match knowledge a method can keep there without teaching new facts. No training: each in-scope question is
    asked after `STYLE_SHOTS` of that month's training pairs (prompt, chosen answer) as earlier turns; a question in
    scope for no month is answered as asked. Per item: exact match, and (in-scope items only) whether the answer
    carries the month's style, so a reader sees the shots worked (`score_style_reference`). A reference beside the
    bar, never part of it.
    """
    from peft_selective.evaluation import generate_answers

    exact_items = probe[: args.knowledge_exact]
    prompts = []
    for item, month in zip(exact_items, _style_owners(exact_items, months)):
        if month is None:
            prompts.append(item.question)
            continue
        shots = month.train.select(range(min(STYLE_SHOTS, len(month.train))))
        turns = [turn for row in shots for turn in _as_turns(row["prompt"], row["chosen"])]
        prompts.append(turns + [{"role": "user", "content": item.question}])
    answers = generate_answers(
        base, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
        disable_tqdm=True,
    )  # fmt: skip
    return score_style_reference({"shots": STYLE_SHOTS, "answers": answers}, months, probe, args)


def _style_owners(exact_items, months: dict[str, Month]) -> list[Optional[Month]]:
    """Per exact-match item, the month it is in scope for (its kind is the month's `family`), or None."""
    scope = {month.family: month for month in months.values() if month.family}
    return [scope.get(_item_kind(item)) for item in exact_items]


def score_style_reference(style: dict, months: dict[str, Month], probe, args) -> dict:
    """(Re)score the style reference's answers, as `score` does an evaluation's."""
    from peft_selective.evaluation import exact_match

    exact_items = probe[: args.knowledge_exact]
    owners = _style_owners(exact_items, months)
    answers = style["answers"]
    style["knowledge_exact"] = [float(exact_match(a, item)) for a, item in zip(answers, exact_items)]
    style["in_style"] = [float(in_style(a, m)) for a, m in zip(answers, owners) if m is not None]
    style["in_scope_items"] = sum(m is not None for m in owners)
    return style


# --------------------------------------------------------------------------------------------------- the work dir
#: the file of a work dir that records what its cached results were computed from (`work_dir_fingerprint`)
FINGERPRINT_FILE = "work-dir.json"
#: the options that every cached result depends on, beside the data (what each run trains with is its recipe.json)
FINGERPRINT_SETTINGS = ("model", "device", "max_length", "max_new_tokens", "eval_batch_size", "knowledge_exact")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def work_dir_fingerprint(spec_path: Path, probe, args: argparse.Namespace) -> dict[str, Any]:
    """What every cached result of a work dir (base evaluations, style reference, learning-rate runs, runs) depends
    on, beside each run's own recipe (`check_run_recipe`): the months (the spec's entries, each split file by the
    sha256 of its content), the knowledge items, the general prompts, and `FINGERPRINT_SETTINGS`. The months' checks
    are not part of it: they only score answers, and cached answers are scored again on every run (`score`)."""
    months = []
    for entry in json.loads(spec_path.read_text())["months"]:
        splits = {split: _sha256((spec_path.parent / entry[split]).read_bytes()) for split in ("train", "val", "test")}
        scoring = ("checks", "bleed_checks")
        months.append({**{key: value for key, value in entry.items() if key not in scoring}, **splits})
    items = [[item.question, item.answer, list(item.distractors), list(item.aliases)] for item in probe]
    return {
        "protocol": PROTOCOL,
        "months": months,
        "knowledge_items": _sha256(json.dumps(items).encode()),
        "general_prompts": _sha256(json.dumps(general_prompts(args)).encode()),
        **{key: getattr(args, key) for key in FINGERPRINT_SETTINGS},
    }


def check_work_dir(work: Path, fingerprint: dict[str, Any]) -> None:
    """Reuse a work dir's cached results only for the same data and settings: a run with other months, knowledge items
    or generation settings must not report numbers computed for the old ones. The first run records the fingerprint;
    a work dir filled before fingerprints existed is taken as it is, with a warning."""
    path = work / FINGERPRINT_FILE
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples become lists)
    if path.exists():
        stored = json.loads(path.read_text())
        changed = sorted(key for key in stored.keys() | fingerprint.keys() if stored.get(key) != fingerprint.get(key))
        if changed:
            raise SystemExit(
                f"{work} holds results computed with other {', '.join(changed)} than this run asks for; use another "
                "--work-dir (or move that one away) to compute them anew."
            )
        return
    if any(any(work.glob(pattern)) for pattern in ("base-*.json", "lr-*.json", "style-reference.json", "runs/*")):
        log(f"warning: {work} holds results from before {FINGERPRINT_FILE} existed; they are taken to match this run")
    path.write_text(json.dumps(fingerprint, indent=2))


# --------------------------------------------------------------------------------------------------- models
def load_base(args: argparse.Namespace):
    """The bundled SmolLM2-135M-Instruct (fp32), or with `--model tiny` a random 2-layer Llama with its tokenizer."""
    model, tokenizer = load_frozen_base(args.model, args.device)
    return model.eval(), tokenizer


def weight_delta(model, base_state: dict) -> dict:
    """W - W_0 of every base weight that changed. A `PeftModel`'s active adapters are merged for the reading and
    unmerged after it, so the difference is exactly what `merge_and_unload` would give."""
    import torch
    from peft import PeftModel

    def plain(name: str) -> str:  # PEFT's key of a base weight -> the base model's key
        return name.replace("base_model.model.", "", 1).replace(".base_layer", "")

    if isinstance(model, PeftModel):
        model.base_model.merge_adapter(list(model.base_model.active_adapters))
        try:
            state = {plain(k): v for k, v in model.state_dict().items()}
            delta = {k: (state[k] - base_state[k]).detach().cpu().clone() for k in base_state if k in state}
        finally:
            model.base_model.unmerge_adapter()
    else:
        state = model.state_dict()
        delta = {k: (state[k] - base_state[k]).detach().cpu().clone() for k in base_state if k in state}
    return {k: v for k, v in delta.items() if torch.count_nonzero(v) > 0}


def apply_delta(target, base_state: dict, delta: dict, alpha: float, layer_scales: Optional[str] = None) -> None:
    """target's weights := W_0 + alpha * delta (target is a copy of the base), each weight's delta times its block's
    factor in `layer_scales` too (`peft_selective.retention.layer_factor`; default: 1 everywhere)."""
    import torch

    from peft_selective.retention import layer_factor

    factor = layer_factor(layer_scales)

    with torch.no_grad():
        params = dict(target.named_parameters())
        params.update(dict(target.named_buffers()))
        for name, tensor in params.items():
            if name in base_state:
                tensor.copy_(base_state[name])
        for name, d in delta.items():
            params[name].add_(alpha * factor(name) * d.to(params[name].device, params[name].dtype))


# --------------------------------------------------------------------------------------------------- training
def dpo_args(args: argparse.Namespace, out: Path, lr: float, seed: int, config_class=None, **extra):
    from trl import DPOConfig

    options = short_month_dpo_options(
        out, args.steps, args.batch_size, lr, args.beta, args.max_length, args.device, seed
    )
    return (config_class or DPOConfig)(**options, **extra)


def calibration_sources(trainer, tokenizer, months: dict[str, Month], earlier: Sequence[str]) -> dict[str, list]:
    """GeometryProjected's protected data, as the campaign's: general reference text, the earlier months' chosen
    chats, and the bleed region (the month t-1 model's answers to the trainer's anchor prompts, answer positions
    only); `calibrate` weighs the sources the same."""
    from peft_selective.evaluation.preference import reference_text

    text = reference_text()
    chats = [
        tokenizer.apply_chat_template(list(row["prompt"]) + list(row["chosen"]), tokenize=False)
        for name in earlier
        for row in months[name].train
    ]
    return {
        "reference_text": [text[i : i + 1000] for i in range(0, 8000, 1000)],
        "earlier_months": chats,
        "bleed_region": trainer.off_scope_anchors().calibration_batches(),
    }


class Sequencer:
    """Trains one arm month after month from the base; `train_month` returns W_t - W_0 after month t."""

    def __init__(self, arm: Arm, args, base, tokenizer, months: dict[str, Month], lr: float, seed: int, out: Path):
        self.arm, self.args, self.tokenizer, self.months = arm, args, tokenizer, months
        self.lr, self.seed, self.out = lr, seed, out
        self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.model = copy.deepcopy(base)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.done: list[str] = []

    def train_month(self, name: str) -> tuple[dict, list[dict]]:
        if self.arm.trainer == "plain":
            logs = self._plain(name)
        else:
            logs = self._continual(name)
        self.done.append(name)
        return weight_delta(self.model, self.base_state), logs

    def _plain(self, name: str) -> list[dict]:
        from trl import DPOTrainer

        args = self.args
        trainer = DPOTrainer(
            model=self.model,
            args=dpo_args(args, self.out / name, self.lr, self.seed),
            train_dataset=self.months[name].train,
            processing_class=self.tokenizer,
            peft_config=peft_config_for(self.arm, args),
        )
        trainer.train()
        logs = trainer.state.log_history
        self.model = trainer.model.merge_and_unload()
        for p in self.model.parameters():
            p.requires_grad_(False)
        del trainer
        return logs

    def _continual(self, name: str) -> list[dict]:
        import peft_selective
        from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer

        args, arm = self.args, self.arm
        adapter = f"m{len(self.done) + 1}"
        config = dpo_args(
            args,
            self.out / adapter,
            self.lr,
            self.seed,
            config_class=ContinualDPOConfig,
            adapter_name=adapter,
            **continual_options(arm, args),
        )
        trainer = ContinualDPOTrainer(
            self.model,
            args=config,
            train_dataset=self.months[name].train,
            processing_class=self.tokenizer,
            peft_config=peft_config_for(arm, args),
            rehearsal_buffer=RehearsalBuffer(self.out / "buffer") if needs_buffer(arm) else None,
        )
        if arm.calibrate:
            sources = calibration_sources(trainer, self.tokenizer, self.months, self.done)
            previous = f"m{len(self.done)}" if self.done else None
            peft_selective.calibrate(
                trainer.model, sources, self.tokenizer, adapter_name=adapter, previous_adapter=previous,
                show_progress=False,
            )  # fmt: skip
        trainer.train()
        if needs_buffer(arm):
            trainer.finish_month(adapter)
        logs = trainer.state.log_history
        self.model = trainer.model
        del trainer
        return logs


# --------------------------------------------------------------------------------------------------- evaluation
def prompts_of(dataset) -> list:
    return [row["prompt"] for row in dataset]


def month_scores(generations: list[str], month: Month, split) -> list[float]:
    """Per held-out prompt: 1/0 whether every check passes, or the agreement score for a month without checks."""
    from peft_selective.evaluation import agreement

    if month.checks:
        return [float(in_style(g, month)) for g in generations]
    return [agreement(g, row["chosen"], row["rejected"]) for g, row in zip(generations, split)]


def evaluate(model, base, tokenizer, months: dict[str, Month], order: Sequence[str], t: int, probe, args) -> dict:
    """Per-item results after month `order[t]` (t = -1: the base). Right after a month that is not the last: that
    month's held-out prompts only (its learning). After the last month (and for the base): everything. The answers
    are kept beside their scores (`score`)."""
    from peft_selective.evaluation import generate_answers, multiple_choice_accuracy

    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, disable_tqdm=True)
    full = t == -1 or t == len(order) - 1
    names = list(order) if full else [order[t]]
    result: dict[str, Any] = {"months": {}}
    for name in names:
        split = months[name].test
        generations = generate_answers(model, tokenizer, prompts_of(split), **gen)
        result["months"][name] = {"generations": generations}
    if not full:
        return score(result, months, order, probe, args)
    exact_items = probe[: args.knowledge_exact]
    general = general_prompts(args)
    knowledge_answers = generate_answers(model, tokenizer, [item.question for item in exact_items], **gen)
    general_answers = generate_answers(model, tokenizer, general, **gen)
    result["knowledge_mc"], _ = multiple_choice_accuracy(model, tokenizer, probe, batch_size=args.eval_batch_size)
    result["knowledge_answers"] = knowledge_answers
    result["general_answers"] = general_answers
    result["kl_to_base"] = [0.0] * len(general) if model is base else per_prompt_kl(model, base, tokenizer, general)
    return score(result, months, order, probe, args)


def score(result: dict, months: dict[str, Month], order: Sequence[str], probe, args) -> dict:
    """(Re)compute an evaluation's scores from the answers it holds: each month's `scores` (its checks), and after
    the last month `knowledge_exact` and `bleed`. Cached evaluations are scored again on every run, so a check or a
    scorer that changed never reports its old numbers; what the answers themselves depend on is the work dir's
    fingerprint (`check_work_dir`)."""
    from peft_selective.evaluation import exact_match

    for name, entry in result["months"].items():
        entry["scores"] = month_scores(entry["generations"], months[name], months[name].test)
    if "knowledge_answers" in result:
        exact_items = probe[: args.knowledge_exact]
        answers = result["knowledge_answers"]
        result["knowledge_exact"] = [float(exact_match(a, item)) for a, item in zip(answers, exact_items)]
        result["bleed"] = bleed_scores(months, order, result, exact_items)
    return result


def bleed_scores(months, order, result, exact_items) -> list[float]:
    """Per off-scope answer, 1 when it carries the style of any month for which it is off-scope. Off-scope for month
    j: the general prompts, the other months' held-out prompts, and knowledge questions outside j's `family`."""
    kinds = [_item_kind(item) for item in exact_items]
    scores = []
    for answer in result["general_answers"]:
        scores.append(float(any(_carries(answer, months[j]) for j in order)))
    for answer, kind in zip(result["knowledge_answers"], kinds):
        scores.append(float(any(_carries(answer, months[j]) for j in order if months[j].family != kind)))
    for i in order:
        for answer in result["months"][i]["generations"]:
            scores.append(float(any(_carries(answer, months[j]) for j in order if j != i)))
    return scores


def _item_kind(item) -> str:
    question = item.question.lower()
    return "capital" if "capital" in question else "currency" if "currency" in question else "region"


def _carries(answer: str, month: Month) -> bool:
    return any(test.matches(answer) for test in month.bleed)


def per_prompt_kl(model, base, tokenizer, prompts) -> list[float]:
    from peft_selective.evaluation.preference import kl_to_reference

    return [kl_to_reference(model, base, tokenizer, [prompt], batch_size=1) for prompt in prompts]


# --------------------------------------------------------------------------------------------------- learning rates
def selection_month(months: dict[str, Month], order: Sequence[str]) -> Month:
    """The month learning rates are chosen on: the first of the order that declares checks (a crisp behaviour), else
    the first."""
    return next((months[name] for name in order if months[name].checks), months[order[0]])


def validation_answers(model, tokenizer, month: Month, args) -> list[str]:
    from peft_selective.evaluation import generate_answers

    return generate_answers(
        model, tokenizer, prompts_of(month.val), max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size, disable_tqdm=True,
    )  # fmt: skip


def validation_learning(answers: list[str], month: Month) -> float:
    scores = month_scores(answers, month, month.val)
    return sum(scores) / len(scores)


def choose_learning_rate(arm: Arm, args, base, tokenizer, months, order, work: Path) -> dict[str, Any]:
    """The smallest rate of the grid whose learning of the selection month, trained alone from the base and scored on
    its *validation* prompts, gains at least `--learning-target` over the base's score there (else the rate that
    gains most). A gain, not a level: a base that already half-satisfies a month must not make any rate "enough"."""
    month = selection_month(months, order)
    path = work / f"lr-{arm.key}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    answers = cached.setdefault("answers", {})  # scored again on every run, as the evaluations are (`score`)
    for key, held in answers.items():
        cached[key] = validation_learning(held, month)
    unscored = sorted(key for key in cached if key != "answers" and key not in answers)
    if unscored:
        log(f"warning: {path} holds validation scores without their answers ({', '.join(unscored)}): they are "
            "the checks' of when they were computed; move the file away to recompute them")  # fmt: skip
    if "base" not in cached:
        answers["base"] = validation_answers(base, tokenizer, month, args)
        cached["base"] = validation_learning(answers["base"], month)
        path.write_text(json.dumps(cached, indent=2))
    for lr in args.lrs[arm.key]:
        key = f"{lr:g}"
        if key in cached:
            continue
        log(f"{arm.key}: validation run at lr {key} on {month.name}")
        run = work / "runs" / f"lr-{arm.key}-{key}"
        sequencer = Sequencer(arm, args, base, tokenizer, months, lr, args.seeds[0], run)
        delta, _ = sequencer.train_month(month.name)
        evaluation_model = copy.deepcopy(base)
        apply_delta(evaluation_model, sequencer.base_state, delta, 1.0)
        answers[key] = validation_answers(evaluation_model, tokenizer, month, args)
        cached[key] = validation_learning(answers[key], month)
        path.write_text(json.dumps(cached, indent=2))
        del sequencer, evaluation_model
        gc.collect()
    base_score = cached["base"]
    grid = {lr: cached[f"{lr:g}"] for lr in args.lrs[arm.key]}
    reaching = sorted(lr for lr, learned in grid.items() if learned - base_score >= args.learning_target)
    chosen = reaching[0] if reaching else max(grid, key=lambda lr: (grid[lr], -lr))
    return {
        "month": month.name,
        "base": base_score,
        "grid": {f"{lr:g}": score for lr, score in sorted(grid.items())},
        "chosen": chosen,
        "reached_target": bool(reaching),
    }


# --------------------------------------------------------------------------------------------------- one run
def run_arm(arm: Arm, args, base, tokenizer, months, probe, order_key: str, seed: int, lr: float, work: Path) -> dict:
    """Train the arm through the order once, then evaluate every month at every alpha; cached on disk. An arm
    `trained_as` another reuses that arm's training (training it first if it is not cached) and keeps its own
    evaluations."""
    from safetensors.torch import load_file, save_file

    order = orders_of(months)[order_key]
    trained = ARMS[arm.trained_as] if arm.trained_as else arm
    train_dir = work / "runs" / f"{trained.key}-{order_key}-s{seed}"
    run_dir = work / "runs" / f"{arm.key}-{order_key}-s{seed}"
    for folder in (train_dir, run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    check_run_recipe(train_dir, trained, args, lr)
    if arm is not trained:
        check_run_recipe(run_dir, arm, args, lr)
    paths = [train_dir / f"delta-{t}.safetensors" for t in range(len(order))]
    if not all(path.exists() for path in paths):
        # A sequence is trained in one go: the trainer's state of a half-done sequence lives in memory only.
        for path in paths:
            path.unlink(missing_ok=True)
        sequencer = Sequencer(trained, args, base, tokenizer, months, lr, seed, train_dir / "train")
        for t, name in enumerate(order):
            log(f"{trained.key} order {order_key} seed {seed}: training {name} (lr {lr:g})")
            start = time.time()
            delta, month_logs = sequencer.train_month(name)
            losses = [e["loss"] for e in month_logs if "loss" in e]
            summary = {
                "train_seconds": round(time.time() - start, 1),
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
            (train_dir / f"train-{t}.json").write_text(json.dumps(summary))
            save_file({k: v.contiguous() for k, v in delta.items()}, str(paths[t]))
        del sequencer
    deltas = [load_file(str(path)) for path in paths]
    gc.collect()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    evaluation_model = copy.deepcopy(base)
    results: dict[str, Any] = {}
    for alpha in args.alphas:
        for t, delta in enumerate(deltas):
            path = run_dir / f"eval-a{alpha:g}-t{t}.json"
            if path.exists():
                results[f"{alpha:g}/{t}"] = score(json.loads(path.read_text()), months, order, probe, args)
                continue
            log(f"{arm.key} order {order_key} seed {seed}: evaluating alpha {alpha:g} after {order[t]}")
            apply_delta(evaluation_model, base_state, delta, alpha, arm.layer_scales)
            result = evaluate(evaluation_model, base, tokenizer, months, order, t, probe, args)
            path.write_text(json.dumps(result))
            results[f"{alpha:g}/{t}"] = result
    train = {order[t]: json.loads((train_dir / f"train-{t}.json").read_text()) for t in range(len(order))}
    return {"arm": arm.key, "order": order_key, "seed": seed, "lr": lr, "train": train, "evaluations": results}


def calibration_recipe(arm: Arm) -> Any:
    if not arm.calibrate:
        return False
    recipe = "general text, earlier months, bleed region; equal weights"
    return recipe if arm.calibration_weighting == "inputs" else f"{recipe}; weighted by {arm.calibration_weighting}"


def check_run_recipe(run_dir: Path, arm: Arm, args, lr: float) -> None:
    """A cached run is reused only if it was trained with the same recipe: an arm whose definition changed must not
    silently report the old arm's numbers. An arm `trained_as` another records that arm and its per-block dial."""
    if arm.trained_as:
        recipe: dict[str, Any] = {"trained_as": arm.trained_as, "layer_scales": arm.layer_scales}
    else:
        recipe = {
            "trainer": arm.trainer,
            "options": continual_options(arm, args) if arm.trainer == "continual" else {},
            "calibrate": calibration_recipe(arm),
            "lr": lr,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "beta": args.beta,
            "rank": args.rank,
        }
    path = run_dir / "recipe.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(recipe)):
            raise SystemExit(
                f"{run_dir} was trained with another recipe ({stored}) than arm {arm.key!r} now has ({recipe}); "
                "move that directory away (or use another --work-dir) to train this one."
            )
    elif any(run_dir.glob("delta-*.safetensors")):
        raise SystemExit(f"{run_dir} holds a run without a recipe.json (older code): move it away to retrain.")
    else:
        path.write_text(json.dumps(recipe, indent=2))


def orders_of(months: dict[str, Month]) -> dict[str, tuple[str, ...]]:
    """Order A is the spec's, B its reverse."""
    names = tuple(months)
    return {"A": names, "B": tuple(reversed(names))}


# --------------------------------------------------------------------------------------------------- aggregation
def item_values(run: dict, base_eval: dict, alpha: str, months_in_order: Sequence[str]) -> dict[str, list[float]]:
    """Per-item values of the six metrics for one run at one alpha (lists aligned across arms on the same run)."""
    T = len(months_in_order) - 1
    evals = run["evaluations"]
    final = evals[f"{alpha}/{T}"]
    learning = []
    for t, name in enumerate(months_in_order):
        learning += evals[f"{alpha}/{t}"]["months"][name]["scores"]
    retention = []
    for t, name in enumerate(months_in_order[:-1]):
        right_after = evals[f"{alpha}/{t}"]["months"][name]["scores"]
        retention += [a - b for a, b in zip(final["months"][name]["scores"], right_after)]
    return {
        "learning_behaviour": learning,
        "retention_behaviour": retention,
        "bleed_rate": final["bleed"],
        "knowledge_mc": [float(x) for x in final["knowledge_mc"]],
        "knowledge_exact": final["knowledge_exact"],
        "kl_to_base": final["kl_to_base"],
    }


def base_values(base_eval: dict, months_in_order: Sequence[str]) -> dict[str, list[float]]:
    learning = []
    for name in months_in_order:
        learning += base_eval["months"][name]["scores"]
    return {
        "learning_behaviour": learning,
        "bleed_rate": base_eval["bleed"],
        "knowledge_mc": [float(x) for x in base_eval["knowledge_mc"]],
        "knowledge_exact": base_eval["knowledge_exact"],
        "kl_to_base": base_eval["kl_to_base"],
    }


def concatenated(runs: list[dict], base_evals: dict, alpha: str, months: dict) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for run in sorted(runs, key=lambda r: (r["order"], r["seed"])):
        order = orders_of(months)[run["order"]]
        for metric, items in item_values(run, base_evals[run["order"]], alpha, order).items():
            values[metric] += items
    return values


def concatenated_base(runs: list[dict], base_evals: dict, months: dict) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for run in sorted(runs, key=lambda r: (r["order"], r["seed"])):
        for metric, items in base_values(base_evals[run["order"]], orders_of(months)[run["order"]]).items():
            values.setdefault(metric, []).extend(items)
    return values


def interpolate(values_by_alpha: dict[float, dict[str, list[float]]], target: float) -> tuple[float, dict, bool]:
    """alpha* where the learning curve reaches `target` (linear between the alphas around it, item by item), and the
    per-item values there. Returns (alpha*, values, reached)."""
    alphas = sorted(values_by_alpha)
    means = [sum(v["learning_behaviour"]) / len(v["learning_behaviour"]) for v in (values_by_alpha[a] for a in alphas)]
    if means[0] >= target:
        return alphas[0], values_by_alpha[alphas[0]], True
    for (a0, m0), (a1, m1) in zip(zip(alphas, means), zip(alphas[1:], means[1:])):
        if m0 < target <= m1:
            w = (target - m0) / (m1 - m0)
            v0, v1 = values_by_alpha[a0], values_by_alpha[a1]
            mixed = {k: [(1 - w) * x + w * y for x, y in zip(v0[k], v1[k])] for k in v0}
            return a0 + w * (a1 - a0), mixed, True
    best = alphas[max(range(len(alphas)), key=lambda i: means[i])]
    return best, values_by_alpha[best], False


def summarize(values: dict[str, list[float]]) -> dict[str, dict]:
    from peft_selective.evaluation import bootstrap_mean

    return {metric: bootstrap_mean(items).to_dict() for metric, items in values.items() if items}


#: the losses the bar holds to a fifth of LoRA's: (verdict key, what is lost, per-item loss)
BAR_LOSSES = (
    ("bleed_share", "bleed above the base", "bleed_rate", +1),
    ("knowledge_loss_share", "knowledge lost (MC log-likelihood)", "knowledge_mc", -1),
    ("knowledge_exact_loss_share", "knowledge lost (greedy exact match)", "knowledge_exact", -1),
    ("retention_loss_share", "earlier-month behaviour lost", "retention_behaviour", 0),
)


def _per_item_loss(model: dict, base: dict, metric: str, sign: int) -> list[float]:
    """+1: the metric's rise over the base is the loss (bleed); -1: its fall (knowledge); 0: the metric is already a
    change, a negative one a loss (earlier-month behaviour)."""
    if sign == 0:
        return [-x for x in model[metric]]
    return [sign * (m - b) for m, b in zip(model[metric], base[metric])]


def shares(ours: dict, lora: dict, base: dict) -> dict[str, Any]:
    """ours / LoRA of learning gained and of each loss (paired bootstrap), plus whether each loss meets the bar.

    A loss meets the bar when ours' mean loss is at most `LOSS_SHARE` times LoRA's. Where LoRA loses nothing (its mean
    loss <= 0, the share undefined), a fifth of nothing is nothing: ours meets it only by losing nothing either
    (mean loss <= 0)."""
    from peft_selective.evaluation import bootstrap_mean, paired_ratio

    learning = [
        [m - b for m, b in zip(model["learning_behaviour"], base["learning_behaviour"])] for model in (ours, lora)
    ]
    estimate = paired_ratio(*learning)
    result: dict[str, Any] = {"learning_share": None if estimate is None else estimate.to_dict(), "losses": {}}
    for key, label, metric, sign in BAR_LOSSES:
        ours_loss, lora_loss = _per_item_loss(ours, base, metric, sign), _per_item_loss(lora, base, metric, sign)
        estimate = paired_ratio(ours_loss, lora_loss)
        result[key] = None if estimate is None else estimate.to_dict()
        ours_mean, lora_mean = sum(ours_loss) / len(ours_loss), sum(lora_loss) / len(lora_loss)
        result["losses"][key] = {
            "label": label,
            "ours": bootstrap_mean(ours_loss).to_dict(),
            "lora": bootstrap_mean(lora_loss).to_dict(),
            "met": ours_mean <= LOSS_SHARE * max(lora_mean, 0.0) + 1e-12,
        }
    return result


def meets_bar(verdict: dict) -> bool:
    learning = verdict["learning_share"]
    if learning is None or learning["mean"] < LEARNING_SHARE:
        return False
    return all(loss["met"] for loss in verdict["losses"].values())


def aggregate(
    runs: list[dict], base_evals: dict, months: dict, alphas: Sequence[float], style: Optional[dict] = None
) -> dict[str, Any]:
    """The per-arm summaries, each arm of ours at LoRA's learning, the verdict and (with `style`, from
    `style_reference`) each arm's exact-match knowledge against the base answering in the months' styles."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    any_runs = next(iter(by_arm.values()))
    base = concatenated_base(any_runs, base_evals, months)
    report: dict[str, Any] = {"base": summarize(base), "arms": {}}
    curves = {}
    for arm, arm_runs in by_arm.items():
        curves[arm] = {alpha: concatenated(arm_runs, base_evals, f"{alpha:g}", months) for alpha in alphas}
        report["arms"][arm] = {
            "label": ARMS[arm].label,
            "mechanisms": arm_mechanisms(ARMS[arm]),
            "lr": sorted({r["lr"] for r in arm_runs}),
            "train": [r["train"] for r in arm_runs],
            "alphas": {f"{alpha:g}": summarize(curves[arm][alpha]) for alpha in alphas},
        }
    report["verdict"] = None
    if "lora_all" not in curves or 1.0 not in curves["lora_all"]:
        return report
    lora = curves["lora_all"][1.0]
    target = sum(lora["learning_behaviour"]) / len(lora["learning_behaviour"])
    report["matched_learning_target"] = target
    matched_exact: dict[str, list[float]] = {}
    for arm in curves:
        if not ARMS[arm].ours:
            continue
        alpha_star, values, reached = interpolate(curves[arm], target)
        entry = {"alpha": alpha_star, "reached_lora_learning": reached, **summarize(values)}
        entry.update(shares(values, lora, base))
        entry["meets_bar"] = reached and meets_bar(entry)
        report["arms"][arm]["matched"] = entry
        matched_exact[f"{arm} (matched)" if reached else f"{arm} (alpha {alpha_star:g}, short of LoRA's learning)"] = (
            values["knowledge_exact"]
        )
    recommended = next((arm for arm in curves if ARMS[arm].recommended), None)
    for arm in curves:
        entry = report["arms"][arm].get("matched")
        if recommended and arm != recommended and entry and not entry["reached_lora_learning"]:
            entry["recommended_at_this_learning"] = at_learning(
                curves[recommended], entry["learning_behaviour"]["mean"]
            )
    if style is not None:
        report["style_reference"] = style_comparison(style, matched_exact, lora["knowledge_exact"])
    # The verdict judges the recommended arm, fixed before any result; the ablation table shows the others, but picking
    # the best of them here would choose on the test items.
    judged = [arm for arm in curves if ARMS[arm].recommended]
    if judged:
        chosen = report["arms"][judged[0]]["matched"]
        report["verdict"] = {
            "judged": judged[0],
            "against": "lora_all",
            "alpha": chosen["alpha"],
            "reached_lora_learning": chosen["reached_lora_learning"],
            "learning_share": chosen["learning_share"],
            **{key: chosen[key] for key, *_ in BAR_LOSSES},
            "losses": chosen["losses"],
            "meets_bar": chosen["meets_bar"],
            "bar": {"learning_share_at_least": LEARNING_SHARE, "loss_shares_at_most": LOSS_SHARE},
        }
    return report


def at_learning(curve: dict[float, dict[str, list[float]]], learning: float) -> dict[str, Any]:
    """An arm's curve read at `learning` (item by item between the alphas around it): where another arm never
    reaches LoRA's learning, the recommended arm's global dial at *its* learning is the fair comparison."""
    alpha, values, _ = interpolate(curve, learning)
    reached = abs(sum(values["learning_behaviour"]) / len(values["learning_behaviour"]) - learning) < 1e-9
    # not reached: `learning` lies outside the curve (below its smallest alpha, or above its largest)
    return {"alpha": alpha, "reached": reached, **summarize(values)}


def style_comparison(style: dict, matched_exact: dict[str, list[float]], lora_exact: list[float]) -> dict[str, Any]:
    """The style reference's summary, and each arm's exact-match knowledge (`{row label: per-item values}`) minus it on
    the same items (paired; an arm's items are its runs' items one after the other, so the reference is repeated once
    per run)."""
    from peft_selective.evaluation import paired_difference

    reference = style["knowledge_exact"]

    def minus_reference(values: list[float]) -> dict:
        return paired_difference(values, reference * (len(values) // len(reference))).to_dict()

    return {
        "shots": style["shots"],
        "in_scope_items": style["in_scope_items"],
        **summarize({"knowledge_exact": reference, "in_style": style["in_style"]}),
        "minus_reference": {"lora_all (alpha 1)": minus_reference(lora_exact)}
        | {label: minus_reference(values) for label, values in matched_exact.items()},
    }


# --------------------------------------------------------------------------------------------------- rendering
def _ci(stat: Optional[dict], digits: int = 3) -> str:
    if not stat:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"Provenance: {report['provenance_note']}", ""] if report.get("provenance_note") else []
    lines += [
        f"Protocol {report['protocol']}: months {', '.join(s['months'])}; orders {', '.join(s['orders'])}; seeds "
        f"{s['seeds']}; {s['steps']} steps of {s['batch_size']} pairs a month; alphas {s['alphas']}; model "
        f"{s['model']} ({s['device']}). Mean [95% bootstrap interval] over items (and runs).",
        "",
        "Learning rates: each arm trained on the selection month alone, scored by behaviour on its validation "
        f"prompts; chosen: the smallest rate gaining at least {s['learning_target']} over the base:",
        "",
    ]
    rows = []
    for arm, grid in report["learning_rates"].items():
        if grid.get("fixed"):
            rows.append([arm, "-", "-", "not chosen: --fixed-lr", f"{grid['chosen']:g}"])
            continue
        cells = ", ".join(f"{lr}: {score:.2f}" for lr, score in grid["grid"].items())
        chosen = f"{grid['chosen']:g}" + ("" if grid["reached_target"] else " (target not reached)")
        rows.append([arm, grid["month"], f"{grid['base']:.2f}", cells, chosen])
    lines += [markdown_table(["arm", "month", "base", "validation learning per lr", "chosen"], rows), ""]
    names = {
        "learning_behaviour": "learning",
        "retention_behaviour": "earlier months kept (Δ)",
        "bleed_rate": "bleed",
        "knowledge_mc": "knowledge MC",
        "knowledge_exact": "knowledge exact",
        "kl_to_base": "KL to base",
    }
    header = ["arm", "alpha"] + [names[m] for m in METRICS]
    rows = [["base", "-"] + [_ci(report["base"].get(m)) if m != "retention_behaviour" else "-" for m in METRICS]]
    for arm, entry in report["arms"].items():
        for alpha, stats in entry["alphas"].items():
            rows.append([arm, alpha] + [_ci(stats.get(m)) for m in METRICS])
        if "matched" in entry:
            m = entry["matched"]
            label = f"{m['alpha']:.2f} (matched{'' if m['reached_lora_learning'] else ', not reached'})"
            rows.append([arm, label] + [_ci(m.get(k)) for k in METRICS])
    lines += ["Per arm and update scale alpha:", "", markdown_table(header, rows), ""]
    ablation = [(arm, entry["matched"]) for arm, entry in report["arms"].items() if "matched" in entry]
    if ablation:
        header = ["arm (mechanisms)", "alpha", "learning share"] + [label for _, label, *_ in BAR_LOSSES] + ["bar"]
        rows = []
        for arm, m in ablation:
            mechanisms = ", ".join(report["arms"][arm].get("mechanisms", [])) or "none"
            cells = [
                f"{_ci(m['losses'][key]['ours'])} vs {m['losses'][key]['lora']['mean']:.3f}"
                + ("" if m["losses"][key]["met"] else " ✗")
                for key, *_ in BAR_LOSSES
            ]
            alpha = f"{m['alpha']:.2f}" + ("" if m["reached_lora_learning"] else " (not reached)")
            rows.append([f"{arm} ({mechanisms})", alpha, _ci(m["learning_share"])] + cells + [
                "met" if m["meets_bar"] else "not met"])  # fmt: skip
        lines += [
            f"Ablation at matched learning (LoRA's learning at alpha 1: {report['matched_learning_target']:.3f}). "
            "Each loss: ours per item, mean [95% CI], vs LoRA's mean; ✗ = more than "
            f"{LOSS_SHARE} of LoRA's loss (where LoRA lost nothing: any loss). Losses are base minus model (bleed: "
            "model minus base; earlier months: the fall since right after that month).",
            "",
            markdown_table(header, rows),
            "",
        ]
    verdict = report.get("verdict")
    if verdict:
        rows = [["learning gained over the base (share)", _ci(verdict["learning_share"]), f">= {LEARNING_SHARE}", ""]]
        for key, label, *_ in BAR_LOSSES:
            loss = verdict["losses"][key]
            rows.append([
                label, f"{_ci(loss['ours'])} vs {_ci(loss['lora'])}", f"<= {LOSS_SHARE} x LoRA's",
                f"{_ci(verdict[key])}" + ("" if loss["met"] else " (not met)"),
            ])  # fmt: skip
        lines += [
            f"Verdict: the recommended arm `{verdict['judged']}` (fixed before the run, not the best of the ablation) "
            f"against `lora_all` at LoRA's learning ({report['matched_learning_target']:.3f}), ours at alpha "
            f"{verdict['alpha']:.2f}:",
            "",
            markdown_table(["criterion", "ours vs LoRA, mean [95% CI]", "bar", "share [95% CI]"], rows),
            "",
            f"**Meets the bar: {'yes' if verdict['meets_bar'] else 'no'}** (point estimates; n/a: LoRA has no such "
            "loss to take a share of, and then ours must lose nothing).",
        ]
    short = [(arm, entry["matched"]) for arm, entry in report["arms"].items()
             if "recommended_at_this_learning" in entry.get("matched", {})]  # fmt: skip
    if short:
        recommended = report["verdict"]["judged"] if report.get("verdict") else "the recommended arm"
        rows = []
        for arm, m in short:
            other = m["recommended_at_this_learning"]
            rows.append([f"{arm} (alpha {m['alpha']:.2f})"] + [_ci(m.get(k)) for k in METRICS])
            outside = "" if other["reached"] else ", the nearest: that learning is outside its curve"
            rows.append(
                [f"{recommended} (alpha {other['alpha']:.2f}{outside})"] + [_ci(other.get(k)) for k in METRICS]
            )
        lines += [
            "",
            f"Arms that never reach LoRA's learning, against `{recommended}` scaled to the same learning (interpolated "
            "per item between its alphas):",
            "",
            markdown_table(["arm"] + [names[m] for m in METRICS], rows),
        ]
    reference = report.get("style_reference")
    if reference:
        base_exact = report["base"]["knowledge_exact"]
        rows = [["base, as asked", _ci(base_exact), "-"]]
        rows.append([
            f"base in the months' styles ({reference['shots']} training pairs as earlier turns)",
            _ci(reference["knowledge_exact"]), "0",
        ])  # fmt: skip
        for name, difference in reference["minus_reference"].items():
            arm = name.split(" ")[0]
            stats = report["arms"][arm]["matched"] if arm != "lora_all" else report["arms"][arm]["alphas"]["1"]
            rows.append([name, _ci(stats["knowledge_exact"]), _ci(difference)])
        in_style = reference.get("in_style")
        lines += [
            "",
            "Reference, not part of the bar: exact-match knowledge against what the base knows *in the months' "
            f"styles*. {reference['in_scope_items']} of the exact-match questions are in scope for a month (their "
            "kind is its family), so learning that month is meant to change how they are answered; the base, shown "
            "the style by the month's own training pairs, answers them in style "
            f"{_ci(in_style) if in_style else 'n/a'} of the time. Its score is what a method that learns the style "
            "but teaches no new fact could keep:",
            "",
            markdown_table(["model", "knowledge exact", "minus the style reference (paired)"], rows),
        ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Learning (x) against each forgetting measure (y), one curve per arm over alpha; the base as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bleed_rate", "bleed (share off-scope)"), ("knowledge_mc", "knowledge MC accuracy"),
              ("knowledge_exact", "knowledge exact match (greedy)"),
              ("retention_behaviour", "earlier months kept (Δ)"), ("kl_to_base", "KL to base")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (metric, title) in zip(axes, panels):
        for arm, entry in report["arms"].items():
            alphas = sorted(entry["alphas"], key=float)
            xs = [entry["alphas"][a]["learning_behaviour"]["mean"] for a in alphas]
            ys = [entry["alphas"][a][metric]["mean"] for a in alphas]
            ax.plot(xs, ys, marker="o", label=arm)
            for a, x, y in zip(alphas, xs, ys):
                ax.annotate(f"α{a}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if metric in report["base"]:
            ax.plot(
                [report["base"]["learning_behaviour"]["mean"]], [report["base"][metric]["mean"]], "k*", label="base"
            )
        ax.set_xlabel("learning (behaviour)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Learning vs forgetting over the update scale alpha (protocol 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--months-spec", type=Path, default=None, help="JSON month-sequence spec (default: built-in).")
    p.add_argument("--methods", default="lora_all,ours", help=f"Comma-separated arms of {list(ARMS)}.")
    p.add_argument("--orders", default="A", help="A (the spec's order) and/or B (reversed), comma-separated.")
    p.add_argument("--seeds", default="0", help="Training seeds, comma-separated.")
    p.add_argument("--alphas", default="0.5,1.0", help="Post-hoc update scales (must include 1.0).")
    p.add_argument("--full", action="store_true", help="GPU protocol: every arm, orders A,B, seeds 0,1, 4 alphas.")
    p.add_argument("--lrs", default=None, help="Learning-rate grid for every arm (default: per arm, see DEFAULT_LRS).")
    p.add_argument(
        "--learning-target", type=float, default=0.5, help="Validation gain over the base the chosen lr must reach."
    )
    p.add_argument("--model", choices=["embedded", "tiny"], default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--rank", type=int, default=16)
    recommended = RECOMMENDED_RETENTION
    p.add_argument(
        "--rehearsal-ratio",
        type=float,
        default=recommended["rehearsal_ratio"],
        help="Share of rehearsed rows (arms with 'rehearsal').",
    )
    p.add_argument("--kl-coef", type=float, default=recommended["kl_coef"], help="Weight of the KL (arms with 'kl').")
    p.add_argument(
        "--kl-every", type=int, default=recommended["kl_every"], help="KL on every k-th step (arms with 'kl')."
    )
    p.add_argument(
        "--sft-weight", type=float, default=recommended["sft_weight"], help="Weight of the SFT term (arms with 'sft')."
    )
    p.add_argument(
        "--boundary-pairs",
        type=int,
        default=recommended["boundary_pairs"],
        help="Boundary pairs a month (arms with 'boundary').",
    )
    p.add_argument(
        "--fixed-lr",
        type=float,
        default=None,
        help="Train every arm of ours at this rate instead of choosing one on validation (ablations: one rate for "
        "all mechanisms; LoRA's rate is still chosen). Matching is done by alpha either way.",
    )
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=12)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--knowledge-items", type=int, default=160, help="Multiple-choice items (>= 150 for protocol 2).")
    p.add_argument("--knowledge-exact", type=int, default=40, help="Of those, answered greedily for exact match.")
    p.add_argument("--general-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "outputs" / "forgetting")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--render-only", action="store_true", help="Re-render <output-dir>/forgetting.json.")
    args = p.parse_args(argv)
    if args.full:
        args.methods, args.orders, args.seeds, args.alphas = ",".join(ARMS), "A,B", "0,1", "0.25,0.5,0.75,1.0"
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in ARMS]
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {list(ARMS)}")
    args.orders = [o for o in args.orders.split(",") if o]
    if any(o not in ("A", "B") for o in args.orders):
        p.error("--orders takes A and/or B")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.alphas = sorted(_floats(args.alphas))
    if 1.0 not in args.alphas:
        p.error("--alphas must include 1.0 (LoRA's learning there is the matched level)")
    grid = _floats(args.lrs) if args.lrs else None
    args.lrs = {arm: grid or DEFAULT_LRS[arm] for arm in args.methods}
    if args.knowledge_items < args.knowledge_exact:
        p.error("--knowledge-exact cannot exceed --knowledge-items")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        report = json.loads((args.output_dir / "forgetting.json").read_text())
        _publish(report, args.output_dir)
        return 0
    import datasets
    import torch
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_start = time.time(), load_average()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    spec = args.months_spec or builtin_spec(args, work)
    months = load_months(spec)
    base, tokenizer = load_base(args)
    probe = knowledge_probe(months, args)
    if len(probe) < 150 and args.model == "embedded":
        log(f"warning: {len(probe)} knowledge items; protocol 2 asks for at least 150")
    check_work_dir(work, work_dir_fingerprint(spec, probe, args))
    orders = orders_of(months)
    base_evals = {}
    for order_key in args.orders:
        path = work / f"base-{order_key}.json"
        if not path.exists():
            log(f"evaluating the base (order {order_key})")
            path.write_text(json.dumps(evaluate(base, base, tokenizer, months, orders[order_key], -1, probe, args)))
        base_evals[order_key] = score(json.loads(path.read_text()), months, orders[order_key], probe, args)
    learning_rates = {}
    for arm_key in args.methods:
        if args.fixed_lr is not None and ARMS[arm_key].ours:
            learning_rates[arm_key] = {"chosen": args.fixed_lr, "fixed": True}
            continue
        trained = ARMS[ARMS[arm_key].trained_as or arm_key]  # an arm reusing another's training uses its rate
        learning_rates[arm_key] = choose_learning_rate(trained, args, base, tokenizer, months, orders["A"], work)
        log(f"{arm_key}: lr {learning_rates[arm_key]['chosen']:g} (validation {learning_rates[arm_key]['grid']})")
    for arm_key in args.methods:
        if learning_rates[arm_key].get("fixed"):
            log(f"{arm_key}: lr {args.fixed_lr:g} (fixed by --fixed-lr)")
    runs = []
    for arm_key in args.methods:
        for order_key in args.orders:
            for seed in args.seeds:
                lr = learning_rates[arm_key]["chosen"]
                runs.append(run_arm(ARMS[arm_key], args, base, tokenizer, months, probe, order_key, seed, lr, work))
                gc.collect()
    sources = [Path(__file__), *sorted((REPO_ROOT / "peft_selective" / "evaluation").glob("*.py"))]
    report = report_header("forgetting", sources, machine_info(), load_start, load_average())
    report.update(
        protocol=PROTOCOL,
        settings={
            "months": list(months),
            "months_spec": str(spec),
            "orders": args.orders,
            "seeds": args.seeds,
            "alphas": args.alphas,
            "methods": args.methods,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "beta": args.beta,
            "rank": args.rank,
            "rehearsal_ratio": args.rehearsal_ratio,
            "kl_coef": args.kl_coef,
            "kl_every": args.kl_every,
            "sft_weight": args.sft_weight,
            "boundary_pairs": args.boundary_pairs,
            "fixed_lr": args.fixed_lr,
            "mechanisms": {arm: list(ARMS[arm].mechanisms) for arm in args.methods},
            "learning_target": args.learning_target,
            "n_train": args.n_train,
            "n_val": args.n_val,
            "n_test": args.n_test,
            "knowledge_items": len(probe),
            "knowledge_exact": args.knowledge_exact,
            "general_prompts": args.general_prompts,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model,
            "device": args.device,
        },
        learning_rates=learning_rates,
        runtime_s=round(time.time() - start, 1),
    )
    style_path = work / "style-reference.json"
    if not style_path.exists():
        log("evaluating the base in the months' styles (the exact-match reference)")
        style_path.write_text(json.dumps(style_reference(base, tokenizer, months, probe, args)))
    style = score_style_reference(json.loads(style_path.read_text()), months, probe, args)
    report.update(aggregate(runs, base_evals, months, args.alphas, style))
    report["examples"] = examples(runs, base_evals, months)
    _publish(report, args.output_dir)
    return 0


def examples(runs: list[dict], base_evals: dict, months: dict) -> dict[str, Any]:
    """A few greedy answers after the last month at alpha 1 (so a reader can see what the numbers count)."""
    out = {}
    for run in runs:
        order = orders_of(months)[run["order"]]
        final = run["evaluations"][f"1/{len(order) - 1}"]
        out[f"{run['arm']}-{run['order']}-s{run['seed']}"] = {
            name: final["months"][name]["generations"][:3] for name in order
        } | {"knowledge": final["knowledge_answers"][:3], "general": final["general_answers"][:3]}
    first = next(iter(base_evals.values()))
    out["base"] = {name: first["months"][name]["generations"][:3] for name in first["months"]} | {
        "knowledge": first["knowledge_answers"][:3],
        "general": first["general_answers"][:3],
    }
    return out


def _publish(report: dict[str, Any], output_dir: Path) -> None:
    text = render(report) + "\n\n" + runtime_note(report["runtime_s"], *report["load_average_1_5_15"].values())
    print(text)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_results(output_dir, report, "Forgetting vs learning (protocol 2)", "", text)
    plot(report, output_dir / "forgetting.png")
    log(f"wrote {output_dir / 'forgetting.json'}, .md and .png")


if __name__ == "__main__":
    sys.exit(main())
