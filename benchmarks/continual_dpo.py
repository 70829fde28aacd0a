"""Step time and peak memory of `ContinualDPOTrainer` with the retention KL every step against TRL's `DPOTrainer`.

Issue target: with the same adapter and batch, a `ContinualDPOTrainer` step with the KL term computed every step
(`kl_coef > 0`, `kl_every=1`) costs at most 1.3x the step time and 1.15x the peak memory of a plain `DPOTrainer` step.

Arms (same base weights, same adapter config and init, same data in the same order, same batch and `max_length`):

* `plain`: `trl.DPOTrainer(model, args=DPOConfig(...), peft_config=SelectiveMLPConfig(rank=R))`;
* `kl`: `peft_selective.continual.ContinualDPOTrainer` with the same `peft_config`, `kl_coef > 0`, `kl_every=1` and the default
  `kl_batch_size` (half the training batch): the target row;
* `kl_ewc` (opt-in, `--arms plain,kl,kl_ewc`): the same plus EWC (`ewc_coef > 0`) against a stored synthetic Fisher.

Measurements (see benchmarks/README.md):

* **step time**: each arm runs its own, unmodified `trainer.train()` in its own thread; a `TrainerCallback` passes a
  baton so that exactly one arm runs at any moment, one optimizer step per turn, round-robin with the order rotated
  every round, and records the wall time (and the thread's CPU time) from `on_step_begin` to `on_step_end`: forward,
  backward, KL / EWC terms, gradient clipping, `optimizer.step`, scheduler, `zero_grad`. Data loading and logging
  run outside the timed window, with the baton held;
* **peak memory**: a fresh subprocess per arm; on CPU the growth of the peak resident set size (Linux `VmHWM`, reset
  through `/proc/self/clear_refs`) above the RSS of the loaded base model, over trainer construction and
  `--mem-steps` training steps.

Usage:

    python benchmarks/continual_dpo.py                      # the committed results (bundled SmolLM2-135M, CPU)
    python benchmarks/continual_dpo.py --config tiny --output-dir /tmp/bench   # smoke test, about a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


if __package__ in (None, ""):  # `python benchmarks/<name>.py`: import the `benchmarks` package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    TINY_LLAMA,
    adapted_module_names,
    add_memory_args,
    add_output_args,
    add_round_args,
    check_round_args,
    emit_memory_result,
    fmt_mib,
    fmt_ratio,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    prefixed_log,
    publish,
    release_free_memory,
    report_header,
    rotated,
    rss_bytes,
    run_memory_workers,
    runtime_note,
    safe_ratio,
    setup_torch,
    start_peak_window,
    warm_up_runtime,
)
from benchmarks.methods import selective_mlp_config  # noqa: E402


TIME_TARGET = 1.3
MEMORY_TARGET = 1.15
TARGET_ARM = "kl"
BASELINE_ARM = "plain"
log = prefixed_log("continual_dpo")

MONTHS = {
    "capitals": "concise_capitals_month",
    "currency": "json_currency_month",
    "languages": "bulleted_languages_month",
    "safety": "safety_month",
}


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    kl: bool
    ewc: bool


ARMS = {
    "plain": Arm("plain", "DPOTrainer (TRL)", kl=False, ewc=False),
    "kl": Arm("kl", "ContinualDPOTrainer, KL every step", kl=True, ewc=False),
    "kl_ewc": Arm("kl_ewc", "ContinualDPOTrainer, KL every step + EWC", kl=True, ewc=True),
}


# --------------------------------------------------------------------------------------------------- set-up
def tiny_tokenizer(dataset):
    """A byte-level BPE tokenizer (1,024 tokens, ChatML template) trained on the month's text and the anchor prompts:
    with the bundled tokenizer's 49,152-token vocabulary, the LM head alone would make a tiny model's step slow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peft_selective.continual import general_anchor_prompts

    corpus = list(general_anchor_prompts())
    for row in dataset:
        corpus += [turn["content"] for column in ("prompt", "chosen", "rejected") for turn in row[column]]
    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def load_model_and_tokenizer(args: argparse.Namespace, dataset):
    """The base model (fp32, train mode) and tokenizer, and a description of where they came from."""
    import torch

    if args.config == "smollm2-135m":
        from peft_selective.demo.embedded import load_embedded_model

        model, tokenizer = load_embedded_model()
        description = "bundled SmolLM2-135M-Instruct, real weights (peft_selective.demo.embedded.load_embedded_model)"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = tiny_tokenizer(dataset)
        config = LlamaConfig(
            **TINY_LLAMA,
            vocab_size=len(tokenizer),  # the `tiny_tokenizer`'s
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        description = "random-init tiny LlamaForCausalLM with a 1,024-token BPE tokenizer (smoke test only)"
    model.config.use_cache = False
    model.train()
    return model, tokenizer, description


def load_dataset(args: argparse.Namespace):
    from peft_selective.demo import months as data

    builder = getattr(data, MONTHS[args.month])
    return builder(n_train=args.n_train, n_eval=1, seed=args.seed)["train"]


def peft_config(args: argparse.Namespace):
    """SelectiveMLP at `--rank` / `--alpha`, or at full rank without `--rank`."""
    return selective_mlp_config(args.rank, args.alpha)


def write_synthetic_fisher(base, directory: Path, seed: int) -> int:
    """A stored Fisher for the layers SelectiveMLP adapts (every gate_proj / up_proj), positive random values.

    It costs what a real one costs (one fp32 `(out, in)` tensor per adapted layer, read at construction and weighted
    into the penalty every step); the trainer checks that it covers the adapter's layers when it is built.
    """
    import torch
    from torch import nn

    from peft_selective.continual import FisherState

    generator = torch.Generator().manual_seed(seed)
    fisher = {
        name: torch.rand(module.out_features, module.in_features, generator=generator) + 0.5
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj")
    }
    FisherState(fisher, ["synthetic"], 64, getattr(base.config, "_name_or_path", None)).save(directory)
    return len(fisher)


def build_trainer(arm: Arm, model, tokenizer, dataset, args, max_steps: int, work_dir: Path, callbacks=()):
    """The arm's trainer on `model` (not copied), with its adapter created after re-seeding."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer

    common = {
        "output_dir": str(work_dir / arm.key),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": max_steps,
        "bf16": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "train_sampling_strategy": "sequential",  # the same batches in the same order for every arm
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
    }
    if args.max_length is not None:
        common["max_length"] = args.max_length
    torch.manual_seed(args.seed)  # same adapter init whatever was built before
    if arm.kl:
        config = ContinualDPOConfig(**common, **retention_settings(arm, args, work_dir))
    else:
        config = DPOConfig(**common)
    trainer_class = ContinualDPOTrainer if arm.kl else DPOTrainer
    return trainer_class(
        model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(args),
        callbacks=list(callbacks),
    )


def retention_settings(arm: Arm, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """The `ContinualDPOConfig` fields of a KL arm: KL every step, and EWC against the stored Fisher where on."""
    retention = {
        "kl_coef": args.kl_coef,
        "kl_every": 1,
        "kl_batch_size": args.kl_batch_size,
        "kl_anchor_max_new_tokens": args.kl_anchor_max_new_tokens,
    }
    if arm.ewc:
        retention.update(ewc_coef=args.ewc_coef, fisher_dir=str(work_dir / "fisher"))
    return retention


def quiet_trainer(trainer) -> None:
    """No per-step log printing (the logs stay in `trainer.state.log_history`)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def record_batches(trainer, log: dict[str, list]) -> None:
    """Record the shape of every training batch, and of every KL anchor batch (instance-level wrappers)."""
    training_step = trainer.training_step

    def recorded_training_step(model, inputs, *rest, **kwargs):
        mask = inputs["attention_mask"]
        log["dpo_batches"].append([int(mask.shape[0]), int(mask.shape[1]), int(mask.sum())])
        return training_step(model, inputs, *rest, **kwargs)

    trainer.training_step = recorded_training_step
    anchors = getattr(trainer, "anchors", None)
    if anchors is not None:
        sample = anchors.sample

        def recorded_sample(*a, **kw):
            batch = sample(*a, **kw)
            log["kl_batches"].append(
                [int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]), int(batch.score_mask.sum())]
            )
            return batch

        anchors.sample = recorded_sample


