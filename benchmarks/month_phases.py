"""Where a default campaign month's time goes, and whether its evaluation costs at most half its training.

The requirement (issue #15): "evaluation <= 0.5x the training time of a default month on the bundled model". One
month is run as a user runs it, through the campaign API (`Campaign.init` + `Campaign.run_month`, what
`continual-dpo init` / `run-month` call), and the phase times the campaign records in the month's entry are reported:

* the campaign: `CampaignConfig` defaults on the bundled SmolLM2-135M-Instruct (`base_model="embedded"`, fp32), with
  `training` set to `RECOMMENDED_RETENTION` over the campaign's defaults (written out, so the run measures the
  recommended terms whether or not they are the campaign's defaults yet); the campaign's default steps, batch size and
  evaluation (`EvaluationConfig` defaults with the campaign's `EVALUATION_DEFAULTS`);
* the month: a demo month of `peft_selective.demo.months.monthly_sequence` (`--month`, default `capitals`),
  `--n-train` (48) training pairs and `--n-test` (12) held-out pairs passed as its test data;
* the times: the month's `timing_s` (`peft_selective.campaign.campaign.MONTH_PHASES`: data, model loading, the base's
  month-0 evaluation, what is measured before the month, the trainer's construction, training, evaluation, finish,
  card) and `evaluation_suites_s` (each suite of the evaluation after the month).

**Verdict**: evaluation / training <= 0.5, where training is the `training` phase (`Trainer.train`) and evaluation is
what every month spends measuring itself (`month_time_split`): the evaluation after the month plus what is measured
before it (the base's log-probs of the month's test pairs, the behaviour of the model before the month). The base's
own evaluation (month 0) runs once per campaign, in its first month: it is reported beside the verdict, and a second
ratio includes it. The rule was fixed before the run; a single month on a shared machine, not tuned.

Usage:

    python benchmarks/month_phases.py --threads 1        # the committed results (results/month_phases.{md,json})
    python benchmarks/month_phases.py --model tiny --steps 2 --output-dir /tmp/bench   # smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


if __package__ in (None, ""):  # `python benchmarks/<name>.py`: import the `benchmarks` package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    TINY_LLAMA,
    add_output_args,
    load_average,
    machine_info,
    markdown_table,
    prefixed_log,
    publish,
    report_header,
    runtime_note,
    safe_ratio,
    setup_torch,
)


#: The requirement: evaluation / training of a month at most this.
BAR = 0.5
log = prefixed_log("month_phases")

PHASE_LABELS = {
    "verify": "checksums checked",
    "data": "data (read, checked, split, written)",
    "load_model": "model loaded",
    "baseline_evaluation": "month-0 evaluation of the base (first month only)",
    "before_month": "measured before the month (base log-probs, behaviour before)",
    "trainer": "trainer built (rehearsal, boundary answers, tokenization)",
    "calibration": "geometry calibration",
    "training": "training (`Trainer.train`, from the continuations of the anchors it draws)",
    "retention_dial": "retention dial",
    "evaluation": "evaluation after the month",
    "finish": "finish (adapter, buffer reference log-probs, Fisher)",
    "card": "model card",
}


# --------------------------------------------------------------------------------------------------- arithmetic
def verdict(timing: dict[str, float], bar: float = BAR) -> dict[str, Any]:
    """The requirement applied to a month's `timing_s`: `ratio` = evaluation / training (`month_time_split`),
    `ratio_with_baseline` with month 0's evaluation added (once per campaign), `met` when `ratio <= bar`."""
    from peft_selective.campaign.campaign import month_time_split

    split = month_time_split(timing)
    if split is None:
        raise ValueError("The month has no timing_s: it was not run by this version of the campaign.")
    ratio = safe_ratio(split["evaluation"], split["training"])
    with_baseline = safe_ratio(split["evaluation"] + split["baseline_evaluation"], split["training"])
    return {
        **split,
        "bar": bar,
        "ratio": ratio,
        "ratio_with_baseline": with_baseline,
        "met": ratio is not None and ratio <= bar,
        "rule": f"met when (before_month + evaluation) / training <= {bar}; month 0's evaluation (once per "
        "campaign) is left out of the verdict and shown in ratio_with_baseline",
    }


