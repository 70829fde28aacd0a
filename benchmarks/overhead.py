"""Training-step overhead of the selective methods against PEFT LoRA on the same modules.

For every method the benchmark measures, on the same base weights and the same fixed token batch:

* **step time**: one optimizer step (forward with a causal-LM loss, backward, `AdamW.step()`, `zero_grad`), median
  over repeats after warm-up. All methods live in one process and are timed *round-robin* (one step of each method
  per round, the order rotated every round), so a load spike on a shared machine hits every method alike;
* **peak memory**: measured in a fresh subprocess per method (see `memory_worker`): on CPU the growth of the
  process's peak resident set size (Linux `VmHWM`, reset through `/proc/self/clear_refs`) above the RSS of the loaded
  base model, on CUDA `torch.cuda.max_memory_allocated` above the memory allocated by the loaded base model;
* **trainable parameters**.

Rows: SelectiveMLP full-rank and low-rank against LoRA on gate_proj/up_proj, SAProj full-rank and low-rank against
LoRA on q/k/v/o, LoRA at the same rank with `lora_alpha` equal to our `alpha` and no dropout.

Usage (see benchmarks/README.md):

    python benchmarks/overhead.py                     # defaults: random-init SmolLM2-135M architecture, CPU
    python benchmarks/overhead.py --config tiny --repeats 3 --output-dir /tmp/bench   # smoke test, seconds
    python benchmarks/overhead.py --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    REPO_ROOT,
    adapted_module_names,
    git_commit,
    machine_info,
    read_status_kb,
    release_free_memory,
    reset_peak_rss,
    source_digests,
)


DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "results"
MEMORY_MARKER = "OVERHEAD_MEMORY_JSON:"
TARGET_THRESHOLD = 1.1

# Random-init Llama architectures. `smollm2-135m` mirrors HuggingFaceTB/SmolLM2-135M (the bundled model's
# architecture); `tiny` is for smoke tests only.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}

MLP_MODULES = ["gate_proj", "up_proj"]
ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    key: str
    label: str
    group: str  # "mlp" or "attn": rows of one group are compared with that group's LoRA row
    baseline: str  # key of the LoRA row this row is compared with
    rank: int | None
    make_config: Callable[[argparse.Namespace], Any]


def _selective_mlp(rank: int | None) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace) -> Any:
        import peft_selective

        if rank is None:
            return peft_selective.SelectiveMLPConfig(rank=None)
        return peft_selective.SelectiveMLPConfig(rank=args.rank, alpha=args.alpha)

    return make


def _saproj(rank: int | None) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace) -> Any:
        import peft_selective

        if rank is None:
            return peft_selective.SAProjConfig(rank=None)
        return peft_selective.SAProjConfig(rank=args.rank, alpha=args.alpha)

    return make


def _lora(modules: list[str]) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=list(modules),
            bias="none",
            task_type="CAUSAL_LM",
        )

    return make


def all_methods() -> list[Method]:
    # `rank` is a marker here (None = full rank, 0 = "--rank"); the real rank comes from the command line.
    return [
        Method("lora_mlp", "LoRA gate/up", "mlp", "lora_mlp", 0, _lora(MLP_MODULES)),
        Method("selective_mlp_lowrank", "SelectiveMLP low-rank", "mlp", "lora_mlp", 0, _selective_mlp(0)),
        Method("selective_mlp_full", "SelectiveMLP full-rank", "mlp", "lora_mlp", None, _selective_mlp(None)),
        Method("lora_attn", "LoRA q/k/v/o", "attn", "lora_attn", 0, _lora(ATTN_MODULES)),
        Method("saproj_lowrank", "SAProj low-rank", "attn", "lora_attn", 0, _saproj(0)),
        Method("saproj_full", "SAProj full-rank", "attn", "lora_attn", None, _saproj(None)),
    ]


# --------------------------------------------------------------------------------------------------- model, data
def load_base_model(args: argparse.Namespace):
    """The base model (train mode, on `args.device`, `args.dtype`) and a description of where it came from."""
    import torch

    dtype = getattr(torch, args.dtype)
    source = args.model
    if source in ("embedded", "auto"):
        try:
            from peft_selective.embedded import load_embedded_model

            model, _tokenizer = load_embedded_model()
            model = model.to(device=args.device, dtype=dtype)
            description = "bundled real model (peft_selective.embedded.load_embedded_model)"
            source = "embedded"
        except Exception as exc:  # noqa: BLE001 - `auto` falls back on any failure, `embedded` re-raises
            if source == "embedded":
                raise
            print(f"[overhead] embedded model unavailable ({type(exc).__name__}: {exc}); using random init")
            source = "tiny-llama"
    if source == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**ARCHITECTURES[args.config], use_cache=False)
        config._attn_implementation = args.attn_implementation
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype)
        description = f"random-init LlamaForCausalLM, architecture {args.config!r} (not trained weights)"
    model.config.use_cache = False
    model.train()
    return model, {"source": source, "description": description}


def make_batch(args: argparse.Namespace, vocab_size: int):
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return ids.to(args.device)


def build_method(base, method: Method, args: argparse.Namespace, copy_base: bool):
    """PEFT model of `method` on (a deep copy of) `base`, in train mode, and its AdamW optimizer."""
    import torch
    from peft import get_peft_model

    import peft_selective  # noqa: F401 - registers the selective PEFT types

    model = copy.deepcopy(base) if copy_base else base
    torch.manual_seed(args.seed)  # same adapter init (A matrices) whatever was built before
    peft_model = get_peft_model(model, method.make_config(args))
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    return peft_model, optimizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def train_step(model, optimizer, batch, device: str) -> tuple[float, float]:
    """One training step; returns (seconds, loss before the step)."""
    sync(device)
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, float(loss.detach())


# --------------------------------------------------------------------------------------------------- timing
def run_timing(args: argparse.Namespace, methods: list[Method]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    import torch

    base, model_info = load_base_model(args)
    batch = make_batch(args, base.config.vocab_size)
    model_info["parameters"] = sum(p.numel() for p in base.parameters())
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        model, optimizer = build_method(base, method, args, copy_base=True)
        runs[method.key] = {
            "model": model,
            "optimizer": optimizer,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapted_modules": adapted_module_names(model),
            "times": [],
            "losses": [],
        }
    del base
    gc.collect()

    order = [m.key for m in methods]

    def rotated(round_index: int) -> list[str]:
        shift = round_index % len(order)
        return order[shift:] + order[:shift]

    total_rounds = args.warmup + args.repeats
    last: dict[str, float] = {}
    for round_index in range(total_rounds):
        warm = round_index < args.warmup
        for key in rotated(round_index):
            run = runs[key]
            seconds, loss = train_step(run["model"], run["optimizer"], batch, args.device)
            run["losses"].append(loss)
            if not warm:
                run["times"].append(seconds)
            last[key] = seconds
        tag = "warm-up" if warm else "timed"
        steps = ", ".join(f"{key} {last[key]:.2f}s" for key in order)
        print(f"[overhead] round {round_index + 1}/{total_rounds} ({tag}): {steps}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for key, run in runs.items():
        times = run["times"]
        results[key] = {
            "trainable_params": run["trainable_params"],
            "adapted_modules": len(run["adapted_modules"]),
            "adapted_module_names": run["adapted_modules"],
            "step_times_s": times,
            "step_time_median_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "initial_loss": run["losses"][0],
            "final_loss": run["losses"][-1],
        }
    for run in runs.values():
        run.clear()
    del runs
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, model_info


# --------------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: load the base, then build one method and train `--mem-steps` steps; print peaks."""
    import resource

    import peft  # noqa: F401 - imported before the baseline so that library import costs are not counted
    import torch

    import peft_selective  # noqa: F401

    method = {m.key: m for m in all_methods()}[args._memory_worker]
    cuda = args.device.startswith("cuda")
    base, _ = load_base_model(args)
    batch = make_batch(args, base.config.vocab_size)
    # Runtime warm-up, identical for every method and done before the baseline: one forward + backward on a
    # 1 x 8 slice, so one-off costs (autograd engine, kernel libraries, lazy imports) are not charged to the method.
    warm = batch[:1, :8]
    base(input_ids=warm, labels=warm, use_cache=False).loss.backward()
    base.zero_grad(set_to_none=True)
    release_free_memory()
    if cuda:
        sync(args.device)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_method = "torch.cuda.max_memory_allocated"
    else:
        baseline = (read_status_kb("VmRSS") or 0) * 1024
        hwm_reset = reset_peak_rss() and read_status_kb("VmHWM") is not None
        peak_method = "VmHWM after reset (/proc/self/clear_refs)" if hwm_reset else "ru_maxrss (NOT reset)"
    model, optimizer = build_method(base, method, args, copy_base=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for _ in range(args.mem_steps):
        train_step(model, optimizer, batch, args.device)
    if cuda:
        sync(args.device)
        peak = torch.cuda.max_memory_allocated()
    elif hwm_reset:
        peak = (read_status_kb("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "method": method.key,
        "peak_bytes": peak,
        "base_bytes": baseline,
        "train_peak_over_base_bytes": peak - baseline,
        "peak_method": peak_method,
        "trainable_params": trainable,
        "steps": args.mem_steps,
    }
    print(MEMORY_MARKER + json.dumps(out), flush=True)


def run_memory(args: argparse.Namespace, methods: list[Method]) -> dict[str, dict[str, Any]]:
    results = {}
    for method in methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--_memory-worker", method.key]
        print(f"[overhead] memory: {method.key} (fresh subprocess)", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_MARKER)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise RuntimeError(f"memory worker for {method.key} failed (exit code {proc.returncode})")
        results[method.key] = json.loads(lines[-1][len(MEMORY_MARKER) :])
    return results


# --------------------------------------------------------------------------------------------------- reporting
def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def build_rows(methods: list[Method], timing: dict, memory: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        t = timing[method.key]
        m = memory.get(method.key, {})
        base_t = timing.get(method.baseline)
        base_m = memory.get(method.baseline, {})
        row = {
            "key": method.key,
            "method": method.label,
            "group": method.group,
            "compared_with": method.baseline,
            "rank": "full" if method.rank is None else args.rank,
            **{k: v for k, v in t.items() if k != "adapted_module_names"},
            "peak_mem_bytes": m.get("peak_bytes"),
            "train_mem_over_base_bytes": m.get("train_peak_over_base_bytes"),
            "time_ratio_vs_lora": _ratio(t["step_time_median_s"], base_t and base_t["step_time_median_s"]),
            "mem_ratio_vs_lora": _ratio(m.get("train_peak_over_base_bytes"), base_m.get("train_peak_over_base_bytes")),
        }
        if base_t is not None:
            paired = [a / b for a, b in zip(t["step_times_s"], base_t["step_times_s"])]
            row["paired_time_ratios"] = paired
            row["paired_time_ratio_median"] = statistics.median(paired)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    mem_label = "CUDA peak alloc" if device.startswith("cuda") else "peak RSS"
    header = [
        "method",
        "rank",
        "trainable params",
        "step time median (s)",
        "min-max (s)",
        "time vs LoRA",
        f"{mem_label} (MiB)",
        "train mem over base (MiB)",
        "mem vs LoRA",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    str(r["rank"]),
                    f"{r['trainable_params']:,}",
                    f"{r['step_time_median_s']:.3f}",
                    f"{r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}",
                    _fmt_ratio(r["time_ratio_vs_lora"]),
                    _mib(r["peak_mem_bytes"]),
                    _mib(r["train_mem_over_base_bytes"]),
                    _fmt_ratio(r["mem_ratio_vs_lora"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def target_verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    by_key = {r["key"]: r for r in rows}
    ours, lora = by_key.get("selective_mlp_lowrank"), by_key.get("lora_mlp")
    if ours is None or lora is None:
        return None
    ratio = ours["time_ratio_vs_lora"]
    paired = ours["paired_time_ratios"]
    return {
        "target": f"low-rank SelectiveMLP step time within {TARGET_THRESHOLD}x of PEFT LoRA on gate/up, same rank",
        "threshold": TARGET_THRESHOLD,
        "ratio_of_medians": ratio,
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "meets_target": ratio <= TARGET_THRESHOLD,
    }


def verdict_text(v: dict[str, Any] | None) -> str:
    if v is None:
        return "Target check skipped: needs both `selective_mlp_lowrank` and `lora_mlp`."
    status = "MEETS" if v["meets_target"] else "MISSES"
    return (
        f"Target ({v['target']}): ratio of medians = {v['ratio_of_medians']:.3f}x -> {status} the "
        f"{v['threshold']}x target (per-round paired ratios: median {v['paired_ratio_median']:.3f}x, "
        f"range {v['paired_ratio_min']:.3f}x-{v['paired_ratio_max']:.3f}x)."
    )


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Step time, peak memory and trainable parameters of SelectiveMLP / SAProj (full-rank and low-rank) "
            "against PEFT LoRA on the same modules at the same rank."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=["tiny-llama", "embedded", "auto"],
        default="tiny-llama",
        help="tiny-llama: random-init LlamaForCausalLM of --config (self-contained); embedded: the bundled real "
        "model (peft_selective.embedded.load_embedded_model); auto: embedded if it loads, else tiny-llama.",
    )
    parser.add_argument("--config", choices=sorted(ARCHITECTURES), default="smollm2-135m", help="random-init arch")
    parser.add_argument("--rank", type=int, default=16, help="rank of the low-rank rows and of LoRA")
    parser.add_argument("--alpha", type=float, default=32.0, help="our alpha = LoRA's lora_alpha")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (one step of every method each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one step of every method each)")
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps per memory subprocess")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base weights, adapter init and batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn-implementation", default="sdpa", help="for the random-init model")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads. Default: 1 on CPU (on a shared machine, OpenMP barriers make multi-threaded "
        "step times mostly scheduling noise), torch's own default on CUDA.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(m.key for m in all_methods()),
        help="comma-separated subset of: " + ", ".join(m.key for m in all_methods()),
    )
    parser.add_argument("--skip-memory", action="store_true", help="timings and parameter counts only")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where overhead.{json,md} go")
    parser.add_argument("--no-write", action="store_true", help="print only, write no result files")
    parser.add_argument("--_memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = {m.key for m in all_methods()}
    args.method_keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = set(args.method_keys) - known
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {sorted(known)}")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.warmup < 0 or args.repeats < 1 or args.mem_steps < 1:
        parser.error("--warmup >= 0, --repeats >= 1 and --mem-steps >= 1 are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._memory_worker is not None:
        memory_worker(args)
        return 0

    methods = [m for m in all_methods() if m.key in args.method_keys]
    started = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"[overhead] {len(methods)} methods, batch {args.batch_size}x{args.seq_len}, device {args.device}")
    timing, model_info = run_timing(args, methods)
    timing_s = time.time() - started
    memory = {} if args.skip_memory else run_memory(args, methods)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    targets_match = {}
    for method in methods:
        base = timing.get(method.baseline)
        if base is not None and method.key != method.baseline:
            targets_match[method.key] = timing[method.key]["adapted_module_names"] == base["adapted_module_names"]
    rows = build_rows(methods, timing, memory, args)
    verdict = target_verdict(rows)
    table = markdown_table(rows, args.device)
    elapsed = time.time() - started

    command = "python benchmarks/overhead.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    mem_definition = (
        "torch.cuda.max_memory_allocated during adapter creation + training steps; 'over base' subtracts "
        "torch.cuda.memory_allocated after loading the base model"
        if args.device.startswith("cuda")
        else "peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs after loading the base model) of "
        "a fresh process that loads the base model, builds one method and trains --mem-steps steps; 'over base' "
        "subtracts the RSS after loading the base model (after gc + malloc_trim)"
    )
    report = {
        "benchmark": "overhead",
        "command": command,
        "argv": sys.argv,
        "git_commit": git_commit(),
        "source_sha256": source_digests(
            REPO_ROOT / "peft_selective" / "tuners" / "selective" / f for f in ("config.py", "layer.py", "model.py")
        ),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(
            torch_threads=torch.get_num_threads(),
            device=args.device,
            **(
                {"cuda_device": torch.cuda.get_device_name(torch.device(args.device)), "cuda": torch.version.cuda}
                if args.device.startswith("cuda")
                else {}
            ),
        ),
        "load_average_1_5_15": {"start": load_start, "end": load_end},
        "model": {**model_info, "config": args.config if model_info["source"] == "tiny-llama" else None},
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "alpha": args.alpha,
            "lora_dropout": 0.0,
            "warmup_rounds": args.warmup,
            "timed_rounds": args.repeats,
            "mem_steps": args.mem_steps,
            "optimizer": f"torch.optim.AdamW(lr={args.lr})",
            "dtype": args.dtype,
            "seed": args.seed,
            "step": "forward (causal-LM loss on a fixed random token batch) + backward + AdamW.step + zero_grad",
            "timing": "all methods in one process, round-robin, order rotated every round; median of timed rounds",
            "peak_memory": mem_definition,
        },
        "targets_match_lora": targets_match,
        "results": rows,
        "memory_raw": memory,
        "target": verdict,
        "runtime_s": {"timing": round(timing_s, 1), "total": round(elapsed, 1)},
    }

    header = (
        f"Model: {model_info['description']}, {model_info['parameters']:,} parameters; batch "
        f"{args.batch_size}x{args.seq_len}, {args.dtype}, device {args.device} ({torch.get_num_threads()} torch "
        f"thread(s)), rank {args.rank}, alpha {args.alpha:g}; "
        f"{args.warmup} warm-up + {args.repeats} timed round-robin rounds."
    )
    mismatched = [k for k, ok in targets_match.items() if not ok]
    notes = [header, "", table, "", verdict_text(verdict)]
    if mismatched:
        notes.append(f"WARNING: adapted modules differ from the matching LoRA row for {mismatched}.")
    losses = {r["key"]: r["initial_loss"] for r in rows}
    if max(losses.values()) - min(losses.values()) > 1e-4 * max(1.0, abs(max(losses.values()))):
        notes.append(f"WARNING: initial losses differ across methods (should be equal, zero-init updates): {losses}")
    notes.append(f"Peak memory: {mem_definition}.")
    notes.append(f"Runtime: {elapsed:.0f} s. Load average (1/5/15 min) start {load_start}, end {load_end}.")
    text = "\n".join(notes)
    print()
    print(text)

    if not args.no_write:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
        md = (
            "# Overhead benchmark results\n\n"
            f"Command: `{command}`  \nCommit: `{report['git_commit']}`  \nDate (UTC): {report['date_utc']}  \n"
            f"Machine: {report['machine']['platform']}, {report['machine'].get('cpu_model', '')}, "
            f"{report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']} "
            f"({report['machine']['torch_threads']} threads), device {args.device}\n\n" + text + "\n"
        )
        (args.output_dir / "overhead.md").write_text(md)
        print(f"\n[overhead] wrote {args.output_dir / 'overhead.json'} and {args.output_dir / 'overhead.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