# --------------------------------------------------------------------------------------------------- timing
class Baton:
    """Turn-taking between the arms' training threads: `turns` is the sequence of arms allowed to run."""

    def __init__(self, turns: list[str]) -> None:
        self.turns = turns
        self.index = 0
        self.failed: BaseException | None = None
        self._cond = threading.Condition()

    def wait(self, key: str) -> None:
        with self._cond:
            while self.failed is None and (self.index >= len(self.turns) or self.turns[self.index] != key):
                self._cond.wait()
            if self.failed is not None:
                raise RuntimeError(f"aborted: another arm failed ({self.failed!r})")

    def done(self, key: str) -> None:
        with self._cond:
            if self.turns[self.index] != key:
                raise RuntimeError(f"{key} ended a turn that was {self.turns[self.index]}'s")
            self.index += 1
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.failed = self.failed or error
            self._cond.notify_all()


def make_step_timer(key: str, baton: Baton, record: dict[str, list]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Holds the baton for one optimizer step per turn; times `on_step_begin` -> `on_step_end`."""

        def on_train_begin(self, args, state, control, **kwargs):
            baton.done(key)  # the entry turn: the trainer's own set-up ran alone
            baton.wait(key)

        def on_step_begin(self, args, state, control, **kwargs):
            self.cpu = time.thread_time()
            self.wall = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            wall = time.perf_counter() - self.wall
            cpu = time.thread_time() - self.cpu
            record["wall"].append(wall)
            record["cpu"].append(cpu)
            log(f"{key} step {state.global_step}: {wall:.2f} s (cpu {cpu:.2f} s)")
            baton.done(key)
            baton.wait(key)  # the next step, or the exit turn after the last one

        def on_train_end(self, args, state, control, **kwargs):
            baton.done(key)

    return StepTimer()


def adapter_state(model) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def run_timing(args: argparse.Namespace, arms: list[Arm], work_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    dataset = load_dataset(args)
    base, tokenizer, description = load_model_and_tokenizer(args, dataset)
    model_info = {"description": description, "parameters": sum(p.numel() for p in base.parameters())}
    if any(arm.ewc for arm in arms):
        model_info["synthetic_fisher_layers"] = write_synthetic_fisher(base, work_dir / "fisher", args.seed)

    steps = args.warmup + args.repeats
    keys = [arm.key for arm in arms]
    turns = list(keys)  # entry turns: each trainer's train() set-up
    for round_index in range(steps):
        turns += rotated(keys, round_index)
    turns += keys  # exit turns: each train() call finishes alone
    baton = Baton(turns)

    runs: dict[str, dict[str, Any]] = {}
    for arm in arms:
        record: dict[str, list] = {"wall": [], "cpu": [], "dpo_batches": [], "kl_batches": []}
        started = time.perf_counter()
        trainer = build_trainer(
            arm,
            copy.deepcopy(base),
            tokenizer,
            dataset,
            args,
            steps,
            work_dir,
            callbacks=[make_step_timer(arm.key, baton, record)],
        )
        build_s = time.perf_counter() - started
        quiet_trainer(trainer)
        record_batches(trainer, record)
        runs[arm.key] = {
            "trainer": trainer,
            "record": record,
            "build_s": build_s,
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "adapted_modules": adapted_module_names(trainer.model),
            "initial_adapter": adapter_state(trainer.model),
        }
        log(f"built {arm.key} in {build_s:.1f} s")
    del base
    gc.collect()

    reference = runs[keys[0]]["initial_adapter"]
    same_init = {
        key: run["initial_adapter"].keys() == reference.keys()
        and all(torch.equal(tensor, reference[name]) for name, tensor in run["initial_adapter"].items())
        for key, run in runs.items()
    }

    errors: dict[str, BaseException] = {}

    def train(key: str) -> None:
        try:
            baton.wait(key)
            runs[key]["trainer"].train()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors[key] = error
            baton.fail(error)

    log(f"timing: {args.warmup} warm-up + {args.repeats} timed round-robin rounds")
    threads = [threading.Thread(target=train, args=(key,), name=f"arm-{key}") for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        key, error = next(iter(errors.items()))
        raise RuntimeError(f"training arm {key!r} failed") from error

    results: dict[str, Any] = {}
    for key, run in runs.items():
        record, trainer = run["record"], run["trainer"]
        if len(record["wall"]) != steps:
            raise RuntimeError(f"{key}: {len(record['wall'])} steps timed, expected {steps}")
        wall, cpu = record["wall"][args.warmup :], record["cpu"][args.warmup :]
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results[key] = {
            "trainable_params": run["trainable_params"],
            "adapted_modules": len(run["adapted_modules"]),
            "adapted_module_names": run["adapted_modules"],
            "same_adapter_init_as_first_arm": same_init[key],
            "build_s": round(run["build_s"], 1),
            "step_times_s": wall,
            "warmup_step_times_s": record["wall"][: args.warmup],
            "step_time_median_s": statistics.median(wall),
            "step_time_min_s": min(wall),
            "step_time_max_s": max(wall),
            "step_cpu_times_s": cpu,
            "step_cpu_median_s": statistics.median(cpu),
            "dpo_batches_rows_width_tokens": record["dpo_batches"],
            "kl_batches_rows_width_scored": record["kl_batches"],
            "losses": [entry["loss"] for entry in logs],
            "retention_kl": [entry["retention/kl"] for entry in logs if "retention/kl" in entry],
            "retention_ewc": [entry["retention/ewc"] for entry in logs if "retention/ewc" in entry],
        }
    for run in runs.values():
        run.clear()  # drop the trainers and models before the memory subprocesses run
    runs.clear()
    gc.collect()
    return results, model_info


# --------------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace, work_dir: Path) -> None:
    """In a fresh process: load the base, build one arm's trainer and train `--mem-steps` steps; print peaks."""
    import peft  # noqa: F401 - libraries imported before the baseline: import costs are not charged to an arm
    import torch
    import trl  # noqa: F401

    import peft_selective.continual  # noqa: F401

    arm = ARMS[args._memory_worker]
    dataset = load_dataset(args)
    base, tokenizer, _ = load_model_and_tokenizer(args, dataset)
    if arm.ewc:
        write_synthetic_fisher(base, work_dir / "fisher", args.seed)
    # the same 8 tokens for every arm
    warm_up_runtime(base, torch.tensor([tokenizer("What is the capital of France? Paris.")["input_ids"][:8]]))
    baseline = rss_bytes()
    trainer = build_trainer(arm, base, tokenizer, dataset, args, args.mem_steps, work_dir)
    quiet_trainer(trainer)
    release_free_memory()
    after_build = rss_bytes()
    hwm_reset = start_peak_window()
    trainer.train()
    peak = peak_rss_bytes(hwm_reset)
    if hwm_reset:
        peak_method = "VmHWM, reset (/proc/self/clear_refs) after the trainer was built"
    else:
        peak_method = "ru_maxrss (NOT reset: includes loading)"
    out = {
        "arm": arm.key,
        "peak_bytes": peak,
        "base_bytes": baseline,
        "after_build_bytes": after_build,
        "build_over_base_bytes": after_build - baseline,
        "train_peak_over_base_bytes": peak - baseline,
        "peak_method": peak_method,
        "steps": trainer.state.global_step,
    }
    emit_memory_result(__file__, out)


# --------------------------------------------------------------------------------------------------- reporting
def build_rows(arms: list[Arm], timing: dict, memory: dict) -> list[dict[str, Any]]:
    base_t, base_m = timing[BASELINE_ARM], memory.get(BASELINE_ARM, {})
    rows = []
    for arm in arms:
        t, m = timing[arm.key], memory.get(arm.key, {})
        paired = [a / b for a, b in zip(t["step_times_s"], base_t["step_times_s"])]
        rows.append(
            {
                "key": arm.key,
                "arm": arm.label,
                **{k: v for k, v in t.items() if k != "adapted_module_names"},
                "peak_rss_bytes": m.get("peak_bytes"),
                "train_mem_over_base_bytes": m.get("train_peak_over_base_bytes"),
                "build_mem_over_base_bytes": m.get("build_over_base_bytes"),
                "time_ratio": safe_ratio(t["step_time_median_s"], base_t["step_time_median_s"]),
                "cpu_time_ratio": safe_ratio(t["step_cpu_median_s"], base_t["step_cpu_median_s"]),
                "paired_time_ratios": paired,
                "paired_time_ratio_median": statistics.median(paired),
                "mem_ratio": safe_ratio(m.get("train_peak_over_base_bytes"), base_m.get("train_peak_over_base_bytes")),
                "peak_rss_ratio": safe_ratio(m.get("peak_bytes"), base_m.get("peak_bytes")),
            }
        )
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "arm",
        "step time median (s)",
        "min-max (s)",
        "time vs plain",
        "paired (median)",
        "CPU time vs plain",
        "peak RSS (MiB)",
        "train mem over base (MiB)",
        "mem vs plain",
    ]
    return markdown_table(header, [results_row(r) for r in rows])


