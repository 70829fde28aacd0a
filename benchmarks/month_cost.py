"""What a month of `ContinualDPOTrainer` with the recommended retention terms costs, against plain TRL `DPOTrainer`.

The requirement: with the default retention terms a month costs <= 1.5x the time of plain `DPOTrainer` with the same
adapter and <= 1.2x its memory. One *month* is measured end to end, as a user runs it:

* `plain`: TRL's `DPOTrainer(model, args=DPOConfig(...), train_dataset=month_2, processing_class=tokenizer,
  peft_config=SelectiveMLPConfig(rank=16, alpha=32))` + `train()`; month 2 of a plain campaign (month 1 trained the
  same way first, untimed, and merged with `merge_and_unload`, what users of plain TRL do between months).
* `ours`: month 2 of a `ContinualDPOTrainer` campaign with the retention terms of `RECOMMENDED` (below):
  construction (rehearsal mix, the boundary pairs' answers, tokenization) + `train()` (which starts by generating the
  month-1 model's greedy continuations of the anchors its steps draw) + `finish_month("m2")` (the month's rehearsal
  sample and its own-reference log-probs). Month 1 (`ContinualDPOTrainer`, adapter `m1`, no retention terms, then
  `finish_month("m1")`) is trained first, untimed, so that the rehearsal buffer and the earlier-month anchor prompts
  exist and the month-1 adapter is stacked (frozen, active) under month 2's. Month 1 runs `--month1-steps` (6) steps
  in both arms: it only creates the state month 2 starts from (and warms the runtime alike in both arms), so its
  length is not measured.
* With `--terms`: `ours_none` (the same campaign, every retention term off: the stacked-adapter trainer alone) and
  `only_<term>` (one term of the recipe at a time: `rehearsal`, `kl`, `sft`, `boundary`, `ewc`), to show which term
  costs what.

Same base model, adapter config, data, seed, steps, batch size and `DPOConfig` options in every arm. Data: the built-in
months of `peft_selective.demo.months` (`capitals`, then `currency`), `--steps x --batch-size` rows each (one epoch).

Measured, per arm, in a fresh subprocess per (arm, round), the arms interleaved over `--repeats` rounds with the order
alternated (rotated) every round: wall time (`time.perf_counter`) and process CPU time (`time.process_time`, all
threads) of the month, with its phases (construction, train, finish_month; for ours also the anchor and boundary
generation and the anchor-KL forwards inside train); peak memory: on CPU the process's peak RSS during the month
(Linux VmHWM, reset via /proc/self/clear_refs right before the month) minus its RSS after loading the base model
(after gc + malloc_trim, before month 1); on CUDA `torch.cuda.max_memory_allocated` during the month minus the memory
allocated after loading the model. The verdict uses the *paired* per-round ratios (arm / plain of the same round; the
median over rounds): on a shared machine the absolute times move with the load, the side-by-side ratio much less.

Usage:

    python benchmarks/month_cost.py                       # bundled model, 18 steps x 4, 2 rounds, CPU
    python benchmarks/month_cost.py --terms               # + every term alone (longer)
    python benchmarks/month_cost.py --recipe '{"kl_coef": 0.05, "boundary_pairs": 0}'
    python benchmarks/month_cost.py --model tiny --steps 2 --repeats 1 --output-dir /tmp/bench   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


if __package__ in (None, ""):  # `python benchmarks/<name>.py`: import the `benchmarks` package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    add_output_args,
    emit_memory_result,
    fmt_mib,
    fmt_ratio,
    load_average,
    load_frozen_base,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    prefixed_log,
    publish,
    release_free_memory,
    report_header,
    rotated,
    rss_bytes,
    run_memory_workers_argv,
    runtime_note,
    safe_ratio,
    setup_torch,
    short_month_dpo_options,
    start_peak_window,
)
from benchmarks.methods import peft_config  # noqa: E402
from peft_selective.continual.config import RECOMMENDED_RETENTION  # noqa: E402


#: The recommended retention terms (`ContinualDPOConfig` fields), measured by the `ours` arm. `--recipe` overrides.
RECOMMENDED: dict[str, Any] = copy.deepcopy(RECOMMENDED_RETENTION)
#: The bars of the requirement: ours / plain.
TIME_BAR = 1.5
MEMORY_BAR = 1.2
#: Which `ContinualDPOConfig` fields belong to which term (by prefix), and the field that switches the term on.
TERMS: dict[str, tuple[tuple[str, ...], str]] = {
    "rehearsal": (("rehearsal_",), "rehearsal_ratio"),
    "kl": (("kl_",), "kl_coef"),
    "sft": (("sft_",), "sft_weight"),
    "boundary": (("boundary_",), "boundary_pairs"),
    "ewc": (("ewc_", "fisher_"), "ewc_coef"),
}
#: Recipe keys that would make our arm differ from plain in something other than the retention terms.
NOT_IN_RECIPE = {"adapter_name", "previous_adapters", "fisher_dir"}
MONTHS = ("capitals", "currency")  # month 1 (untimed), month 2 (timed)
log = prefixed_log("month_cost")


# --------------------------------------------------------------------------------------------------- the arms
def term_of(key: str) -> str | None:
    for term, (prefixes, _switch) in TERMS.items():
        if key.startswith(prefixes):
            return term
    return None


def active_terms(recipe: dict[str, Any]) -> list[str]:
    return [term for term, (_prefixes, switch) in TERMS.items() if recipe.get(switch)]


def arm_recipes(recipe: dict[str, Any], with_terms: bool) -> dict[str, dict[str, Any]]:
    """`ContinualDPOConfig` options of each of our arms: `ours` (the recipe), and with `with_terms` `ours_none`
    (nothing) and `only_<term>` (the recipe's options of that term, plus those of no term)."""
    arms = {"ours": dict(recipe)}
    if with_terms:
        common = {k: v for k, v in recipe.items() if term_of(k) is None}
        arms["ours_none"] = dict(common)
        for term in active_terms(recipe):
            arms[f"only_{term}"] = {**common, **{k: v for k, v in recipe.items() if term_of(k) == term}}
    return arms


def arm_label(key: str, recipe: dict[str, Any]) -> str:
    if key == "plain":
        return "plain TRL DPOTrainer"
    if key == "ours":
        return "ContinualDPOTrainer, recommended terms" if recipe == RECOMMENDED else "ContinualDPOTrainer, --recipe"
    if key == "ours_none":
        return "ContinualDPOTrainer, no retention term"
    return f"ContinualDPOTrainer, {key.removeprefix('only_')} only"


def needs_buffer(options: dict[str, Any]) -> bool:
    """Rehearsal draws from the buffer, and so do the KL's earlier-month anchor prompts (as in a campaign)."""
    kinds = options.get("kl_anchor_kinds", ["general", "earlier_months"])
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",")]
    return options.get("rehearsal_ratio", 0) > 0 or (options.get("kl_coef", 0) > 0 and "earlier_months" in kinds)


