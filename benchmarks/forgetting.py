"""Forgetting vs learning: monthly DPO on the bundled SmolLM2-135M-Instruct, every method in one harness.

A fixed sequence of three DPO months (`trl_ext.data`: `safety`, refuse harmful requests and answer their benign
look-alikes; `capitals`, a bare one-word answer over a chatty one; `currency`, JSON over prose) is trained in two
orders (A: safety -> capitals -> currency, B: currency -> capitals -> safety) with two training seeds, with identical
data, steps, batch and DPO settings for every method:

| key | what is trained each month | trainer |
|---|---|---|
| `full_ft` | every weight | TRL `DPOTrainer`, reference = a frozen copy of the model at the start of the month |
| `lora_all` | PEFT LoRA r=16 on q/k/v/o/gate/up/down | TRL `DPOTrainer`, merged into the weights at the end of the month |
| `lora_mlp` | PEFT LoRA r=16 on gate/up | idem |
| `selective_mlp_full` | `SelectiveMLPConfig(rank=None)`: full-rank gate/up update, down frozen | idem |
| `selective_mlp_lowrank` | `SelectiveMLPConfig(rank=16, alpha=32)` | idem |
| `saproj` | `SAProjConfig()`: full-rank q/k/v/o update | idem |
| `geometry` | `GeometryProjectedConfig()`, calibrated each month on general text + the earlier months' data | idem |
| `continual` | the best of our four methods (chosen on validation), a new adapter per month stacked on the frozen earlier ones | `trl_ext.ContinualDPOTrainer` with rehearsal + KL |

In every row the DPO reference of month t is the model after month t-1 (for the PEFT rows: the merged model with the
new adapter disabled; for `continual`: the earlier adapters only).

Protocol (fixed before the first run; see benchmarks/README.md):

* **Data.** Each month's pairs are built once (data seed 0, disjoint countries across months) and split into train,
  validation and test rows. Identical for every method, order and seed.
* **Learning rate.** Each method gets its learning rate from the grid `--lrs` on the *validation* rows: order A,
  the first seed, score = mean validation accuracy over the three months after the last month (the continual-learning
  "average accuracy"), ties to the smaller rate. The `continual` row uses the method with the best validation score
  among our four and its rate. Test rows are never used for a choice.
* **Metrics** (test rows, mean over orders x seeds): the retention matrix R[t][i] = held-out preference accuracy on
  month i after month t (share of pairs whose DPO implicit-reward margin against the *base* model is > 0; the base
  scores 0). Learning = mean_i R[i][i]; backward transfer BWT = mean_{i<T} (R[T][i] - R[i][i]) (negative = forgotten);
  the same two on the mean margins. General ability after the last month against the base: knowledge QA on held-out
  capitals, reference-text perplexity, refusal and over-refusal rates, KL to the base on generic prompts. Training wall
  time per month and peak memory (CUDA: `max_memory_allocated` above the pristine base each
  worker keeps, so the run's own model copy counts; CPU: peak RSS above it).
* **The bar** (issue #6): a peft-selective configuration keeps >= 95% of PEFT LoRA's learning while its forgetting
  (-BWT, and each general-ability drop) is <= 20% of LoRA's.

Usage:

    python benchmarks/forgetting.py --device cuda --workers 12 --threads 1   # the committed run: 405 s on one H100
    python benchmarks/forgetting.py --device cpu --workers 1       # same protocol on a CPU: not run; ~5 h estimated on 2 cores
    python benchmarks/forgetting.py --methods lora_mlp,selective_mlp_lowrank --orders A --seeds 0 --lrs 1e-4 \\
        --max-steps 1 --n-train 4 --n-val 2 --n-test 2 --output-dir /tmp/f   # smoke test

Each finished sequence is saved under `--work-dir` (one JSON per job), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    load_average,
    machine_info,
    markdown_table,
    prefixed_log,
    report_header,
    runtime_note,
    write_results,
)


log = prefixed_log("forgetting")

MONTHS = ("safety", "capitals", "currency")
ORDERS: dict[str, tuple[str, ...]] = {"A": MONTHS, "B": tuple(reversed(MONTHS))}
LEARNING_SHARE = 0.95  # the bar: >= 95% of LoRA's learning ...
FORGETTING_SHARE = 0.20  # ... with <= 20% of LoRA's forgetting
GENERAL_SUITES = ["knowledge", "perplexity", "kl", "refusal"]
# General-ability metrics and the sign that makes "drop" positive when the model got worse than the base.
GENERAL_DROPS: dict[str, Callable[[float, float], float]] = {
    "knowledge_qa": lambda base, final: base - final,
    "perplexity": lambda base, final: final / base - 1.0,
    "refusal_rate": lambda base, final: base - final,
    "over_refusal_rate": lambda base, final: final - base,
    "kl_to_base": lambda base, final: final,
}


# --------------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    key: str
    label: str
    ours: bool
    make_config: Callable[[argparse.Namespace], Any] | None  # None: full fine-tuning
    calibrate: bool = False


def _lora(modules: list[str]) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM"
        )

    return make


def _selective_mlp_full(args: argparse.Namespace) -> Any:
    from peft_selective import SelectiveMLPConfig

    return SelectiveMLPConfig(rank=None)


def _selective_mlp_lowrank(args: argparse.Namespace) -> Any:
    from peft_selective import SelectiveMLPConfig

    return SelectiveMLPConfig(rank=args.rank, alpha=args.alpha)


def _saproj(args: argparse.Namespace) -> Any:
    from peft_selective import SAProjConfig

    return SAProjConfig(rank=None)


def _geometry(args: argparse.Namespace) -> Any:
    from peft_selective import GeometryProjectedConfig

    return GeometryProjectedConfig()


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("full_ft", "Full fine-tuning", False, None),
        Method(
            "lora_all",
            "PEFT LoRA all-linear",
            False,
            _lora(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ),
        Method("lora_mlp", "PEFT LoRA gate/up", False, _lora(["gate_proj", "up_proj"])),
        Method("selective_mlp_full", "SelectiveMLP full-rank", True, _selective_mlp_full),
        Method(
            "selective_mlp_lowrank",
            "SelectiveMLP low-rank",
            True,
            _selective_mlp_lowrank,
        ),
        Method("saproj", "SAProj full-rank", True, _saproj),
        Method("geometry", "GeometryProjected", True, _geometry, calibrate=True),
    )
}
CONTINUAL = "continual"
CONTINUAL_PLAIN = "continual_plain"  # the same stacked adapters and reference, no retention term: issue #4's control
TRAINER_ROWS = (CONTINUAL, CONTINUAL_PLAIN)
LORA_BASELINES = ("lora_all", "lora_mlp")


@dataclass(frozen=True)
class Job:
    phase: str  # "grid" (validation rows) or "test"
    method: str  # a METHODS key, or CONTINUAL
    order: str
    seed: int
    lr: float
    base_method: str | None = None  # TRAINER_ROWS: the adapter method inside the trainer

    @property
    def name(self) -> str:
        inner = f"-{self.base_method}" if self.base_method else ""
        return f"{self.phase}-{self.method}{inner}-{self.order}-s{self.seed}-lr{self.lr:g}"


# --------------------------------------------------------------------------------------------------- data
def build_months(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """`{month: {"train", "val", "test"}}`, built once in the canonical order so that every order sees the same rows."""
    from trl_ext.data import monthly_sequence

    months = {}
    for name, splits in monthly_sequence(MONTHS, n_train=args.n_train + args.n_val, n_eval=args.n_test, seed=0):
        train = splits["train"]
        months[name] = {
            "train": train.select(range(args.n_train)),
            "val": train.select(range(args.n_train, args.n_train + args.n_val)),
            "test": splits["test"],
        }
    return months


def knowledge_questions(months: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    from trl_ext.data import held_out_capital_questions

    splits = [split for month in months.values() for split in month.values()]
    return held_out_capital_questions(splits, n=args.knowledge_questions, seed=0)


def protected_texts(tokenizer, months: dict[str, dict[str, Any]], earlier: Sequence[str], probe: list[dict]) -> list:
    """GeometryProjected's calibration data for a month: general text (pydoc), chat answers to capital questions
    on countries that neither the months nor the knowledge probe use, and the earlier months' train pairs."""
    from peft_selective.probes import capital_questions
    from trl_ext.data import countries_in
    from trl_ext.metrics import reference_text

    text = reference_text()
    passages = [text[i : i + 1000] for i in range(0, 8000, 1000)]
    exclude = sorted(countries_in([m for month in months.values() for m in month.values()]))
    exclude += [q["country"] for q in probe if q.get("country")]
    chats = [
        [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": f"{q['answer']}."}]
        for q in capital_questions(seed=1, exclude=exclude)[:40]
    ]
    for name in earlier:
        for row in months[name]["train"]:
            chats.append(list(row["prompt"]) + list(row["chosen"]))  # conversational rows: message lists
    return passages + [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]


def _eval_config(args: argparse.Namespace, suites: list[str]):
    from trl_ext.evaluation import EvaluationConfig

    return EvaluationConfig(
        suites=suites,
        knowledge_questions=args.knowledge_questions,
        refusal_prompts=args.refusal_prompts,
        perplexity_max_tokens=args.perplexity_tokens,
        max_length=args.max_length,
        batch_size=args.eval_batch_size,
    )


# --------------------------------------------------------------------------------------------------- one sequence
def load_base(args: argparse.Namespace):
    """The bundled SmolLM2-135M-Instruct (fp32), or with `--model tiny` a random-init 2-layer Llama with the same
    tokenizer: it runs the whole harness in seconds, for tests; its numbers mean nothing."""
    from peft_selective.embedded import embedded_model_path, load_embedded_model

    if args.model == "embedded":
        return load_embedded_model()
    import torch
    from _common import TINY_LLAMA
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


_WORKER: dict[str, Any] = {}


def init_worker(args: argparse.Namespace) -> None:
    """Load the base model, tokenizer, data and base reference log-probs once per process."""
    import torch
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_ext").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_base(args)
    base = base.to(args.device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    months = build_months(args)
    reference = json.loads((Path(args.work_dir) / "reference_logps.json").read_text())
    _WORKER.update(
        args=args,
        base=base,
        tokenizer=tokenizer,
        months=months,
        reference=reference,
        probe=knowledge_questions(months, args),
    )


def _memory_start(device: str) -> tuple[Callable[[], int], int]:
    """A peak-memory reader for the coming work, and the baseline it is measured above."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated, torch.cuda.memory_allocated()
    from _common import peak_rss_bytes, rss_bytes, start_peak_window

    baseline = rss_bytes()
    reset = start_peak_window()
    return (lambda: peak_rss_bytes(reset)), baseline


def _dpo_args(args: argparse.Namespace, job: Job, out: Path, config_class=None, **extra):
    import torch
    from trl import DPOConfig

    config_class = config_class or DPOConfig
    return config_class(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=job.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        beta=args.beta,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        tf32=args.device.startswith("cuda") and torch.cuda.is_available(),
        use_cpu=not args.device.startswith("cuda"),
        disable_tqdm=True,
        seed=job.seed,
        data_seed=job.seed,
        **extra,
    )


def _train_month_plain(model, method: Method, job: Job, month: str, earlier: list[str], out: Path):
    """One month with TRL's DPOTrainer; returns the plain model after it (adapters merged) and the train logs."""
    from trl import DPOTrainer

    import peft_selective

    w = _WORKER
    args, tokenizer = w["args"], w["tokenizer"]
    kwargs: dict[str, Any] = {}
    if method.make_config is None:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        kwargs["ref_model"] = ref
    else:
        kwargs["peft_config"] = method.make_config(args)
    trainer = DPOTrainer(
        model=model,
        args=_dpo_args(args, job, out),
        train_dataset=w["months"][month]["train"],
        processing_class=tokenizer,
        **kwargs,
    )
    if method.calibrate:
        texts = protected_texts(tokenizer, w["months"], earlier, w["probe"])
        peft_selective.calibrate(trainer.model, texts, tokenizer, show_progress=False)
    trainer.train()
    logs = trainer.state.log_history
    model = trainer.model
    if method.make_config is not None:
        model = model.merge_and_unload()
    del trainer, kwargs
    return model, logs


def _train_month_continual(model, method: Method, job: Job, t: int, month: str, earlier: list[str], out: Path):
    """One month with ContinualDPOTrainer (rehearsal + KL for `continual`, neither for `continual_plain`); returns the
    PeftModel holding adapters m1..mt."""
    import peft_selective
    from trl_ext import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer

    w = _WORKER
    args, tokenizer = w["args"], w["tokenizer"]
    adapter = f"m{t + 1}"
    retention = job.method == CONTINUAL
    config = _dpo_args(
        args,
        job,
        out / adapter,
        config_class=ContinualDPOConfig,
        adapter_name=adapter,
        rehearsal_ratio=args.rehearsal_ratio if retention else 0.0,
        kl_coef=args.kl_coef if retention else 0.0,
        kl_every=1,
        kl_max_general_anchors=args.kl_general_anchors,
    )
    trainer = ContinualDPOTrainer(
        model,
        args=config,
        train_dataset=w["months"][month]["train"],
        processing_class=tokenizer,
        peft_config=method.make_config(args),
        rehearsal_buffer=RehearsalBuffer(out / "buffer") if retention else None,
    )
    if method.calibrate:
        texts = protected_texts(tokenizer, w["months"], earlier, w["probe"])
        previous = f"m{t}" if t else None
        peft_selective.calibrate(
            trainer.model, texts, tokenizer, adapter_name=adapter, previous_adapter=previous, show_progress=False
        )
    trainer.train()
    if retention:
        trainer.finish_month(adapter)
    logs = trainer.state.log_history
    model = trainer.model
    del trainer
    return model, logs


def _log_summary(logs: list[dict]) -> dict[str, Any]:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "retention/kl", "rehearsal/fraction")
    rows = [e for e in logs if "loss" in e and "step" in e]
    summary: dict[str, Any] = {"steps": len(rows)}
    for key in keys:
        values = [float(e[key]) for e in rows if key in e]
        if values:
            summary[f"{key}_first"], summary[f"{key}_last"] = values[0], values[-1]
    return summary


def run_job(job: Job) -> dict[str, Any]:
    """Train one method through one order of months; evaluate after each month (and the general suite at the end)."""
    import torch
    from transformers import set_seed

    from trl_ext.evaluation import general_suite, preference_suite

    w = _WORKER
    args, tokenizer, base = w["args"], w["tokenizer"], w["base"]
    method = METHODS[job.base_method or job.method]
    split = "val" if job.phase == "grid" else "test"
    eval_sets = {m: w["months"][m][split] for m in MONTHS}
    references = {m: w["reference"][split][m] for m in MONTHS}
    pref_config = _eval_config(args, ["preference"])
    out = Path(tempfile.mkdtemp(prefix=f"{job.name}-", dir=args.scratch_dir))
    result: dict[str, Any] = {"job": asdict(job), "name": job.name, "months": list(ORDERS[job.order])}
    started = time.perf_counter()
    try:
        set_seed(job.seed)
        read_peak, mem_base = _memory_start(args.device)
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        after, train_seconds, logs = [], [], []
        for t, month in enumerate(ORDERS[job.order]):
            earlier = list(ORDERS[job.order][:t])
            set_seed(job.seed + t)
            tick = time.perf_counter()
            if job.method in TRAINER_ROWS:
                model, month_logs = _train_month_continual(model, method, job, t, month, earlier, out)
            else:
                model, month_logs = _train_month_plain(model, method, job, month, earlier, out / month)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            train_seconds.append(time.perf_counter() - tick)
            logs.append(_log_summary(month_logs))
            model.eval()
            scores = preference_suite(model, tokenizer, eval_sets, references, pref_config)
            after.append({m: {"accuracy": s["accuracy"], "mean_margin": s["mean_margin"]} for m, s in scores.items()})
            model.train()
        result["peak_memory_over_base_bytes"] = int(read_peak() - mem_base)
        result.update(after=after, train_seconds=train_seconds, train_logs=logs)
        if job.phase == "test":
            model.eval()
            result["general"] = general_suite(
                model, tokenizer, _eval_config(args, GENERAL_SUITES), knowledge_questions=w["probe"], base=base
            )
        result["wall_seconds"] = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
        model = None
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def _job_path(args: argparse.Namespace, job: Job) -> Path:
    return Path(args.work_dir) / "jobs" / f"{job.name}.json"


def run_job_to_file(job: Job) -> tuple[str, str | None]:
    """Worker entry point: run `job` and save its result atomically (resume skips saved jobs); a failure is returned,
    not raised, so that the other jobs still run."""
    import traceback

    from trl_ext._io import atomic_write_json

    args = _WORKER["args"]
    try:
        result = run_job(job)
    except Exception:  # noqa: BLE001 - reported by run_jobs once every job had its chance
        return job.name, traceback.format_exc()
    atomic_write_json(_job_path(args, job), result)
    return job.name, None


def run_jobs(args: argparse.Namespace, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Run the jobs not already saved (in `--workers` processes), then read every job's result."""
    todo = [job for job in jobs if not _job_path(args, job).exists()]
    log(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run on {args.workers} worker(s)")
    failures = {}
    if todo:
        if args.workers == 1:
            if not _WORKER:
                init_worker(args)
            outcomes = map(run_job_to_file, todo)
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(args.workers, mp_context=context, initializer=init_worker, initargs=(args,))
            outcomes = pool.map(run_job_to_file, todo)
        tick = time.perf_counter()
        for i, (name, error) in enumerate(outcomes, 1):
            log(f"[{i}/{len(todo)}] {name} {'FAILED' if error else 'done'} ({time.perf_counter() - tick:.0f} s)")
            if error:
                failures[name] = error
                print(error, file=sys.stderr)
        if args.workers > 1:
            pool.shutdown()
    if failures:
        raise RuntimeError(f"{len(failures)} job(s) failed: {sorted(failures)}; rerun to retry only those.")
    return {job.name: json.loads(_job_path(args, job).read_text()) for job in jobs}


# --------------------------------------------------------------------------------------------------- set-up
def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Base reference log-probs of every val/test split and the base's general metrics (saved; resumable)."""
    import torch

    from trl_ext._io import atomic_write_json
    from trl_ext.evaluation import general_suite, reference_logps_for

    work = Path(args.work_dir)
    ref_path, base_path = work / "reference_logps.json", work / "base.json"
    if ref_path.exists() and base_path.exists():
        return json.loads(base_path.read_text())
    tick = time.perf_counter()
    model, tokenizer = load_base(args)
    model = model.to(args.device).eval()
    months = build_months(args)
    config = _eval_config(args, GENERAL_SUITES)
    with torch.no_grad():
        reference = {
            split: {m: reference_logps_for(model, tokenizer, months[m][split], config) for m in MONTHS}
            for split in ("val", "test")
        }
    atomic_write_json(ref_path, reference)
    probe = knowledge_questions(months, args)
    base = {
        "general": general_suite(model, tokenizer, config, knowledge_questions=probe),
        "rows": {m: {s: len(months[m][s]) for s in ("train", "val", "test")} for m in MONTHS},
        "knowledge_questions": len(probe),
        "seconds": time.perf_counter() - tick,
    }
    atomic_write_json(base_path, base)
    del model
    gc.collect()
    return base


# --------------------------------------------------------------------------------------------------- metrics
def sequence_metrics(result: dict[str, Any], key: str = "accuracy") -> dict[str, float]:
    """Learning (mean R[i][i]) and backward transfer (mean_{i<T} R[T][i] - R[i][i]) of one sequence."""
    months, after = result["months"], result["after"]
    diag = [after[i][m][key] for i, m in enumerate(months)]
    final = [after[-1][m][key] for m in months[:-1]]
    bwt = statistics.fmean(f - d for f, d in zip(final, diag[:-1])) if final else math.nan
    return {
        "learning": statistics.fmean(diag),
        "bwt": bwt,
        "final_average": statistics.fmean(after[-1][m][key] for m in months),
    }


def grid_score(result: dict[str, Any]) -> float:
    """The learning-rate choice: average validation accuracy over all months after the last month."""
    return sequence_metrics(result)["final_average"]


def select_learning_rates(grid: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: every rate's validation score and the chosen one (best score, ties to the smaller rate)."""
    chosen = {}
    for method in methods:
        runs = [r for r in grid.values() if r["job"]["method"] == method]
        scores = sorted((grid_score(r), -r["job"]["lr"]) for r in runs)
        best_score, neg_lr = scores[-1]
        chosen[method] = {
            "lr": -neg_lr,
            "val_score": best_score,
            "grid": {f"{r['job']['lr']:g}": grid_score(r) for r in sorted(runs, key=lambda r: r["job"]["lr"])},
        }
    return chosen


def _mean_and_range(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(clean), "min": min(clean), "max": max(clean), "n": len(clean)}


def aggregate(results: list[dict[str, Any]], base_general: dict[str, float]) -> dict[str, Any]:
    """Mean (and min/max) over orders x seeds of one row's metrics."""
    per_run = []
    for r in results:
        acc, margin = sequence_metrics(r), sequence_metrics(r, "mean_margin")
        general = r.get("general", {})
        drops = {
            k: fn(base_general[k], general[k]) for k, fn in GENERAL_DROPS.items() if k in general and k in base_general
        }
        per_run.append(
            {
                "learning": acc["learning"],
                "bwt": acc["bwt"],
                "forgetting": max(0.0, -acc["bwt"]),
                "final_average": acc["final_average"],
                "margin_learning": margin["learning"],
                "margin_bwt": margin["bwt"],
                **{f"general_{k}": v for k, v in general.items()},
                **{f"drop_{k}": v for k, v in drops.items()},
                "train_seconds_per_month": statistics.fmean(r["train_seconds"]),
                "peak_memory_over_base_mib": r["peak_memory_over_base_bytes"] / 2**20,
            }
        )
    keys = sorted({k for run in per_run for k in run})
    return {k: _mean_and_range([run[k] for run in per_run if k in run]) for k in keys}


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every peft-selective row against each PEFT LoRA row: learning share and forgetting shares."""
    out = []
    drop_keys = sorted({k for row in rows.values() for k in row if k.startswith("drop_")})
    for ours in [k for k in rows if k in TRAINER_ROWS or METHODS[k].ours]:
        for lora in [k for k in LORA_BASELINES if k in rows]:
            o, b = rows[ours], rows[lora]
            learning_share = _share(o["learning"]["mean"], b["learning"]["mean"])
            shares = {"forgetting": _share(o["forgetting"]["mean"], b["forgetting"]["mean"])}
            for k in drop_keys:
                shares[k.removeprefix("drop_")] = _share(max(0.0, o[k]["mean"]), max(0.0, b[k]["mean"]))
            checks = {"learning": learning_share is not None and learning_share >= LEARNING_SHARE}
            for name, share in shares.items():
                checks[name] = share is not None and share <= FORGETTING_SHARE
            out.append(
                {
                    "ours": ours,
                    "lora": lora,
                    "learning_share": learning_share,
                    "forgetting_shares": shares,
                    "checks": checks,
                    "meets_bar": all(checks.values()),
                }
            )
    return out


def month_one_check(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #4's question, per (order, seed): month 1's held-out accuracy after month 2, with rehearsal + KL
    (`continual`) and without (`continual_plain`), same seed, steps and adapters."""
    by_run: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in results.values():
        if r["job"]["method"] in TRAINER_ROWS:
            by_run.setdefault((r["job"]["order"], r["job"]["seed"]), {})[r["job"]["method"]] = r
    rows = []
    for (order, seed), pair in sorted(by_run.items()):
        if len(pair) < 2:
            continue
        first = ORDERS[order][0]
        cells = {
            key: {
                "after_month1": pair[key]["after"][0][first]["accuracy"],
                "after_month2": pair[key]["after"][1][first]["accuracy"],
                "margin_after_month2": pair[key]["after"][1][first]["mean_margin"],
            }
            for key in TRAINER_ROWS
        }
        higher = cells[CONTINUAL]["after_month2"] > cells[CONTINUAL_PLAIN]["after_month2"]
        rows.append({"order": order, "seed": seed, "month1": first, **cells, "higher_with_retention": higher})
    return rows


def _share(ours: float, theirs: float) -> float | None:
    """ours / theirs; 0 when both are 0 (nothing to forget on either side); None when only theirs is 0."""
    if theirs == 0:
        return 0.0 if ours == 0 else None
    return ours / theirs


# --------------------------------------------------------------------------------------------------- report
def row_labels(report: dict[str, Any]) -> dict[str, str]:
    labels = {k: m.label for k, m in METHODS.items()}
    inner = METHODS[report["continual_method"]].label if report.get("continual_method") else "?"
    labels[CONTINUAL] = f"ContinualDPOTrainer + {inner}, rehearsal + KL"
    labels[CONTINUAL_PLAIN] = f"ContinualDPOTrainer + {inner}, no retention"
    return labels


def _fmt(stat: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    if not stat or stat.get("n", 0) == 0 or math.isnan(stat["mean"]):
        return "–"
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.{digits}f}"


def _fmt_share(share: float | None) -> str:
    return "n/a (LoRA: 0)" if share is None else f"{share:.2f}"


def render(report: dict[str, Any]) -> str:
    rows, base = report["rows"], report["base"]["general"]
    labels = row_labels(report)
    header = [
        "method",
        "lr",
        "learning (acc)",
        "BWT (acc)",
        "margin learning",
        "margin BWT",
        "knowledge QA",
        "perplexity",
        "refusal",
        "over-refusal",
        "KL to base",
        "train s/month",
        "peak mem over base (MiB)",
    ]
    table_rows = [
        [
            "base model",
            "–",
            "0.000",
            "–",
            "0.000",
            "–",
            f"{base.get('knowledge_qa', math.nan):.3f}",
            f"{base.get('perplexity', math.nan):.3f}",
            f"{base.get('refusal_rate', math.nan):.3f}",
            f"{base.get('over_refusal_rate', math.nan):.3f}",
            "0",
            "–",
            "–",
        ]
    ]
    for key, row in rows.items():
        table_rows.append(
            [
                labels[key],
                f"{report['learning_rates'][key]:g}",
                _fmt(row["learning"]),
                _fmt(row["bwt"], signed=True),
                _fmt(row["margin_learning"], 2),
                _fmt(row["margin_bwt"], 2, signed=True),
                _fmt(row.get("general_knowledge_qa")),
                _fmt(row.get("general_perplexity")),
                _fmt(row.get("general_refusal_rate")),
                _fmt(row.get("general_over_refusal_rate")),
                _fmt(row.get("general_kl_to_base"), 4),
                _fmt(row["train_seconds_per_month"], 1),
                _fmt(row["peak_memory_over_base_mib"], 0),
            ]
        )
    s = report["settings"]
    lines = [
        f"SmolLM2-135M-Instruct (bundled, float32), months {' / '.join(MONTHS)}; orders "
        + ", ".join(f"{o}: {' -> '.join(ORDERS[o])}" for o in s["orders"])
        + f"; seeds {s['seeds']}; {s['max_steps']} steps x batch {s['batch_size']} per month, beta {s['beta']}; "
        f"{s['n_train']} train / {s['n_val']} validation / {s['n_test']} test pairs per month; "
        f"{report['base']['knowledge_questions']} knowledge questions. Learning rates chosen on validation from "
        f"{s['lrs']}. Means over {len(s['orders']) * len(s['seeds'])} runs per row (orders x seeds); min/max in the JSON.",
        "",
        markdown_table(header, table_rows),
        "",
        "Learning: mean over months of the held-out accuracy on a month right after it (the base scores 0: accuracy is "
        "the share of pairs whose DPO implicit reward against the base favours the chosen answer). BWT: mean over the "
        "first two months of (accuracy after the last month - accuracy right after that month); negative = forgotten. "
        "Margin columns: the same on the mean implicit-reward margin (nats). General columns: after the last month "
        "(the base row is month 0). "
        f"ContinualDPOTrainer rows: a new {report['continual_method']} adapter per month "
        f"stacked on the frozen earlier ones; with retention: rehearsal_ratio {s['rehearsal_ratio']}, kl_coef "
        f"{s['kl_coef']} every step, no EWC.",
        "",
        "## The bar: >= 95% of LoRA's learning, <= 20% of its forgetting",
        "",
    ]
    vheader = (
        ["ours", "vs", "learning share", "forgetting share"]
        + [f"{k} drop share" for k in GENERAL_DROPS if any(k in v["forgetting_shares"] for v in report["verdicts"])]
        + ["meets the bar"]
    )
    vrows = []
    for v in report["verdicts"]:
        cells = [labels[v["ours"]], labels[v["lora"]], _fmt_share(v["learning_share"])]
        cells.append(_fmt_share(v["forgetting_shares"]["forgetting"]))
        cells += [_fmt_share(v["forgetting_shares"][k]) for k in GENERAL_DROPS if k in v["forgetting_shares"]]
        cells.append("yes" if v["meets_bar"] else "no")
        vrows.append(cells)
    lines += [
        markdown_table(vheader, vrows),
        "",
        "Shares are ours / LoRA's, on the row means. Forgetting = max(0, -BWT) per run, averaged over runs (a run "
        "that gained on earlier months counts 0, not a credit). A drop share compares how much each moved away from the base in "
        "the bad direction (knowledge lost, perplexity ratio - 1, refusals lost, over-refusals gained, KL); a negative "
        "drop counts as 0. 'n/a' = LoRA did not drop at all there, so no share of it can be computed (the check fails).",
        "",
        *month_one_section(report),
        "## Learning rates (validation grid)",
        "",
        markdown_table(
            ["method", *[f"{lr:g}" for lr in s["lrs"]], "chosen"],
            [
                [labels[k], *[_grid_cell(sel["grid"], lr) for lr in s["lrs"]], f"{sel['lr']:g}"]
                for k, sel in report["selection"].items()
            ],
        ),
        "",
        "Cells: average validation accuracy over the three months after the last month (order A, first seed).",
    ]
    return "\n".join(lines)


def month_one_section(report: dict[str, Any]) -> list[str]:
    check = report.get("month_one_check") or []
    if not check:
        return []
    rows = [
        [
            f"{c['order']} ({c['month1']} first)",
            str(c["seed"]),
            f"{c[CONTINUAL_PLAIN]['after_month1']:.3f}",
            f"{c[CONTINUAL_PLAIN]['after_month2']:.3f}",
            f"{c[CONTINUAL]['after_month2']:.3f}",
            f"{c[CONTINUAL_PLAIN]['margin_after_month2']:+.2f} / {c[CONTINUAL]['margin_after_month2']:+.2f}",
            "yes" if c["higher_with_retention"] else "no",
        ]
        for c in check
    ]
    held = sum(c["higher_with_retention"] for c in check)
    return [
        "## Month 1 after month 2: rehearsal + KL against no retention (issue #4)",
        "",
        markdown_table(
            [
                "order",
                "seed",
                "month 1 acc after month 1",
                "after month 2, no retention",
                "after month 2, rehearsal + KL",
                "margin after month 2 (none / retention)",
                "higher with retention",
            ],
            rows,
        ),
        "",
        f"Higher with rehearsal + KL in {held} of {len(check)} runs (test pairs; same seed, steps, data and adapters).",
        "",
    ]


def _grid_cell(grid: dict[str, float], lr: float) -> str:
    value = grid.get(f"{lr:g}")
    return "–" if value is None else f"{value:.3f}"


def scatter_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = row_labels(report)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (x_key, x_label) in zip(
        axes,
        [("forgetting", "forgetting: -BWT on held-out accuracy"), ("general_kl_to_base", "KL to base (nats/token)")],
    ):
        for key, row in report["rows"].items():
            if x_key not in row:
                continue
            x, y = row[x_key], row["learning"]
            ours = key in TRAINER_ROWS or METHODS[key].ours
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]],
                fmt="o" if ours else "s",
                color="tab:green" if ours else "tab:gray",
                capsize=3,
            )
            ax.annotate(labels[key], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel("learning: held-out accuracy right after each month")
        ax.grid(alpha=0.3)
    fig.suptitle("Monthly DPO on SmolLM2-135M-Instruct: learning vs forgetting (mean, min-max over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forgetting vs learning of monthly DPO on the bundled SmolLM2: PEFT LoRA, full fine-tuning and the "
        "peft-selective methods in one harness.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--methods", default=",".join([*METHODS, *TRAINER_ROWS]), help="comma-separated subset")
    parser.add_argument("--orders", default="A,B", help=f"comma-separated; {ORDERS}")
    parser.add_argument("--seeds", default="0,1", help="training seeds (adapter init, data order)")
    parser.add_argument("--lrs", default="1e-6,1e-5,1e-4,1e-3", help="learning-rate grid (one value: no grid phase)")
    parser.add_argument("--n-train", type=int, default=36, help="train pairs per month")
    parser.add_argument("--n-val", type=int, default=12, help="validation pairs per month (learning-rate choice)")
    parser.add_argument("--n-test", type=int, default=24, help="test pairs per month")
    parser.add_argument("--max-steps", type=int, default=18, help="optimizer steps per month (2 epochs by default)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (TRL's default)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16, help="rank of LoRA and of the low-rank SelectiveMLP")
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--rehearsal-ratio", type=float, default=0.25, help="the continual row")
    parser.add_argument("--kl-coef", type=float, default=1.0, help="the continual row (KL every step)")
    parser.add_argument(
        "--kl-general-anchors", type=int, default=None, help="general anchor prompts (default: the trainer's, all 32)"
    )
    parser.add_argument("--knowledge-questions", type=int, default=40)
    parser.add_argument("--refusal-prompts", type=int, default=20)
    parser.add_argument("--perplexity-tokens", type=int, default=4096)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--model",
        choices=["embedded", "tiny"],
        default="embedded",
        help="embedded: the bundled SmolLM2-135M-Instruct; tiny: a random 2-layer Llama with its tokenizer (tests)",
    )
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="processes running jobs in parallel")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--work-dir", default="outputs/forgetting", help="saved jobs (resume) and scratch")
    parser.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true", help="print, write no result files")
    parser.add_argument(
        "--render-only",
        type=Path,
        default=None,
        help="re-render the markdown and plot of a saved forgetting.json into --output-dir; nothing is trained",
    )
    args = parser.parse_args(argv)
    args.method_keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in args.method_keys if k not in METHODS and k not in TRAINER_ROWS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {[*METHODS, *TRAINER_ROWS]}")
    trainer_rows = [k for k in args.method_keys if k in TRAINER_ROWS]
    if trainer_rows and not any(METHODS[k].ours for k in args.method_keys if k in METHODS):
        parser.error(f"{trainer_rows} run the best of our methods: include at least one of them in --methods")
    args.order_keys = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not args.order_keys or any(o not in ORDERS for o in args.order_keys):
        parser.error(f"--orders must be a comma-separated subset of {sorted(ORDERS)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.lr_grid = sorted(_floats(args.lrs))
    if not args.seed_list or not args.lr_grid:
        parser.error("--seeds and --lrs need at least one value each")
    args.scratch_dir = str(Path(args.work_dir) / "scratch")
    return args


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def render_saved(report_path: Path, output_dir: Path) -> None:
    """Rewrite forgetting.md and forgetting.png from a saved report (numbers untouched: same JSON, new wording)."""
    report = json.loads(report_path.read_text())
    report["verdicts"] = verdicts(report["rows"])
    loads = report["load_average_1_5_15"]
    text = render(report) + "\n\n" + runtime_note(report["runtime_s"], loads["start"], loads["end"])
    if report.get("git_commit_note"):
        text = f"Provenance: {report['git_commit_note']}\n\n{text}"
    write_results(
        output_dir, report, "Forgetting vs learning benchmark", f", device {report['machine']['device']}", text
    )
    scatter_plot(report, output_dir / "forgetting.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only is not None:
        render_saved(args.render_only, args.output_dir)
        return 0
    import torch

    work = Path(args.work_dir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    Path(args.scratch_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started, load_start = time.time(), load_average()

    base = prepare(args)
    log(f"base: {base['general']}")
    plain = [k for k in args.method_keys if k in METHODS]
    first_seed = args.seed_list[0]
    if len(args.lr_grid) > 1:
        grid_jobs = [Job("grid", m, "A", first_seed, lr) for lr in args.lr_grid for m in plain]
        grid = run_jobs(args, grid_jobs)
        selection = select_learning_rates(grid, plain)
    else:
        grid, selection = {}, {m: {"lr": args.lr_grid[0], "val_score": None, "grid": {}} for m in plain}
    learning_rates = {m: selection[m]["lr"] for m in plain}
    best_ours = None
    if any(k in TRAINER_ROWS for k in args.method_keys):
        ours = [m for m in plain if METHODS[m].ours]
        # Best validation score; ties to the earlier row of METHODS. With no grid, the first of ours.
        best_ours = max(ours, key=lambda m: (selection[m]["val_score"] or 0.0, -list(METHODS).index(m)))
        for key in TRAINER_ROWS:
            learning_rates[key] = learning_rates[best_ours]
    log(f"learning rates: {learning_rates}" + (f"; continual runs {best_ours}" if best_ours else ""))

    test_jobs = [
        Job("test", m, order, seed, learning_rates[m], best_ours if m in TRAINER_ROWS else None)
        for order in args.order_keys
        for seed in args.seed_list
        for m in args.method_keys
    ]
    results = run_jobs(args, test_jobs)
    rows = {
        m: aggregate([r for r in results.values() if r["job"]["method"] == m], base["general"])
        for m in args.method_keys
    }
    load_end = load_average()
    machine = machine_info(
        torch_threads=torch.get_num_threads(),
        device=args.device,
        workers=args.workers,
        **(
            {"cuda_device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
            if args.device.startswith("cuda")
            else {}
        ),
    )
    import trl

    machine["trl"] = trl.__version__
    sources = [
        Path(__file__),
        REPO_ROOT / "trl_ext" / "continual_dpo_trainer.py",
        REPO_ROOT / "trl_ext" / "evaluation.py",
    ]
    report = {
        **report_header("forgetting", sources, machine, load_start, load_end),
        "settings": {
            "months": list(MONTHS),
            "orders": args.order_keys,
            "seeds": args.seed_list,
            "lrs": args.lr_grid,
            **{
                k: getattr(args, k)
                for k in (
                    "n_train",
                    "n_val",
                    "n_test",
                    "max_steps",
                    "batch_size",
                    "beta",
                    "max_length",
                    "rank",
                    "alpha",
                    "rehearsal_ratio",
                    "kl_coef",
                    "kl_general_anchors",
                    "model",
                    "knowledge_questions",
                    "refusal_prompts",
                    "perplexity_tokens",
                )
            },
            "dtype": "float32",
            "optimizer": "AdamW (TRL default), constant learning rate, no warmup, weight decay 0",
        },
        "base": base,
        "selection": selection,
        "learning_rates": learning_rates,
        "continual_method": best_ours,
        "rows": rows,
        "verdicts": verdicts(rows),
        "month_one_check": month_one_check(results),
        "runs": results,
        "grid_runs": grid,
        "runtime_s": round(time.time() - started, 1),
    }
    text = render(report) + "\n\n" + runtime_note(time.time() - started, load_start, load_end)
    print(text)
    if not args.no_write:
        write_results(args.output_dir, report, "Forgetting vs learning benchmark", f", device {args.device}", text)
        scatter_plot(report, args.output_dir / "forgetting.png")
        log(f"wrote {args.output_dir}/forgetting.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