def phase_rows(timing: dict[str, float]) -> list[list[str]]:
    total = timing.get("total") or 0.0
    rows = []
    for name, label in PHASE_LABELS.items():
        if name in timing:
            share = f"{timing[name] / total:.0%}" if total else "n/a"
            rows.append([f"{label} (`{name}`)", f"{timing[name]:.1f}", share])
    accounted = sum(timing.get(name, 0.0) for name in PHASE_LABELS)
    rows.append(["not in a phase (state, locks, logging)", f"{total - accounted:.1f}", ""])
    rows.append(["**whole month** (`total`)", f"{total:.1f}", "100%"])
    return rows


def suite_rows(suites: dict[str, float]) -> list[list[str]]:
    total = sum(suites.values())
    rows = [
        [f"`{name}`", f"{seconds:.1f}", f"{seconds / total:.0%}" if total else "n/a"]
        for name, seconds in suites.items()
    ]
    return rows


def load_note(load_start, load_end, threads: int) -> str:
    """Whether other processes loaded the machine: a 1-minute load average above this run's own threads."""
    busiest = max((load[0] for load in (load_start, load_end) if load), default=None)
    if busiest is not None and busiest >= threads + 0.5:
        return (
            f"Other processes were loading the machine: 1-minute load average up to {busiest:.1f} against this run's "
            f"{threads} thread(s). Absolute times move with it; evaluation and training ran one after the other in "
            "the same process, under about the same load."
        )
    return "No other process loaded the machine much (1-minute load average at most this run's threads + 0.5)."


# --------------------------------------------------------------------------------------------------- the run
def campaign_config(args: argparse.Namespace, base_model: str):
    from peft_selective.campaign.config import CampaignConfig, training_defaults
    from peft_selective.continual import RECOMMENDED_RETENTION

    training = copy.deepcopy(RECOMMENDED_RETENTION)
    if args.steps is not None:
        training["max_steps"] = args.steps
    defaults = training_defaults()
    already = all(defaults.get(key) == value for key, value in RECOMMENDED_RETENTION.items())
    return CampaignConfig(base_model=base_model, training=training), already