def parse_recipe(text: str | None) -> dict[str, Any]:
    """RECOMMENDED, updated by `--recipe` (a JSON object, or the path of a JSON file); checked against the config."""
    recipe = dict(RECOMMENDED)
    if text:
        path = Path(text)
        override = json.loads(path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text)
        if not isinstance(override, dict):
            raise ValueError("--recipe must be a JSON object of ContinualDPOConfig options")
        recipe.update(override)
    from dataclasses import fields

    from trl import DPOConfig

    from peft_selective.continual import ContinualDPOConfig

    dpo = {f.name for f in fields(DPOConfig)}
    ours = {f.name for f in fields(ContinualDPOConfig)} - dpo - NOT_IN_RECIPE
    unknown = sorted(set(recipe) - ours)
    if unknown:
        raise ValueError(
            f"--recipe keys {unknown} are not retention options of ContinualDPOConfig (plain DPOConfig options would "
            f"make the arms differ in more than the retention terms); allowed: {sorted(ours)}"
        )
    return recipe


# --------------------------------------------------------------------------------------------------- model, data
def load_base(args: argparse.Namespace):
    """The bundled SmolLM2-135M-Instruct (fp32), or with `--model tiny` a random 2-layer Llama with its tokenizer (as
    benchmarks/forgetting.py `load_base`)."""
    model, tokenizer = load_frozen_base(args.model, args.device)
    return model, tokenizer


