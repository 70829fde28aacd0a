"""Three months of DPO on the bundled SmolLM2-135M-Instruct, twice: peft-selective against what users do today.

Each month teaches a new answer style on real facts (the `countryinfo` package, `peft_selective.demo.months`): concise
capitals, currencies as JSON, languages as a bulleted list, each declared as checks (`MONTH_CHECKS`) that judge the
greedy answers. The same months, seed, steps, learning rate and batch size train two arms on the same base:

- **peft-selective**: the campaign API that the `continual-dpo` command uses, with SelectiveMLP (r=16, alpha=32) and
  the recommended retention (`peft_selective.continual.RECOMMENDED_RETENTION`: rehearsal scored against each pair's
  own month, the KL to last month's model on general, same-shape and earlier-month anchors, an SFT term on the chosen
  answers, boundary pairs). It stacks one adapter per month and writes each month's model card (with its plot).
- **LoRA + DPOTrainer**: PEFT LoRA on all linear layers (r=16, lora_alpha=32) trained with plain TRL `DPOTrainer`
  and merged into the model after each month.

Both arms are judged by the campaign's evaluation (`peft_selective.evaluation.suites.evaluate_model`) on the same
items: behavioural learning of each month (its held-out prompts, its checks, paired gain over the model before the
month), earlier months kept (their scores now minus right after their own month, paired), bleed (the month's style on
off-scope answers: generic prompts, knowledge questions, the other months' prompts) and knowledge (multiple choice and
exact match on country facts no month is about), each with a 95% bootstrap interval.

The model runs in full precision (fp32): in bitsandbytes 4-bit the re-quantized model (the bundled file is already
Q4_1) answers few knowledge questions before any training, so forgetting would not show.

    python examples/monthly_dpo.py --fresh                   # the demo (make demo): outputs/monthly_dpo/
    python examples/monthly_dpo.py --results examples/results/monthly_dpo   # also write the results (md, json, png)
    python examples/monthly_dpo.py --quick --output-dir /tmp/demo --fresh    # a few steps and items: a smoke test

Run it again after an interruption and it continues (the campaign directory and the LoRA arm's folder are the state).
The peft-selective arm from the command line:

    continual-dpo init --campaign_dir outputs/c --base_model embedded
    continual-dpo run-month capitals --campaign_dir outputs/c --data capitals.jsonl
"""

from __future__ import annotations

# First: importing peft_selective holds back bitsandbytes' irrelevant CPU-kernel notice, which PEFT's import (below)
# would otherwise print (peft_selective.utils.warnings).
import peft_selective  # noqa: F401


# isort: split
import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

from peft_selective.campaign import Campaign, CampaignConfig, configure_output, format_report, month_time_split
from peft_selective.continual import RECOMMENDED_RETENTION
from peft_selective.demo.embedded import load_embedded_model
from peft_selective.demo.months import MONTH_CHECKS, monthly_sequence
from peft_selective.evaluation.suites import (
    evaluate_model,
    knowledge_table,
    learning_table,
    month_behaviour,
    retention_numbers,
)
from peft_selective.utils.machine import cpu_info


REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = "month-0"  # the base model's entry in a campaign's evaluations
ARMS = {
    "peft_selective": "peft-selective (SelectiveMLP + recommended retention)",
    "lora": "PEFT LoRA all-linear + TRL DPOTrainer, merged monthly",
}
#: The demo's sizes (meant for 2 CPU cores; the committed run took 18.6 min on one thread beside other jobs) and the smoke test's (`--quick`): rows, steps and
#: evaluation items, and the lengths of what is generated (on a CPU, generation is most of the cost). The retention
#: terms keep their weights (`RECOMMENDED_RETENTION`); only how many anchor prompts the KL generates from, and how long,
#: is sized here (the trainer's defaults: 32 + 64 anchors of 16 tokens). The boundary answers keep the trainer's 48
#: tokens: a boundary answer cut off by its budget keeps only its whole sentences and is skipped without one, and at 24
#: tokens some were skipped (the months then bled their style far more: see the README).
SIZES = {
    "full": dict(
        months=["capitals", "currency", "languages"], n_train=48, n_eval=12, steps=18, batch_size=4,
        knowledge_questions=48, knowledge_exact=16, generic=8, answer_tokens=24, knowledge_tokens=12,
        perplexity_tokens=256, anchors=16, anchor_tokens=8, boundary_tokens=48,
    ),
    "quick": dict(
        months=["capitals", "currency"], n_train=4, n_eval=3, steps=2, batch_size=2,
        knowledge_questions=6, knowledge_exact=3, generic=2, answer_tokens=8, knowledge_tokens=8,
        perplexity_tokens=64, anchors=2, anchor_tokens=4, boundary_tokens=8,
    ),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/monthly_dpo", help="Both arms' state and outputs.")
    parser.add_argument("--fresh", action="store_true", help="Delete an existing output directory first.")
    parser.add_argument("--quick", action="store_true", help="A few steps and items (CI): the numbers mean nothing.")
    parser.add_argument("--months", nargs="+", help="Month styles (default capitals currency languages; quick: 2).")
    parser.add_argument("--n-train", type=int, help="Training pairs per month (default 48; quick 4).")
    parser.add_argument("--n-eval", type=int, help="Held-out pairs per month (default 12; quick 3).")
    parser.add_argument("--steps", type=int, help="Optimizer steps per month (default 18; quick 2).")
    parser.add_argument("--batch-size", type=int, help="Pairs per step (default 4; quick 2).")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="Both arms (the campaign's default).")
    parser.add_argument("--rank", type=int, default=16, help="Both arms' rank (alpha = 2 x rank).")
    parser.add_argument("--knowledge-questions", type=int, help="Knowledge pool (multiple choice; default 48).")
    parser.add_argument("--knowledge-exact", type=int, help="Of them, answered by generation (default 16).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--verbose", action="store_true", help="Every log line, bar and third-party warning.")
    parser.add_argument("--results", default=None, help="Write <results>.md, .json and .png (the committed run).")
    args = parser.parse_args(argv)
    args.command = "python examples/monthly_dpo.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for key, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------- the two arms