def tiny_base(folder: Path) -> str:
    """A random 2-layer Llama (`TINY_LLAMA`) with the bundled tokenizer, saved as a campaign's base (smoke tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_selective.demo.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_month(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from peft_selective.campaign import Campaign
    from peft_selective.demo.months import monthly_sequence

    base_model = "embedded" if args.model == "embedded" else tiny_base(work / "tiny-base")
    config, recommended_is_default = campaign_config(args, base_model)
    ((name, splits),) = monthly_sequence([args.month], n_train=args.n_train, n_eval=args.n_test, seed=0)
    campaign = Campaign.init(work / "campaign", config, overwrite=True)
    log(
        f"month {name}: {len(splits['train'])} training pairs, {len(splits['test'])} test pairs; load {load_average()}"
    )
    started = time.perf_counter()
    entry = campaign.run_month(name, splits["train"], test_data=splits["test"])
    wall = time.perf_counter() - started
    summary = campaign.month_summary(name)
    evaluation = campaign.config.evaluation
    return {
        "month": name,
        "entry": {key: entry.get(key) for key in ("timing_s", "evaluation_suites_s", "training", "data")},
        "wall_s": round(wall, 1),
        "summary": summary,
        "config": campaign.config.to_dict(),
        "recommended_retention_is_default": recommended_is_default,
        "sizes": {
            "train_pairs": len(splits["train"]),
            "test_pairs": len(splits["test"]),
            "knowledge_items": len(campaign.knowledge_pool["items"]),
            "knowledge_exact_items": evaluation.knowledge_exact_items,
            "generic_prompts": evaluation.drift_prompts,
            "refusal_prompts": 2 * evaluation.refusal_prompts,
            "generation_batch_size": evaluation.generate_batch_size,
            "batch_size": evaluation.batch_size,
        },
    }


# --------------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Where a default campaign month's time goes; is its evaluation <= 0.5x its training?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded", help="tiny: smoke tests only")
    parser.add_argument("--month", default="capitals", help="a month of peft_selective.demo.months")
    parser.add_argument("--n-train", type=int, default=48, help="training pairs of the month")
    parser.add_argument("--n-test", type=int, default=12, help="held-out pairs of the month (its test data)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default: the campaign's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="the campaign's folder (default: a temporary one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 on a shared machine: extra OpenMP threads wait for each other; 0: torch's default)",
    )
    add_output_args(parser, "month_phases")
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test) < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--n-train, --n-test and --steps must be >= 1")
    args.threads = None if args.threads == 0 else args.threads
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    import torch

    started = time.time()
    load_start = load_average()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        run = run_month(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="month-phases-") as folder:
            run = run_month(args, Path(folder))
    load_end = load_average()
    elapsed = time.time() - started
    timing, suites = run["entry"]["timing_s"], run["entry"]["evaluation_suites_s"] or {}
    v = verdict(timing)

    machine = machine_info(torch_threads=torch.get_num_threads(), device="cpu")
    package = REPO_ROOT / "peft_selective"
    sources = [REPO_ROOT / "benchmarks" / "month_phases.py", package / "campaign" / "campaign.py"]
    sources += [package / "evaluation" / f for f in ("suites.py", "preference.py", "knowledge.py", "generation.py")]
    sources += [package / "continual" / f for f in ("trainer.py", "anchors.py")]
    report = {
        **report_header("month_phases", sources, machine, load_start, load_end),
        "model": "bundled SmolLM2-135M-Instruct (peft_selective.demo.embedded), fp32"
        if args.model == "embedded"
        else "tiny random-init 2-layer Llama (smoke test; numbers mean nothing)",
        "settings": {
            "month": run["month"],
            "sizes": run["sizes"],
            "steps": run["entry"]["training"]["steps"],
            "threads": args.threads,
            "campaign_config": run["config"],
            "recommended_retention_is_default": run["recommended_retention_is_default"],
        },
        "timing_s": timing,
        "evaluation_suites_s": suites,
        "verdict": v,
        "month_summary": run["summary"],
        "runtime_s": round(elapsed, 1),
    }
    report["command"] = "python benchmarks/month_phases.py" + ("" if not args.argv else " " + shlex.join(args.argv))
    report["argv"] = ["benchmarks/month_phases.py", *args.argv]

    sizes = run["sizes"]
    training = run["config"]["training"]
    header = (
        f"Model: {report['model']}; {torch.get_num_threads()} torch thread(s), CPU. Campaign: `CampaignConfig` "
        f"defaults, `training` = `RECOMMENDED_RETENTION` over the campaign's defaults"
        f"{' (already its defaults)' if run['recommended_retention_is_default'] else ' (not its defaults yet)'}: "
        f"method {run['config']['method']}, rank {run['config']['rank']}, {training['max_steps']} steps x batch "
        f"{training['per_device_train_batch_size']}, rehearsal {training['rehearsal_ratio']}, KL {training['kl_coef']} "
        f"on {', '.join(training['kl_anchor_kinds'])} anchors, SFT weight {training['sft_weight']}, "
        f"{training['boundary_pairs']} boundary pairs. Month `{run['month']}`: {sizes['train_pairs']} training and "
        f"{sizes['test_pairs']} test pairs. Evaluation: the campaign's defaults ({sizes['knowledge_items']} knowledge "
        f"items by multiple choice, {sizes['knowledge_exact_items']} by generation, {sizes['generic_prompts']} generic "
        f"and {sizes['refusal_prompts']} refusal prompts; batch {sizes['batch_size']}, generation batch "
        f"{sizes['generation_batch_size']})."
    )
    notes = [header, "", "Phases of the month (`timing_s`, wall seconds):", ""]
    notes += [markdown_table(["phase", "s", "share"], phase_rows(timing)), ""]
    notes += ["Suites of the evaluation after the month (`evaluation_suites_s`):", ""]
    notes += [markdown_table(["suite", "s", "share"], suite_rows(suites)), ""]
    ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}x"
    with_baseline = "n/a" if v["ratio_with_baseline"] is None else f"{v['ratio_with_baseline']:.2f}x"
    notes.append(
        f"**Verdict**: evaluation {v['evaluation']:.1f} s / training {v['training']:.1f} s = {ratio} against <= "
        f"{BAR}x: {'met' if v['met'] else 'NOT met'}. With the base's month-0 evaluation ({v['baseline_evaluation']:.1f}"
        f" s, once per campaign, in its first month): {with_baseline}. Rule: {v['rule']}."
    )
    notes.append("")
    notes.append("The month's summary as `continual-dpo run-month` prints it:")
    notes += ["", "```", run["summary"], "```", ""]
    notes.append(load_note(load_start, load_end, torch.get_num_threads()))
    notes.append(runtime_note(elapsed, load_start, load_end))
    text = "\n".join(notes)
    publish(args, report, "Month phases benchmark results", f" ({torch.get_num_threads()} threads)", text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