def month_data(args: argparse.Namespace):
    """The two built-in months, `--steps x --batch-size` training rows each (one epoch of the month)."""
    from peft_selective.demo.months import monthly_sequence

    rows = args.steps * args.batch_size
    return [splits["train"] for _name, splits in monthly_sequence(MONTHS, n_train=rows, n_eval=0, seed=0)]


def adapter_config(args: argparse.Namespace):
    return peft_config("selective_mlp_lowrank", args.rank, args.alpha)


def dpo_options(args: argparse.Namespace, out: Path, steps: int) -> dict[str, Any]:
    """The `DPOConfig` options of every arm (ours adds only the retention options and the adapter's name)."""
    return short_month_dpo_options(
        out, steps, args.batch_size, args.lr, args.beta, args.max_length, args.device, args.seed
    )


# --------------------------------------------------------------------------------------------------- the worker
class Clock:
    """Wall and process-CPU time of named phases (CUDA synchronized at both ends)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.phases: dict[str, dict[str, float]] = {}

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def now(self) -> tuple[float, float]:
        self._sync()
        return time.perf_counter(), time.process_time()

    def add(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = self.now()
        phase = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
        phase["wall_s"] += wall - start[0]
        phase["cpu_s"] += cpu - start[1]
        phase["calls"] += 1

    def timed(self, name: str, fn):
        def wrapper(*a, **kw):
            start = self.now()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name, start)

        return wrapper


def run_worker(args: argparse.Namespace) -> None:
    """One arm, one round, in a fresh process: load, month 1 (untimed), then the timed month 2; print the result."""
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    import peft_selective  # noqa: F401 - imported before the baseline, like everything the arms use
    import peft_selective.continual.trainer as cdt
    from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer

    transformers.logging.set_verbosity_error()
    key = args._memory_worker
    cuda = args.device.startswith("cuda")
    clock = Clock(cuda)
    work = Path(tempfile.mkdtemp(prefix=f"month-cost-{key}-"))

    model, tokenizer = load_base(args)
    release_free_memory()
    if cuda:
        torch.cuda.synchronize()
        model_bytes = torch.cuda.memory_allocated()
    else:
        model_bytes = rss_bytes()
    month1, month2 = month_data(args)

    # ---- month 1, untimed: the state a user has when month 2 starts
    start = clock.now()
    buffer = None
    options = {} if key == "plain" else arm_recipes(args.recipe, True)[key]
    ewc = "ewc_coef" in args.recipe and args.recipe["ewc_coef"] > 0
    if key == "plain":
        trainer = DPOTrainer(
            model,
            args=DPOConfig(**dpo_options(args, work / "m1", args.month1_steps)),
            train_dataset=month1,
            processing_class=tokenizer,
            peft_config=adapter_config(args),
        )
        trainer.train()
        model = trainer.model.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        buffer = RehearsalBuffer(work / "buffer")
        config = ContinualDPOConfig(
            **dpo_options(args, work / "m1", args.month1_steps),
            adapter_name="m1",
            fisher_dir=str(work / "fisher") if ewc else None,
        )
        trainer = ContinualDPOTrainer(
            model,
            args=config,
            train_dataset=month1,
            processing_class=tokenizer,
            peft_config=adapter_config(args),
            rehearsal_buffer=buffer,
        )
        trainer.train()
        trainer.finish_month("m1")
        model = trainer.model
    month1_s = time.perf_counter() - start[0]
    del trainer
    release_free_memory()

    # ---- month 2, timed
    if cuda:
        torch.cuda.synchronize()
        before_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_method = "torch.cuda.max_memory_allocated"
    else:
        before_bytes = rss_bytes()
        hwm_reset = start_peak_window()
        peak_method = "VmHWM after reset (/proc/self/clear_refs)" if hwm_reset else "ru_maxrss (NOT reset)"
    details: dict[str, Any] = {}
    month_start = clock.now()
    if key == "plain":
        start = clock.now()
        trainer = DPOTrainer(
            model,
            args=DPOConfig(**dpo_options(args, work / "m2", args.steps)),
            train_dataset=month2,
            processing_class=tokenizer,
            peft_config=adapter_config(args),
        )
        clock.add("construct", start)
        start = clock.now()
        trainer.train()
        clock.add("train", start)
    else:

        class TimedContinualDPOTrainer(ContinualDPOTrainer):
            """The trainer unchanged, its one-off generation and month-end steps timed."""

            _add_boundary_rows = clock.timed("boundary_generation", ContinualDPOTrainer._add_boundary_rows)
            _store_reference_logps = clock.timed("finish_reference_logps", ContinualDPOTrainer._store_reference_logps)

        cdt.anchor_kl = clock.timed("anchor_kl_forward", cdt.anchor_kl)  # the KL's two forwards, inside train
        # The anchors' continuations, generated when training starts (those its steps draw), inside train
        cdt.AnchorSet.ensure_continued = clock.timed("anchor_generation", cdt.AnchorSet.ensure_continued)
        fisher_dir = str(work / "fisher") if options.get("ewc_coef", 0) > 0 else None
        config = ContinualDPOConfig(
            **dpo_options(args, work / "m2", args.steps), adapter_name="m2", fisher_dir=fisher_dir, **options
        )
        start = clock.now()
        trainer = TimedContinualDPOTrainer(
            model,
            args=config,
            train_dataset=month2,
            processing_class=tokenizer,
            peft_config=adapter_config(args),
            rehearsal_buffer=buffer if needs_buffer(options) else None,
        )
        clock.add("construct", start)
        start = clock.now()
        trainer.train()
        clock.add("train", start)
        start = clock.now()
        details["finish_month"] = trainer.finish_month("m2")
        clock.add("finish_month", start)
        details.update(
            rehearsal=trainer.rehearsal_summary,
            boundary_rows=trainer.boundary_rows,
            anchors=None if trainer.anchors is None else trainer.anchors.kind_counts(),
            anchors_continued=None if trainer.anchors is None else trainer.anchors.continued_count,
            own_reference_rows=trainer.own_reference_rows,
        )
    clock.add("month", month_start)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes(hwm_reset)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "arm": key,
        "options": options,
        "month_wall_s": clock.phases["month"]["wall_s"],
        "month_cpu_s": clock.phases["month"]["cpu_s"],
        "phases": {name: v for name, v in clock.phases.items() if name != "month"},
        "peak_bytes": peak,
        "model_bytes": model_bytes,
        "before_month_bytes": before_bytes,
        "peak_over_model_bytes": peak - model_bytes,
        "peak_over_before_month_bytes": peak - before_bytes,
        "peak_method": peak_method,
        "train_rows": len(trainer.train_dataset),
        "global_steps": trainer.state.global_step,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "month1_untimed_s": round(month1_s, 1),
        "torch_threads": torch.get_num_threads(),
        **details,
    }
    emit_memory_result(__file__, json.loads(json.dumps(result, default=str)))


# --------------------------------------------------------------------------------------------------- aggregation
def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(keys: list[str], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per arm: medians over rounds and the paired ratios (arm / plain of the same round; median over rounds)."""
    rows = []
    plain = runs["plain"]
    for key in keys:
        mine = runs[key]
        row: dict[str, Any] = {"key": key, "rounds": len(mine)}
        for field in ("month_wall_s", "month_cpu_s", "peak_over_model_bytes", "peak_bytes"):
            row[field] = [r[field] for r in mine]
            row[f"{field}_median"] = median(row[field])
        phases = sorted({name for r in mine for name in r["phases"]})
        row["phases_median"] = {
            name: {unit: median([r["phases"].get(name, {}).get(unit) for r in mine]) for unit in ("wall_s", "cpu_s")}
            for name in phases
        }
        for field, short in (("month_wall_s", "wall"), ("month_cpu_s", "cpu"), ("peak_over_model_bytes", "mem")):
            paired = [safe_ratio(a[field], b[field]) for a, b in zip(mine, plain)]
            row[f"{short}_ratio_per_round"] = paired
            row[f"{short}_ratio_paired_median"] = median(paired)
            row[f"{short}_ratio_of_medians"] = safe_ratio(row[f"{field}_median"], runs_median(plain, field))
        row["train_rows"] = mine[0]["train_rows"]
        row["global_steps"] = mine[0]["global_steps"]
        row["trainable_params"] = mine[0]["trainable_params"]
        row["final_loss"] = mine[-1]["losses"][-1] if mine[-1]["losses"] else None
        for extra in (
            "options",
            "rehearsal",
            "boundary_rows",
            "anchors",
            "anchors_continued",
            "finish_month",
            "own_reference_rows",
        ):
            if extra in mine[0]:
                row[extra] = mine[0][extra]
        rows.append(row)
    return rows