def campaign_config(args: argparse.Namespace) -> CampaignConfig:
    """The peft-selective arm: SelectiveMLP with the recommended retention, fp32, sized for 2 CPU cores."""
    return CampaignConfig(
        base_model="embedded",
        quantization=None,
        method="selective_mlp",
        rank=args.rank,
        alpha=2 * args.rank,
        seed=args.seed,
        training={
            **RECOMMENDED_RETENTION,
            "learning_rate": args.learning_rate,
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "max_length": 128,
            "save_steps": max(1, args.steps // 3),
            "kl_max_general_anchors": args.anchors,
            "kl_max_shape_anchors": args.anchors,
            "kl_max_rehearsal_anchors": args.anchors,
            "kl_anchor_max_new_tokens": args.anchor_tokens,
            "boundary_max_new_tokens": args.boundary_tokens,
        },
        # No safety month here (the base refuses nothing), so no refusal suite; no drift probe nor ranking: the
        # comparison is by behaviour and knowledge, and the evaluation has to stay cheaper than the training.
        evaluation={
            "suites": ["behaviour", "knowledge", "perplexity", "kl"],
            "batch_size": 16,
            "behaviour_max_new_tokens": args.answer_tokens,
            "knowledge_exact_items": args.knowledge_exact,
            "knowledge_max_new_tokens": args.knowledge_tokens,
            "perplexity_max_tokens": args.perplexity_tokens,
            "drift_prompts": args.generic,
            "max_length": 128,
        },
        knowledge_questions=args.knowledge_questions,
    )


class TrainingBar(TrainerCallback):
    """One progress bar for the LoRA arm's training, like the campaign's (the Trainer's own prints every log dict)."""

    def __init__(self, description: str) -> None:
        self.description, self.bar = description, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.description)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class LoraArm:
    """What users do today: PEFT LoRA all-linear + plain TRL `DPOTrainer` on each month, merged after it.

    It trains on the campaign's stored splits of each month and is evaluated by the campaign's evaluation
    (`evaluate_model` with the campaign's config, test sets, checks, knowledge items and base generations), so both arms
    are measured on the same items by the same code. Its state: `lora.json` (done months, evaluations, the behaviour
    before each month) and one adapter folder per month, merged again in order when the run resumes."""

    def __init__(self, directory: Path, campaign: Campaign, args: argparse.Namespace) -> None:
        self.directory, self.campaign, self.args = directory, campaign, args
        self.state_file = directory / "lora.json"
        self.state = (
            json.loads(self.state_file.read_text())
            if self.state_file.exists()
            else {"months": [], "evaluations": {}, "before": {}, "timing": {}}
        )
        base, self.tokenizer = load_embedded_model()
        self.base = base.eval().requires_grad_(False)  # month 0, for the KL to the base
        self.model = copy.deepcopy(self.base)
        for name in self.state["months"]:  # resuming: the merged model after the done months
            self.model = PeftModel.from_pretrained(self.model, directory / "adapters" / name).merge_and_unload()
        self.model.requires_grad_(False)

    def history(self) -> dict[str, Any]:
        return {BASELINE: self.campaign.evaluations[BASELINE], **self.state["evaluations"]}

    def run_month(self, name: str, months: list[str]) -> None:
        campaign, args = self.campaign, self.args
        evaluation_config = campaign.config.evaluation_config()
        training = campaign.config.training  # the same steps, rate, batch and lengths as the other arm
        train = Dataset.from_json(str(campaign.layout.split(name, "train")))
        test_sets = campaign.test_sets(months)
        start = time.time()
        self.state["before"][name] = month_behaviour(
            self.model, self.tokenizer, test_sets[name], campaign.month_spec(name), evaluation_config
        )
        before = time.time() - start
        config = DPOConfig(
            output_dir=str(self.directory / "runs" / name),
            learning_rate=training["learning_rate"],
            max_steps=training["max_steps"],
            per_device_train_batch_size=training["per_device_train_batch_size"],
            gradient_accumulation_steps=training["gradient_accumulation_steps"],
            beta=training["beta"],
            max_length=training["max_length"],
            activation_checkpointing=False,
            seed=args.seed,
            save_strategy="no",
            logging_steps=1,
            report_to=[],
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        lora = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        self.model.requires_grad_(True)  # PEFT freezes the base weights and trains the adapter
        trainer = DPOTrainer(
            model=self.model,
            args=config,
            train_dataset=train,
            processing_class=self.tokenizer,
            peft_config=lora,
            callbacks=[TrainingBar(f"Training {name} (LoRA)")],
        )
        trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every step's log dict
        trained = time.time()
        trainer.train()
        trained = time.time() - trained
        trainer.model.save_pretrained(self.directory / "adapters" / name)
        self.model = trainer.model.merge_and_unload().eval().requires_grad_(False)
        del trainer
        evaluated = time.time()
        self.state["evaluations"][name] = evaluate_model(
            self.model,
            self.tokenizer,
            evaluation_config,
            test_sets=test_sets,
            knowledge_items=campaign.knowledge_pool["items"],
            base=self.base,
            month_specs={month: campaign.month_spec(month) for month in months},
            exact_indices=campaign.knowledge_survivors()[: evaluation_config.knowledge_exact_items],
            base_offscope=campaign.evaluations[BASELINE].get("offscope_generations"),
        )
        # As the campaign splits its months (`month_time_split`): training, evaluation (before and after), total.
        self.state["timing"][name] = {
            "training": round(trained, 1),
            "evaluation": round(before + time.time() - evaluated, 1),
            "total": round(time.time() - start, 1),
        }
        self.state["months"].append(name)
        shutil.rmtree(self.directory / "runs" / name, ignore_errors=True)
        self.state_file.write_text(json.dumps(self.state, indent=1))


# ------------------------------------------------------------------------------------------------- comparison
def campaign_before(campaign: Campaign, months: list[str]) -> dict[str, Any]:
    """The behaviour of the model before each month on its held-out prompts, as the campaign stored it."""
    return {m: json.loads(campaign.layout.before_behaviour(m).read_text()) for m in months}


def compare(arms: dict[str, tuple[dict, dict]], months: list[str], surviving: list[int]) -> dict[str, Any]:
    """Per month and arm: learning (before, after, paired gain), earlier months kept (paired change since right after
    each of them), bleed of the month's style, knowledge; every number with its 95% interval, from the stored
    per-item scores (`peft_selective.evaluation.suites`' aggregations). `arms`: `{arm: (history, before)}`."""
    result: dict[str, Any] = {"months": months, "knowledge_items": None, "rows": {}}
    for arm, (history, before) in arms.items():
        columns = [BASELINE, *months]
        knowledge = knowledge_table(history, columns, surviving)
        result["knowledge_items"] = {"mc": knowledge["n_mc"], "exact": knowledge["n_exact"]}
        learning = learning_table(history, months, before)
        rows = {
            BASELINE: {
                "knowledge_mc": knowledge["mc"].get(BASELINE),
                "knowledge_exact": knowledge["exact"].get(BASELINE),
            }
        }
        for t, month in enumerate(months):
            bleed = history[month]["bleed"].get(month) or {}
            rows[month] = {
                "learning": learning.get(month),
                "kept": retention_numbers(history, months[: t + 1])["bwt_interval"],
                "bleed": bleed.get("summary"),
                "bleed_base": bleed.get("base"),
                "knowledge_mc": knowledge["mc"].get(month),
                "knowledge_exact": knowledge["exact"].get(month),
                "kl_to_base": history[month]["general"].get("kl_to_base"),
                "perplexity": history[month]["general"].get("perplexity"),
            }
        result["rows"][arm] = rows
    return result


def ci(summary: Optional[dict], signed: bool = False) -> str:
    if not summary:
        return "n/a"
    sign = "+" if signed else ""
    low, high = summary["ci95"]
    return f"{summary['mean']:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def comparison_table(comparison: dict[str, Any]) -> str:
    n = comparison["knowledge_items"]
    lines = [
        "| after | arm | learned: before → after | gain (paired) | earlier months kept (paired change) | bleed of "
        f"its style | knowledge, multiple choice (n={n['mc']}) | knowledge, exact (n={n['exact']}) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    base = comparison["rows"]["peft_selective"][BASELINE]
    lines.append(f"| base | both | | | | | {ci(base['knowledge_mc'])} | {ci(base['knowledge_exact'])} |")
    for month in comparison["months"]:
        for arm, rows in comparison["rows"].items():
            row = rows[month]
            learning = row["learning"] or {}
            learned = f"{ci(learning.get('before'))} → {ci(learning.get('after'))}"
            mark = " (learned)" if learning.get("learned") else ""
            lines.append(
                f"| {month} | {ARMS[arm].split(' (')[0] if arm == 'peft_selective' else 'LoRA + DPOTrainer'} | "
                f"{learned} | {ci(learning.get('gain'), signed=True)}{mark} | "
                f"{ci(row['kept'], signed=True) if row['kept'] else 'n/a (first month)'} | {ci(row['bleed'])} | "
                f"{ci(row['knowledge_mc'])} | {ci(row['knowledge_exact'])} |"
            )
    return "\n".join(lines)


def plot(comparison: dict[str, Any], path: Path, title: str) -> None:
    """Learning against forgetting over the months, both arms: one panel per measure, 95% intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = comparison["months"]
    panels = [
        ("Learned: its style on held-out prompts\n(higher is better)", lambda r: (r["learning"] or {}).get("after")),
        ("Earlier months kept: change since learned\n(0 = all kept)", lambda r: r["kept"]),
        ("Bleed: its style on off-scope answers\n(lower is better)", lambda r: r["bleed"]),
        ("Knowledge, multiple choice\n(higher is better)", lambda r: r["knowledge_mc"]),
    ]
    colours = {"peft_selective": "tab:blue", "lora": "tab:orange"}
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for k, (axis, (label, value)) in enumerate(zip(axes, panels)):
        for offset, (arm, rows) in zip((-0.08, 0.08), comparison["rows"].items()):
            x, mean, low, high = [], [], [], []
            columns = ([BASELINE] if k == 3 else []) + months
            for i, month in enumerate(columns):
                summary = value(rows[month]) if month != BASELINE else rows[BASELINE]["knowledge_mc"]
                if summary:
                    x.append(i + offset)
                    mean.append(summary["mean"])
                    low.append(summary["mean"] - summary["ci95"][0])
                    high.append(summary["ci95"][1] - summary["mean"])
            axis.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3, color=colours[arm], label=ARMS[arm])
            axis.set_xticks(range(len(columns)), [c.split("-", 1)[-1] if c != BASELINE else "base" for c in columns])
            axis.set_xlim(-0.5, len(columns) - 0.5)
        axis.set_title(label, fontsize=10)
        # Earlier months kept is a change: it can be negative (forgotten) or positive (improved since learned).
        axis.set_ylim(-1.05 if k == 1 else -0.05, 1.05)
        if k == 1:
            axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xlabel("after month")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------- the run
def main(argv=None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)  # what continual-dpo prints: no known-irrelevant warning, one bar per long step
    start, load_start = time.time(), load_average()
    output = Path(args.output_dir)
    if args.fresh and output.exists():
        shutil.rmtree(output)
    directory = output / "peft_selective"
    campaign = (
        Campaign(directory)
        if (directory / "campaign.json").exists()
        else Campaign.init(directory, campaign_config(args))
    )
    # The months' countries avoid the knowledge probe's, so the probe measures forgetting, not training.
    probe_countries = [item["entity"] for item in campaign.knowledge_pool["items"] if item.get("entity")]
    sequence = monthly_sequence(
        args.months, args.n_train, args.n_eval, seed=args.seed, exclude_countries=probe_countries
    )
    inputs = output / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    lora = None
    timing = {"peft_selective": {}, "lora": {}}
    names = [f"{index}-{style}" for index, (style, _) in enumerate(sequence, start=1)]
    for index, (style, splits) in enumerate(sequence):
        name = names[index]
        if name not in campaign.done_months:
            files = {}
            for split, dataset in splits.items():
                files[split] = inputs / f"{name}.{split}.jsonl"
                dataset.to_json(str(files[split]), lines=True)
            print(f"\n[{name}] peft-selective: {len(splits['train'])} pairs, {args.steps} steps "
                  f"({time.time() - start:.0f} s)")  # fmt: skip
            resuming = campaign.month(name) is not None
            campaign.run_month(
                name,
                None if resuming else files["train"],
                None if resuming else files["test"],
                checks=None if resuming else MONTH_CHECKS[style],
            )
            print(campaign.month_summary(name))
        lora = lora or LoraArm(output / "lora", campaign, args)
        if name not in lora.state["months"]:
            print(f"\n[{name}] LoRA + DPOTrainer: the same pairs and steps ({time.time() - start:.0f} s)")
            lora.run_month(name, names[: index + 1])
        timing["peft_selective"][name] = month_time_split(campaign.month(name).get("timing_s"))
        timing["lora"][name] = lora.state["timing"].get(name)
        comparison = compare(
            arms(campaign, lora, names[: index + 1]), names[: index + 1], campaign.knowledge_survivors()
        )
        print(f"\nAfter {name} ({time.time() - start:.0f} s):\n\n{comparison_table(comparison)}")

    elapsed = time.time() - start
    title = (
        f"{len(names)} months of DPO on SmolLM2-135M-Instruct (fp32), {args.steps} steps x {args.batch_size} pairs, "
        f"lr {args.learning_rate:g}: peft-selective vs LoRA"
    )
    figure = output / "comparison.png"
    plot(comparison, figure, title)
    reports = {
        "peft_selective": format_report(campaign.evaluations, names, **campaign.report_inputs(names)),
        "lora": format_report(
            lora.history(), names, surviving=campaign.knowledge_survivors(), before=lora.state["before"]
        ),
    }
    (output / "comparison.md").write_text(comparison_table(comparison) + "\n")
    print(
        f"\nBoth arms finished in {elapsed / 60:.1f} min. Side by side: {output / 'comparison.md'}, plot: {figure}, "
        f"model cards (peft-selective): {directory / 'cards'}"
    )
    if args.results:
        write_results(Path(args.results), args, campaign, lora, comparison, reports, elapsed, timing, load_start)
    return 0


def arms(campaign: Campaign, lora: LoraArm, months: list[str]) -> dict[str, tuple[dict, dict]]:
    return {
        "peft_selective": (campaign.evaluations, campaign_before(campaign, months)),
        "lora": (lora.history(), lora.state["before"]),
    }


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load average: on a shared machine it says how much the wall time was disturbed."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def git(*command: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("torch", "transformers", "peft", "trl"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    info.update(cpu_info())  # the CPU's kind: training on CPU reproduces on the same kind only
    return info


def write_results(path: Path, args, campaign, lora, comparison, reports, elapsed, timing, load_start) -> None:
    command = args.command
    load_end = load_average()
    payload = {
        "command": command,
        "git_commit": git("rev-parse", "HEAD"),
        # files that differ from that commit (tracked ones): the run is of the commit only when this is empty
        "git_modified": (git("diff", "--name-only", "HEAD") or "").split(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "wall_time_s": round(elapsed, 1),
        "timing_s": timing,
        "arguments": vars(args),
        "arms": ARMS,
        "campaign_config": campaign.state["config"],
        "comparison": comparison,
        "peft_selective": {"months": campaign.months, "evaluations": campaign.evaluations},
        "lora": {"evaluations": lora.state["evaluations"], "before": lora.state["before"]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    shutil.copyfile(Path(args.output_dir) / "comparison.png", path.with_suffix(".png"))
    machine = payload["machine"]
    rows = []
    for arm in ARMS:
        for name, entry in timing[arm].items():
            if entry and entry.get("training"):
                ratio = entry["evaluation"] / entry["training"]
                rows.append(
                    f"| {arm} | {name} | {entry['training']:.0f} | {entry['evaluation']:.0f} | {ratio:.2f} | "
                    f"{entry['total']:.0f} |"
                )
    text = "\n".join(
        [
            f"# Monthly DPO demo: peft-selective vs LoRA + DPOTrainer, {len(comparison['months'])} months on "
            "SmolLM2-135M-Instruct (fp32)",
            "",
            f"Command: `{command}`  ",
            f"Commit: `{payload['git_commit']}`"
            + (f" with changes to {', '.join(payload['git_modified'])}" if payload["git_modified"] else "")
            + f", {payload['date']}; wall time {elapsed / 60:.1f} min on "
            f"{machine['cpu_count']} CPU cores ({machine.get('cpu_model', '?')}), load average (1/5/15 min) "
            f"{load_start} at the start, {load_end} at the end.",
            "",
            f"Arms: {ARMS['peft_selective']}; {ARMS['lora']}. Both: rank {args.rank} (alpha {2 * args.rank}), "
            f"{args.steps} steps of {args.batch_size} pairs at lr {args.learning_rate:g}, seed {args.seed}, "
            f"{args.n_train} training and {args.n_eval} held-out pairs a month.",
            "",
            f"![learning vs forgetting]({path.with_suffix('.png').name})",
            "",
            comparison_table(comparison),
            "",
            "Seconds per month: training (`Trainer.train`), evaluation (the behaviour before the month and the "
            "evaluation after it; month 0's evaluation of the base, once, is in neither), and the month's total (adds "
            "the data, the trainer's construction (anchor continuations, boundary answers) and, for peft-selective, "
            "the buffer's reference log-probs and the model card):",
            "",
            "| arm | month | training | evaluation | evaluation / training | total |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
            "",
            "## peft-selective: the campaign's report",
            "",
            reports["peft_selective"],
            "",
            "## LoRA + DPOTrainer: the same report",
            "",
            reports["lora"],
            "",
        ]
    )
    path.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