def results_row(r: dict[str, Any]) -> list[str]:
    return [
        r["arm"],
        f"{r['step_time_median_s']:.2f}",
        f"{r['step_time_min_s']:.2f}-{r['step_time_max_s']:.2f}",
        fmt_ratio(r["time_ratio"]),
        fmt_ratio(r["paired_time_ratio_median"]),
        fmt_ratio(r["cpu_time_ratio"]),
        fmt_mib(r["peak_rss_bytes"]),
        fmt_mib(r["train_mem_over_base_bytes"]),
        fmt_ratio(r["mem_ratio"]),
    ]


def targets(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    row = {r["key"]: r for r in rows}.get(TARGET_ARM)
    if row is None:
        return None
    time_ratio, mem_ratio = row["time_ratio"], row["mem_ratio"]
    return {
        "arm": TARGET_ARM,
        "compared_with": BASELINE_ARM,
        "time": {
            "target": f"step time <= {TIME_TARGET}x plain DPOTrainer (ratio of median wall-clock step times)",
            "threshold": TIME_TARGET,
            "ratio": time_ratio,
            "paired_ratio_median": row["paired_time_ratio_median"],
            "paired_ratio_min": min(row["paired_time_ratios"]),
            "paired_ratio_max": max(row["paired_time_ratios"]),
            "cpu_time_ratio": row["cpu_time_ratio"],
            "meets_target": time_ratio <= TIME_TARGET,
        },
        "memory": {
            "target": f"peak memory <= {MEMORY_TARGET}x plain DPOTrainer (training memory over the loaded base)",
            "threshold": MEMORY_TARGET,
            "ratio": mem_ratio,
            "peak_rss_ratio": row["peak_rss_ratio"],
            "meets_target": None if mem_ratio is None else mem_ratio <= MEMORY_TARGET,
        },
    }


def verdict_text(v: dict[str, Any] | None) -> str:
    if v is None:
        return f"Target check skipped: needs the `{TARGET_ARM}` and `{BASELINE_ARM}` arms."
    t, m = v["time"], v["memory"]
    lines = [
        f"**Time** (target <= {t['threshold']}x): ratio of medians {t['ratio']:.3f}x -> "
        f"**{'MEETS' if t['meets_target'] else 'MISSES'}** (per-round paired ratios: median "
        f"{t['paired_ratio_median']:.3f}x, range {t['paired_ratio_min']:.3f}x-{t['paired_ratio_max']:.3f}x; "
        f"thread CPU time ratio of medians {t['cpu_time_ratio']:.3f}x)."
    ]
    if m["ratio"] is None:
        lines.append("**Memory**: not measured (`--skip-memory`).")
    else:
        lines.append(
            f"**Memory** (target <= {m['threshold']}x): training memory over base {m['ratio']:.3f}x -> "
            f"**{'MEETS' if m['meets_target'] else 'MISSES'}** (whole-process peak RSS ratio "
            f"{m['peak_rss_ratio']:.3f}x)."
        )
    return "\n\n".join(lines)


def _mean_shape(batches: list[list[int]]) -> str:
    if not batches:
        return "none"
    rows = statistics.mean(b[0] for b in batches)
    width = statistics.mean(b[1] for b in batches)
    return f"{rows:g} rows x {width:.0f} tokens (mean padded width)"


# --------------------------------------------------------------------------------------------------- CLI
def _rank(value: str) -> int | None:
    return None if value.lower() in ("full", "none") else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Step time and peak memory of ContinualDPOTrainer with the retention KL every step against TRL's "
            "DPOTrainer, same adapter (SelectiveMLP) and batch. Targets: <= 1.3x time, <= 1.15x memory."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        choices=["smollm2-135m", "tiny"],
        default="smollm2-135m",
        help="smollm2-135m: the bundled SmolLM2-135M-Instruct (real weights); tiny: a random-init 2-layer Llama with "
        "the same tokenizer, for smoke tests",
    )
    parser.add_argument(
        "--arms",
        default="plain,kl",
        help="comma-separated subset of: " + ", ".join(ARMS) + " (plain is always included: the reference)",
    )
    parser.add_argument("--rank", type=_rank, default=16, help="SelectiveMLP rank ('full' for the full-rank update)")
    parser.add_argument("--alpha", type=float, default=None, help="SelectiveMLP alpha (default: alpha = rank)")
    parser.add_argument(
        "--month", choices=sorted(MONTHS), default="capitals", help="training data (peft_selective.demo.months)"
    )
    parser.add_argument("--n-train", type=int, default=40, help="rows of the month's training split")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (pairs)")
    parser.add_argument("--max-length", type=int, default=None, help="DPOConfig.max_length (default: TRL's)")
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--kl-batch-size", type=int, default=None, help="default: the trainer's (half the batch)")
    parser.add_argument(
        "--kl-anchor-max-new-tokens", type=int, default=16, help="anchor continuation length (config default)"
    )
    parser.add_argument("--ewc-coef", type=float, default=1.0, help="for the kl_ewc arm")
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="turn gradient checkpointing off in every arm (default: on, TRL's DPOConfig default)",
    )
    add_round_args(parser, "arm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the adapter init and the trainers")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (1: on a shared machine, multi-threaded step times are mostly scheduling noise)",
    )
    add_memory_args(parser, "step times only")
    add_output_args(parser, "continual_dpo")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.arms.split(",") if k.strip()]
    unknown = set(keys) - set(ARMS)
    if unknown:
        parser.error(f"unknown --arms {sorted(unknown)}; choose from {sorted(ARMS)}")
    args.arm_keys = [key for key in ARMS if key in set(keys) | {BASELINE_ARM}]
    check_round_args(parser, args)
    if args.n_train < args.batch_size:
        parser.error("--n-train must be at least --batch-size")
    return args


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    _quiet()
    work_dir = Path(tempfile.mkdtemp(prefix="continual_dpo_bench_"))
    try:
        if args._memory_worker is not None:
            memory_worker(args, work_dir)
            return 0
        return run(args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def run(args: argparse.Namespace, work_dir: Path) -> int:
    import torch
    import trl

    arms = [ARMS[key] for key in args.arm_keys]
    started = time.time()
    load_start = load_average()
    log(
        f"arms {args.arm_keys}, config {args.config}, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s)"
    )
    timing, model_info = run_timing(args, arms, work_dir)
    timing_s = time.time() - started
    memory = {}
    if not args.skip_memory:
        memory = run_memory_workers(__file__, args.arm_keys, log, f"fresh subprocess, {args.mem_steps} steps")
    load_end = load_average()
    elapsed = time.time() - started

    rows = build_rows(arms, timing, memory)
    verdict = targets(rows)
    table = results_table(rows)
    kl_batch = args.kl_batch_size or max(1, args.batch_size // 2)
    rank = "full" if args.rank is None else args.rank
    step_definition = (
        "wall time from on_step_begin to on_step_end of the trainer's own train() loop: forward, backward (KL / EWC "
        "terms included), gradient clipping, optimizer.step, scheduler.step, zero_grad; data loading and logging "
        "excluded. Each arm trains in its own thread; a baton lets one arm run one step per turn, round-robin, the "
        "order rotated every round"
    )
    mem_definition = (
        "fresh process per arm: peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs once the trainer "
        "is built) over --mem-steps training steps; 'over base' subtracts the RSS after loading the base model and "
        "one warm-up forward + backward (gc + malloc_trim), so it includes what the trainer holds (adapter, "
        "tokenized data, anchors, Fisher) plus the training peak (gradients, AdamW state, activations)"
    )
    sources = (
        REPO_ROOT / "peft_selective" / "continual" / f
        for f in ("trainer.py", "config.py", "anchors.py", "reference.py", "ewc.py")
    )
    machine = machine_info(torch_threads=torch.get_num_threads(), device="cpu", trl=trl.__version__)
    report = {
        **report_header("continual_dpo", sources, machine, load_start, load_end),
        "model": {**model_info, "config": args.config},
        "settings": {
            "arms": args.arm_keys,
            "adapter": f"SelectiveMLPConfig(rank={args.rank}, alpha={args.alpha}) (gate_proj + up_proj, every block)",
            "month": args.month,
            "n_train": args.n_train,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "kl_coef": args.kl_coef,
            "kl_every": 1,
            "kl_batch_size": kl_batch,
            "kl_anchor_max_new_tokens": args.kl_anchor_max_new_tokens,
            "ewc_coef": args.ewc_coef if "kl_ewc" in args.arm_keys else None,
            "gradient_checkpointing": args.gradient_checkpointing,
            "sampler": "sequential (train_sampling_strategy='sequential'): every arm sees the same batches in order",
            "optimizer": "TRL DPOConfig defaults (AdamW, lr 1e-6, linear decay, max_grad_norm 1.0)",
            "dtype": "float32",
            "warmup_rounds": args.warmup,
            "timed_rounds": args.repeats,
            "mem_steps": args.mem_steps,
            "seed": args.seed,
            "step_time": step_definition,
            "peak_memory": mem_definition,
        },
        "results": rows,
        "memory_raw": memory,
        "targets": verdict,
        "runtime_s": {"timing": round(timing_s, 1), "total": round(elapsed, 1)},
    }

    first = timing[BASELINE_ARM]
    header = (
        f"Model: {model_info['description']}, {model_info['parameters']:,} parameters, fp32, CPU, "
        f"{torch.get_num_threads()} torch thread(s). Adapter: `SelectiveMLPConfig(rank={rank}"
        f"{'' if args.alpha is None else f', alpha={args.alpha:g}'})` ({first['trainable_params']:,} trainable "
        f"parameters, {first['adapted_modules']} layers). Data: `{MONTHS[args.month]}` train split, batch "
        f"{args.batch_size} pairs ({_mean_shape(first['dpo_batches_rows_width_tokens'])}, chosen + rejected), "
        f"sequential sampler. KL arm: `kl_coef={args.kl_coef:g}, kl_every=1`, kl_batch_size {kl_batch} "
        f"(default), {args.kl_anchor_max_new_tokens}-token anchor continuations "
        f"({_mean_shape(timing.get(TARGET_ARM, {}).get('kl_batches_rows_width_scored', []))}). Gradient "
        f"checkpointing {'on (TRL default)' if args.gradient_checkpointing else 'off'} in every arm. "
        f"{args.warmup} warm-up + {args.repeats} timed round-robin rounds; memory over {args.mem_steps} steps."
    )
    notes = [header, "", table, "", verdict_text(verdict)]
    mismatch = [
        key
        for key, t in timing.items()
        if t["dpo_batches_rows_width_tokens"] != first["dpo_batches_rows_width_tokens"]
        or t["adapted_module_names"] != first["adapted_module_names"]
        or not t["same_adapter_init_as_first_arm"]
    ]
    if mismatch:
        notes.append(f"WARNING: batches, adapted modules or adapter init differ from the plain arm for {mismatch}.")
    else:
        notes.append(
            "Checked: every arm adapted the same modules from the same initial adapter and saw the same batches."
        )
    notes.append(f"Step time: {step_definition}.")
    notes.append(f"Peak memory: {mem_definition}.")
    notes.append(runtime_note(elapsed, load_start, load_end))
    text = "\n\n".join(part for part in notes if part != "")
    details = f", transformers {machine['transformers']}, peft {machine['peft']}, trl {trl.__version__}"
    publish(args, report, "Continual DPO benchmark results", details, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