def runs_median(runs: list[dict[str, Any]], field: str) -> float | None:
    return median([r[field] for r in runs])


def verdict(row: dict[str, Any]) -> dict[str, Any]:
    wall, cpu, mem = row["wall_ratio_paired_median"], row["cpu_ratio_paired_median"], row["mem_ratio_paired_median"]
    time_met = wall is not None and cpu is not None and wall <= TIME_BAR and cpu <= TIME_BAR
    memory_met = mem is not None and mem <= MEMORY_BAR
    return {
        "time_bar": TIME_BAR,
        "memory_bar": MEMORY_BAR,
        "wall_ratio": wall,
        "cpu_ratio": cpu,
        "memory_ratio": mem,
        "time_met": time_met,
        "memory_met": memory_met,
        "met": time_met and memory_met,
        "rule": f"time met when the paired median ratios of both wall and CPU time are <= {TIME_BAR}; memory met "
        f"when the paired median ratio of peak memory over the loaded model is <= {MEMORY_BAR}",
    }


# --------------------------------------------------------------------------------------------------- reporting
PHASE_LABELS = {
    "construct": "construction",
    "boundary_generation": "of which: boundary answers (generation)",
    "train": "train()",
    "anchor_generation": "of which: anchor continuations (generation)",
    "anchor_kl_forward": "of which: anchor-KL forwards (backward not separable)",
    "finish_month": "finish_month()",
    "finish_reference_logps": "of which: own-reference log-probs of the buffer rows",
}


