"""`continual-dpo`: one command per month of a continual DPO campaign.

```bash
continual-dpo init --campaign_dir campaign --base_model embedded --quantization 4bit --method selective_mlp
continual-dpo run-month 2025-06 --campaign_dir campaign --data june.jsonl       # trains, evaluates, writes the card
continual-dpo run-month 2025-07 --campaign_dir campaign --data july.jsonl --checks checks.json  # declared style
continual-dpo run-month 2025-07 --campaign_dir campaign --data july.parquet     # rerun after a crash: resumes
continual-dpo eval --campaign_dir campaign                                      # the latest month's evaluation
continual-dpo report --campaign_dir campaign                                    # retention tables, cards
continual-dpo push --campaign_dir campaign --dry_run                            # what would be uploaded
continual-dpo push --campaign_dir campaign --repo_id me/my-adapters             # (init --hub_repo: the default)
continual-dpo abandon 2025-07 --campaign_dir campaign                           # drop an interrupted month
continual-dpo unlock --campaign_dir campaign                                    # break a stale lock
```

A new campaign trains every month with the recommended retention (`peft_selective.continual.RECOMMENDED_RETENTION`:
rehearsal 0.2 scored against each pair's own month, KL 0.2 on every second step to last month's model on general,
same-shape and earlier-month anchors, an SFT term of weight 1, 8 boundary pairs), the arm of the forgetting ablation
that bled least at LoRA's learning (`benchmarks/results/forgetting.md`). What a month with it costs against plain TRL
`DPOTrainer`, measured on the bundled model on CPU: `benchmarks/results/month_cost.md`.
`init --rehearsal_ratio 0 --kl_coef 0 --sft_weight 0 --boundary_pairs 0` turns it off (each option alone, its term). A campaign created by an earlier version keeps the options it was created
with.

One command runs on a campaign at a time: each holds the directory's lock (`peft_selective.utils.lock`) and a
second one is refused, naming the holder. A lock left by a crashed process on this machine is taken over by the next
command; one recorded by another host (or on a filesystem without `flock`) stays until `unlock` breaks it: run it
only once you know that holder is gone. `unlock` refuses while a live process on this machine holds the lock.

What a command prints: a progress bar per long step (data, training, each evaluation suite, Fisher, calibration), the
campaign's own steps, warnings, and a short summary per month (`report` for every table). `--verbose` adds every log
line (the Trainer's per-step metrics included) and the third-party notices `peft_selective.utils.warnings` silences.

Every command takes `--config file.yaml` (keys: the command's options, as in TRL's CLI) and `--help`. The `init`
options are `CampaignConfig`'s flat options (`peft_selective.campaign.config.FLAT_OPTIONS`): the config's own fields
and the trainer's and the evaluation's under their names (`--learning_rate`, `--kl_coef`, `--eval_batch_size`, ...),
generated from those configs' fields; `--rank full` trains the selective methods at full rank. Month names follow
`peft_selective.campaign.layout.check_month_name`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, make_dataclass
from typing import Optional, Union

from trl import TrlParser

from ..continual.health import ModelHealthError
from ..continual.preference_data import PreferenceDataError
from ..utils.lock import LOCK_FILE, DirectoryLock, DirectoryLockedError, describe_holder
from .campaign import Campaign, CampaignError
from .config import CampaignConfig
from .layout import CampaignLayout, check_month_name
from .output import configure_output


@dataclass
class CampaignDirArguments:
    campaign_dir: str = field(default="campaign", metadata={"help": "The campaign directory."})
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Print every log line (INFO; DEBUG for peft_selective), the Trainer's per-step metrics and the "
            "library progress bars, and silence no third-party warning."
        },
    )


#: `init`'s options: the campaign directory, `--overwrite` and every flat option of `CampaignConfig`.
InitArguments = make_dataclass(
    "InitArguments",
    [
        ("overwrite", bool, field(default=False, metadata={"help": "Replace an existing campaign.json."})),
        *CampaignConfig.flag_fields(),
    ],
    bases=(CampaignDirArguments,),
)


@dataclass
class RunMonthArguments(CampaignDirArguments):
    name: Optional[str] = field(default=None, metadata={"help": "The month's name (also accepted as first argument)."})
    data: Optional[str] = field(
        default=None, metadata={"help": "Preference pairs: a .jsonl/.json/.parquet/.csv file or a Hub dataset name."}
    )
    test_data: Optional[str] = field(default=None, metadata={"help": "Held-out pairs (default: split off --data)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of --data held out when --test_data is unset."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the month's Trainer checkpoints."})
    health_check: Optional[bool] = field(
        default=None, metadata={"help": "Override the campaign's health_check for this month (true/false)."}
    )
    max_perplexity_ratio: Optional[float] = field(
        default=None, metadata={"help": "Override the campaign's max_perplexity_ratio for this month."}
    )
    max_kl_to_base: Optional[float] = field(
        default=None, metadata={"help": "Override the campaign's max_kl_to_base for this month."}
    )
    retention_scale: Optional[str] = field(
        default=None,
        metadata={"help": "Override the campaign's retention dial for this month: '1.0' (off), a number, or 'auto'."},
    )
    retention_keep_learning: Optional[float] = field(
        default=None, metadata={"help": "Override the campaign's retention_keep_learning for this month."}
    )
    retention_budget: Optional[float] = field(
        default=None, metadata={"help": "Override the campaign's retention_budget (KL, nats/token) for this month."}
    )
    retention_scales: Optional[list[float]] = field(
        default=None, metadata={"help": "Override the campaign's retention_scales (the grid of 'auto')."}
    )
    retention_layer_scales: Optional[str] = field(
        default=None,
        metadata={"help": "Override the campaign's per-block dial for this month, e.g. '0-9:0.5,10-:1'."},
    )
    validation_fraction: Optional[float] = field(
        default=None, metadata={"help": "Override the campaign's validation_fraction (held out for 'auto')."}
    )
    calibration_data: Optional[str] = field(
        default=None,
        metadata={
            "help": "geometry_projected: the month's own protected text for the calibration, a .txt file (paragraphs "
            "separated by blank lines) or a .jsonl file with a 'text' field per line."
        },
    )
    checks: Optional[Union[list, str]] = field(
        default=None,
        metadata={
            "help": "What the month teaches: a .json/.yaml file or a JSON/YAML string with a list of check specs "
            '({"regex": ...} / {"json_schema": ...} / {"callable": "module:function"}, optional "name", "negate") '
            'or {"checks": [...], "bleed_checks": [...]}. Stored with the month; scored on its held-out answers.'
        },
    )


@dataclass
class AbandonArguments(CampaignDirArguments):
    name: Optional[str] = field(default=None, metadata={"help": "The month's name (also accepted as first argument)."})


@dataclass
class EvalArguments(CampaignDirArguments):
    month: Optional[str] = field(
        default=None, metadata={"help": "Evaluate the model after this month (default: last)."}
    )
    lm_eval_tasks: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated lm-evaluation-harness tasks to add (e.g. mmlu,arc_easy: needs "
            "`pip install 'peft-selective[lm-eval]'` and Hub access, or local tasks in --lm_eval_include_path)."
        },
    )
    lm_eval_include_path: Optional[str] = field(
        default=None, metadata={"help": "A folder of local lm-eval task definitions (YAML)."}
    )
    lm_eval_limit: Optional[int] = field(default=None, metadata={"help": "At most this many examples per task."})
    recompute: bool = field(
        default=False,
        metadata={"help": "Measure the month again, even when its stored evaluation (checksums verified) is current."},
    )


@dataclass
class PushArguments(CampaignDirArguments):
    repo_id: Optional[str] = field(default=None, metadata={"help": "Hub repo (default: the campaign's hub_repo)."})
    dry_run: bool = field(default=False, metadata={"help": "List what would be uploaded; upload nothing."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the cached login)."})


@dataclass
class UnlockArguments(CampaignDirArguments):
    force: bool = field(
        default=False, metadata={"help": "Break the lock even while a process on this machine holds it."}
    )


COMMANDS = {
    "init": (InitArguments, "create a campaign directory (it trains with the recommended retention by default)"),
    "run-month": (RunMonthArguments, "train, evaluate and document one month (resumes an interrupted one)"),
    "abandon": (AbandonArguments, "drop an interrupted month (its data, checkpoints and state entries)"),
    "eval": (EvalArguments, "the evaluation of the model after a month (stored, or measured again)"),
    "report": (CampaignDirArguments, "print the retention tables and rewrite the model cards"),
    "push": (PushArguments, "upload every month's adapter and card to the Hub"),
    "unlock": (UnlockArguments, "break the stale lock a crashed command left (campaign, buffer, Fisher)"),
}


def _usage() -> str:
    lines = ["usage: continual-dpo <command> [--help] [--config file.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _unlock(directory: str, force: bool) -> str:
    """Break the locks of the campaign directory and of its rehearsal buffer and Fisher store; says what it broke."""
    paths = CampaignLayout(directory)
    broken = []
    for folder in (paths.root, paths.buffer, paths.fisher):
        holder = DirectoryLock.break_lock(folder, force=force)
        if holder is not None:
            broken.append(f"Removed the lock {folder / LOCK_FILE} of {describe_holder(holder)}.")
    return "\n".join(broken) or f"No lock in {paths.root}: nothing to break."


def _run(command: str, argv: list[str]) -> int:
    arguments_class, help_ = COMMANDS[command]
    if command in ("run-month", "abandon") and argv and not argv[0].startswith("-"):
        argv = ["--name", *argv]
    parser = TrlParser((arguments_class,), prog=f"continual-dpo {command}", description=help_)
    (args,) = parser.parse_args_and_config(argv)
    configure_output(args.verbose)
    if command == "init":
        values = {
            key: value for key, value in vars(args).items() if key not in ("campaign_dir", "overwrite", "verbose")
        }
        campaign = Campaign.init(args.campaign_dir, CampaignConfig.from_dict(values), overwrite=args.overwrite)
        print(f"Campaign created in {campaign.directory}.")
        return 0
    if command == "unlock":
        print(_unlock(args.campaign_dir, args.force))
        return 0
    if command in ("run-month", "abandon") and not args.name:
        raise CampaignError(f"Name the month: `continual-dpo {command} NAME ...`.")
    month = getattr(args, "name" if command in ("run-month", "abandon") else "month", None)
    if month is not None:
        check_month_name(month)
    campaign = Campaign(args.campaign_dir)
    if command == "run-month":
        entry = campaign.run_month(
            args.name,
            args.data,
            args.test_data,
            args.test_fraction,
            keep_checkpoints=args.keep_checkpoints,
            health_check=args.health_check,
            max_perplexity_ratio=args.max_perplexity_ratio,
            max_kl_to_base=args.max_kl_to_base,
            checks=args.checks,
            retention_scale=args.retention_scale,
            retention_keep_learning=args.retention_keep_learning,
            retention_budget=args.retention_budget,
            retention_scales=args.retention_scales,
            retention_layer_scales=args.retention_layer_scales,
            validation_fraction=args.validation_fraction,
            calibration_data=args.calibration_data,
        )
        if entry.get("status") == "done":  # on the main process (the others only trained)
            print(campaign.month_summary(entry["name"]))
    elif command == "abandon":
        print(campaign.abandon(args.name))
    elif command == "eval":
        tasks = [task for task in (args.lm_eval_tasks or "").split(",") if task.strip()]
        result = campaign.evaluate(
            args.month,
            lm_eval_tasks=[task.strip() for task in tasks],
            lm_eval_include_path=args.lm_eval_include_path,
            lm_eval_limit=args.lm_eval_limit,
            recompute=args.recompute,
        )
        print(json.dumps(result, indent=2))
    elif command == "report":
        print(campaign.report())
    elif command == "push":
        files = campaign.push(args.repo_id, dry_run=args.dry_run, token=args.token)  # a dry run prints its plan
        if not args.dry_run:
            print(f"Uploaded {len(files)} files:\n" + "\n".join(f"  {path}" for path in files))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _run(argv[0], argv[1:])
    except (
        CampaignError,
        DirectoryLockedError,
        PreferenceDataError,
        ModelHealthError,
        FileNotFoundError,
        ValueError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
