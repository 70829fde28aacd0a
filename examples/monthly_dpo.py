"""Three months of continual DPO on the bundled SmolLM2-135M-Instruct loaded in 4-bit, offline: the README's demo.

Each month teaches a new answer style on real facts (the `countryinfo` package): concise capitals, currencies as
JSON, languages as a bulleted list (`peft_selective.demo.months`). The months run through the campaign API that the
`continual-dpo` command uses: every month trains a SelectiveMLP adapter with `ContinualDPOTrainer` on top of the
earlier months' adapters, with rehearsal of earlier months' pairs and the retention KL to last month's model; then
the month is evaluated (behavioural retention matrix on every month's held-out prompts, bleed, knowledge by multiple
choice and exact match on countries no month uses, ranking of the pairs, perplexity, KL to the base, drift probe) and
its model card is written.

    python examples/monthly_dpo.py                          # the demo (make demo): a fresh campaign in outputs/
    python examples/monthly_dpo.py --results examples/results/monthly_dpo   # also write the results (md + json)

Run it again after an interruption and it continues where it stopped (the campaign directory is the state). The same
campaign from the command line:

    continual-dpo init --campaign_dir outputs/c --base_model embedded --quantization 4bit
    continual-dpo run-month capitals --campaign_dir outputs/c --data capitals.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from peft_selective.campaign import Campaign, CampaignConfig, format_report
from peft_selective.demo.months import MONTH_CHECKS, countries_in, monthly_sequence


REPO_ROOT = Path(__file__).resolve().parents[1]


def _rank(value: str):
    return None if value == "full" else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--campaign-dir", default="outputs/monthly_dpo", help="Campaign directory (state and outputs)."
    )
    parser.add_argument("--fresh", action="store_true", help="Delete an existing campaign directory first.")
    parser.add_argument("--months", nargs="+", default=["capitals", "currency", "languages"], help="Month styles.")
    parser.add_argument("--n-train", type=int, default=12, help="Training pairs per month.")
    parser.add_argument("--n-eval", type=int, default=10, help="Held-out pairs per month.")
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps per month.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=_rank, default=16, help="SelectiveMLP rank ('full': full rank).")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument("--rehearsal-ratio", type=float, default=0.25)
    parser.add_argument("--kl-coef", type=float, default=0.5)
    parser.add_argument("--knowledge-questions", type=int, default=24)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", default=None, help="Write <results>.md and <results>.json (the committed run).")
    return parser.parse_args(argv)


def campaign_config(args: argparse.Namespace) -> CampaignConfig:
    # Sized for 2 CPU cores and a 15-minute budget. On a CPU, bitsandbytes de-quantizes every 4-bit weight on every
    # forward pass (seconds per pass for this model), so generation dominates: short generations, one batch each.
    # The flat option names of `continual-dpo init`; `from_dict` nests them into the training and evaluation configs.
    return CampaignConfig.from_dict(
        dict(
            base_model="embedded",
            quantization=None if args.quantization == "none" else args.quantization,
            method="selective_mlp",
            rank=args.rank,
            seed=args.seed,
            learning_rate=args.learning_rate,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            max_length=96,
            save_steps=2,
            rehearsal_ratio=args.rehearsal_ratio,
            kl_coef=args.kl_coef,
            kl_anchor_max_new_tokens=4,
            kl_anchors=4,
            # No safety month here (the base refuses nothing), so no refusal suite.
            eval_suites=["preference", "behaviour", "knowledge", "perplexity", "kl", "drift"],
            knowledge_questions=args.knowledge_questions,
            perplexity_max_tokens=256,
            drift_prompts=4,
            eval_batch_size=24,
            eval_max_new_tokens=12,
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    start = time.time()
    directory = Path(args.campaign_dir)
    if args.fresh and directory.exists():
        shutil.rmtree(directory)
    config = campaign_config(args)
    campaign = Campaign(directory) if (directory / "campaign.json").exists() else Campaign.init(directory, config)
    # The months' countries avoid the knowledge probe's, so the probe measures forgetting, not training.
    probe_countries = [item["entity"] for item in campaign.knowledge_pool["items"] if item.get("entity")]
    months = monthly_sequence(
        args.months, args.n_train, args.n_eval, seed=args.seed, exclude_countries=probe_countries
    )
    inputs = directory / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for index, (style, splits) in enumerate(months, start=1):
        name = f"{index}-{style}"
        if name in campaign.done_months:
            print(f"[{name}] already done, skipping.")
            continue
        files = {}
        for split, dataset in splits.items():
            files[split] = inputs / f"{name}.{split}.jsonl"
            dataset.to_json(str(files[split]), lines=True)
        print(f"\n[{name}] training {len(splits['train'])} pairs, {args.steps} steps ({time.time() - start:.0f} s)")
        resuming = campaign.month(name) is not None
        checks = None if resuming else MONTH_CHECKS.get(style)  # the style the month teaches, scored by behaviour
        campaign.run_month(
            name, None if resuming else files["train"], None if resuming else files["test"], checks=checks
        )
        print(f"[{name}] done ({time.time() - start:.0f} s). Retention so far:\n")
        print(format_report(campaign.evaluations, campaign.done_months, **campaign.report_inputs()))
    elapsed = time.time() - start
    report = format_report(campaign.evaluations, campaign.done_months, **campaign.report_inputs())
    print(f"\nCampaign finished in {elapsed / 60:.1f} min. Model cards: {directory / 'cards'}\n\n{report}")
    if args.results:
        write_results(
            Path(args.results), args, campaign, report, elapsed, [c for _, s in months for c in countries_in(s)]
        )
    return 0


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    """Versions and the CPU: on a CPU, bitsandbytes' 4-bit path (and so the wall time) depends on its features."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        info["cpu_model"] = names[0] if names else None
        info["cpu_flags"] = sorted(flag for flag in flags if flag.startswith(("avx512", "amx", "avx2")))
    return info


def write_results(path: Path, args, campaign: Campaign, report: str, elapsed: float, countries: list[str]) -> None:
    command = "python examples/monthly_dpo.py " + " ".join(sys.argv[1:])
    payload = {
        "command": command,
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "wall_time_s": round(elapsed, 1),
        "arguments": vars(args),
        "config": campaign.state["config"],
        "months": campaign.months,
        "retention": campaign.retention(),
        "evaluations": campaign.evaluations,
        "countries_used": len(set(countries)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    # bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16: say which path this run took
    bf16 = "yes" if "avx512_bf16" in payload["machine"].get("cpu_flags", []) else "no"
    text = (
        f"# Monthly DPO demo: 3 months on SmolLM2-135M-Instruct ({args.quantization})\n\n"
        f"Command: `{command}`  \nCommit: `{payload['git_commit']}`, {payload['date']}, "
        f"wall time {elapsed / 60:.1f} min on {payload['machine'].get('cpu_count', '?')} CPU cores "
        f"({payload['machine'].get('cpu_model', '?')}; AVX512-BF16: {bf16}; bitsandbytes "
        f"{payload['machine'].get('bitsandbytes', 'not installed')}).\n\n"
        "The report of the campaign: behavioural retention (greedy answers to month i's held-out prompts after "
        "month t, with 95% intervals), learning, bleed, knowledge, the ranking of the held-out pairs, then general "
        "ability against month 0.\n\n" + report + "\n"
    )
    path.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