def ratio3(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


def met_text(ok: bool) -> str:
    return "met" if ok else "NOT met"


def results_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    header = [
        "arm",
        "month wall s",
        "month CPU s",
        "wall vs plain",
        "CPU vs plain",
        "peak mem over model MiB",
        "mem vs plain",
        "train rows",
        "time <= 1.5x",
        "mem <= 1.2x",
    ]
    body = []
    for r in rows:
        plain = r["key"] == "plain"
        v = r.get("verdict")
        body.append(
            [
                f"{labels[r['key']]} (`{r['key']}`)",
                f"{r['month_wall_s_median']:.1f}",
                f"{r['month_cpu_s_median']:.1f}",
                "1.00x" if plain else fmt_ratio(r["wall_ratio_paired_median"]),
                "1.00x" if plain else fmt_ratio(r["cpu_ratio_paired_median"]),
                fmt_mib(r["peak_over_model_bytes_median"]),
                "1.00x" if plain else fmt_ratio(r["mem_ratio_paired_median"]),
                str(r["train_rows"]),
                "" if v is None else met_text(v["time_met"]),
                "" if v is None else met_text(v["memory_met"]),
            ]
        )
    return markdown_table(header, body)


def phases_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    names = [n for n in PHASE_LABELS if any(n in r["phases_median"] for r in rows)]
    header = ["phase (median wall s / CPU s)"] + [f"`{r['key']}`" for r in rows]
    body = []
    for name in names:
        cells = []
        for r in rows:
            p = r["phases_median"].get(name)
            cells.append("" if p is None else f"{p['wall_s']:.1f} / {p['cpu_s']:.1f}")
        body.append([PHASE_LABELS[name], *cells])
    return markdown_table(header, body)


def cost_text(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Where ours spends its extra time and memory: its phases against plain's, and each term alone (--terms)."""
    ours, plain = rows["ours"], rows["plain"]
    op, pp = ours["phases_median"], plain["phases_median"]

    def wall(phases, name):
        return (phases.get(name) or {}).get("wall_s") or 0.0

    extra = ours["month_wall_s_median"] - plain["month_wall_s_median"]
    lines = [
        f"Where `ours` spends its extra {extra:+.1f} s (median wall, against plain): "
        f"construction {wall(op, 'construct') - wall(pp, 'construct'):+.1f} s (boundary answers "
        f"{wall(op, 'boundary_generation'):.1f} s), train() {wall(op, 'train') - wall(pp, 'train'):+.1f} s (anchor "
        f"continuations {wall(op, 'anchor_generation'):.1f} s and anchor-KL forwards "
        f"{wall(op, 'anchor_kl_forward'):.1f} s of it, their backward not separable), finish_month() "
        f"{wall(op, 'finish_month'):.1f} s (own-reference "
        f"log-probs {wall(op, 'finish_reference_logps'):.1f} s)."
    ]
    singles = [k for k in rows if k.startswith("only_") or k == "ours_none"]
    if singles:
        parts = []
        for key in singles:
            r = rows[key]
            parts.append(
                f"`{key}` {fmt_ratio(r['wall_ratio_paired_median'])} wall / {fmt_ratio(r['cpu_ratio_paired_median'])} "
                f"CPU / {fmt_ratio(r['mem_ratio_paired_median'])} memory"
            )
        lines.append("Each term alone, against plain (paired medians): " + "; ".join(parts) + ".")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of one month of ContinualDPOTrainer with the recommended retention terms "
        "against plain TRL DPOTrainer with the same adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded", help="tiny: smoke tests only")
    parser.add_argument("--steps", type=int, default=18, help="optimizer steps per month (max_steps)")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (pairs)")
    parser.add_argument(
        "--month1-steps",
        type=int,
        default=6,
        help="steps of the untimed month 1 (it only creates the state month 2 starts from: the stacked month-1 "
        "adapter, the rehearsal buffer with its reference log-probs, a warm runtime; its length changes only the "
        "month-1 adapter's values, not what month 2 runs)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each runs every arm once in a fresh process")
    parser.add_argument("--terms", action="store_true", help="also ours_none and every term of the recipe alone")
    parser.add_argument(
        "--recipe", default=None, help="JSON object (or file) of ContinualDPOConfig options over RECOMMENDED"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default 1 on CPU: on a shared machine extra OpenMP threads wait for each "
        "other; 0: torch's default)",
    )
    add_output_args(parser, "month_cost")
    parser.add_argument("--_memory-worker", default=None, help=argparse.SUPPRESS)  # one (arm, round) in a subprocess
    args = parser.parse_args(argv)
    if min(args.steps, args.month1_steps, args.batch_size, args.repeats) < 1:
        parser.error("--steps, --month1-steps, --batch-size and --repeats must be >= 1")
    if args.threads == 0:
        args.threads = None
    elif args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    try:
        args.recipe_text = args.recipe
        args.recipe = parse_recipe(args.recipe)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    if args._memory_worker is not None:
        run_worker(args)
        return 0
    return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    started = time.time()
    load_start = load_average()
    keys = ["plain", *arm_recipes(args.recipe, args.terms)]
    labels = {key: arm_label(key, args.recipe) for key in keys}
    log(
        f"{len(keys)} arms {keys}, model {args.model}, {args.steps} steps x batch {args.batch_size}, {args.repeats} "
        f"round(s), device {args.device}, load average {load_start}"
    )
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    order = []
    for round_index in range(args.repeats):
        this_round = rotated(keys, round_index)
        order.append(this_round)
        for key in this_round:
            result = run_memory_workers_argv(__file__, args.argv, [key], log, note=f"round {round_index + 1}")[key]
            result["round"] = round_index
            result["load_average_after"] = load_average()
            runs[key].append(result)
        log(
            f"round {round_index + 1}/{args.repeats}: "
            + ", ".join(f"{k} {runs[k][-1]['month_wall_s']:.1f}s" for k in keys)
        )
    load_end = load_average()
    rows = summarize(keys, runs)
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        if r["key"] != "plain":
            r["verdict"] = verdict(r)
    main_verdict = by_key["ours"]["verdict"]
    elapsed = time.time() - started
    cuda = args.device.startswith("cuda")

    mem_definition = (
        "torch.cuda.max_memory_allocated during the month minus torch.cuda.memory_allocated after loading the model"
        if cuda
        else "peak resident set size of the worker process during the month (Linux VmHWM, reset via "
        "/proc/self/clear_refs right before the month) minus its RSS after loading the base model (after gc + "
        "malloc_trim, before month 1): what the month holds beyond the loaded model, month-1 state included (the "
        "month-1 adapter and rehearsal buffer for ours)"
    )
    machine = machine_info(torch_threads=args.threads or torch.get_num_threads(), device=args.device)
    sources = [REPO_ROOT / "benchmarks" / "month_cost.py"]
    continual = REPO_ROOT / "peft_selective" / "continual"
    sources += [continual / f for f in ("trainer.py", "config.py", "anchors.py", "rehearsal.py", "reference.py")]
    sources += [REPO_ROOT / "peft_selective" / "tuners" / "selective" / f for f in ("layer.py", "model.py")]
    report = {
        **report_header("month_cost", sources, machine, load_start, load_end),
        "model": "bundled SmolLM2-135M-Instruct (peft_selective.demo.embedded), fp32"
        if args.model == "embedded"
        else "tiny random-init 2-layer Llama (smoke test; numbers mean nothing)",
        "settings": {
            "months": list(MONTHS),
            "rows_per_month": args.steps * args.batch_size,
            "steps": args.steps,
            "month1_steps": args.month1_steps,
            "batch_size": args.batch_size,
            "adapter": f"SelectiveMLPConfig(rank={args.rank}, alpha={args.alpha:g})",
            "lr": args.lr,
            "beta": args.beta,
            "max_length": args.max_length,
            "seed": args.seed,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": args.device,
            "recipe": args.recipe,
            "recipe_is_recommended": args.recipe == RECOMMENDED,
            "order_per_round": order,
            "timed": "plain: DPOTrainer construction + train(); ours: ContinualDPOTrainer construction (rehearsal mix, "
            "anchor continuations, boundary answers, tokenization) + train() + finish_month('m2'); month 1 untimed",
            "month1": "plain: DPOTrainer + merge_and_unload; ours: ContinualDPOTrainer (adapter m1, no retention term, "
            "rehearsal buffer) + finish_month('m1')",
            "peak_memory": mem_definition,
            "ratios": "paired: arm / plain of the same round, median over rounds (also the ratio of medians)",
        },
        "results": rows,
        "verdict": main_verdict,
        "runs": runs,
        "runtime_s": round(elapsed, 1),
    }
    report["command"] = "python benchmarks/month_cost.py" + ("" if not args.argv else " " + shlex.join(args.argv))
    report["argv"] = ["benchmarks/month_cost.py", *args.argv]

    v = main_verdict
    header = (
        f"Model: {report['model']}; adapter {report['settings']['adapter']}; months {MONTHS[0]} (month 1, "
        f"{args.month1_steps} steps, untimed) then {MONTHS[1]} (the timed month), {args.steps} steps x batch "
        f"{args.batch_size}, device {args.device}, "
        f"{args.threads or torch.get_num_threads()} torch thread(s); {args.repeats} round(s), each arm in a fresh "
        f"process per round, order rotated every round. Recipe of `ours`: `{json.dumps(args.recipe)}`."
    )
    ours_row = next(r for r in rows if r["key"] == "ours")
    if ours_row.get("anchors"):
        header += (
            f" Its anchors: {ours_row['anchors']}, of which {ours_row.get('anchors_continued')} drawn by the month's "
            "steps and so continued."
        )
    notes = [header, "", results_table(rows, labels), "", phases_table(rows, labels), ""]
    notes.append(
        f"**Verdict** (ours vs plain, paired medians): time {ratio3(v['wall_ratio'])} wall / "
        f"{ratio3(v['cpu_ratio'])} CPU against <= {TIME_BAR}x: {met_text(v['time_met'])}; memory "
        f"{ratio3(v['memory_ratio'])} against <= {MEMORY_BAR}x: {met_text(v['memory_met'])}. Rule: {v['rule']}."
    )
    notes += cost_text(by_key)
    per_round = ", ".join(
        f"round {i + 1}: {fmt_ratio(w)} wall / {fmt_ratio(c)} CPU / {fmt_ratio(m)} mem"
        for i, (w, c, m) in enumerate(
            zip(
                by_key["ours"]["wall_ratio_per_round"],
                by_key["ours"]["cpu_ratio_per_round"],
                by_key["ours"]["mem_ratio_per_round"],
            )
        )
    )
    notes.append(f"Paired ratios of `ours` per round: {per_round}.")
    notes.append(f"Peak memory: {mem_definition}.")
    notes.append(
        "The machine is shared: absolute times move with the load average, the paired (same round, back to back) "
        "ratios much less; CPU time is less disturbed by other processes than wall time."
    )
    notes.append(runtime_note(elapsed, load_start, load_end))
    text = "\n".join(notes)
    details = f" ({report['machine']['torch_threads']} threads), device {args.device}"
    publish(args, report, "Month cost benchmark results", details, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
