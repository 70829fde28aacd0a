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
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import (
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
    lora_config,
    losses_differ,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    prefixed_log,
    publish,
    report_header,
    rss_bytes,
    run_memory_workers,
    run_rounds,
    runtime_note,
    safe_ratio,
    setup_torch,
    start_peak_window,
    warm_up_runtime,
)


TARGET_THRESHOLD = 1.1
log = prefixed_log("overhead")

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
    "tiny": {"vocab_size": 1024, **TINY_LLAMA},
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


def _selective(config_name: str, rank: int | None) -> Callable[[argparse.Namespace], Any]:
    """`peft_selective.<config_name>` at full rank (no alpha) or at `--rank` / `--alpha`."""

    def make(args: argparse.Namespace) -> Any:
        import peft_selective

        config_class = getattr(peft_selective, config_name)
        if rank is None:
            return config_class(rank=None)
        return config_class(rank=args.rank, alpha=args.alpha)

    return make


def _selective_mlp(rank: int | None) -> Callable[[argparse.Namespace], Any]:
    return _selective("SelectiveMLPConfig", rank)


def _saproj(rank: int | None) -> Callable[[argparse.Namespace], Any]:
    return _selective("SAProjConfig", rank)


def _lora(modules: list[str]) -> Callable[[argparse.Namespace], Any]:
    def make(args: argparse.Namespace) -> Any:
        return lora_config(args.rank, args.alpha, modules)

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
            log(f"embedded model unavailable ({type(exc).__name__}: {exc}); using random init")
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

    def step(key: str, warm: bool) -> float:
        run = runs[key]
        seconds, loss = train_step(run["model"], run["optimizer"], batch, args.device)
        run["losses"].append(loss)
        if not warm:
            run["times"].append(seconds)
        return seconds

    run_rounds([m.key for m in methods], args.warmup, args.repeats, step, log, "round")

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
        run.clear()  # drop the models before the memory subprocesses run
    runs.clear()  # not `del`: the `step` closure holds the name
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, model_info


# --------------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: load the base, then build one method and train `--mem-steps` steps; print peaks."""
    import peft  # noqa: F401 - imported before the baseline so that library import costs are not counted
    import torch

    import peft_selective  # noqa: F401

    method = {m.key: m for m in all_methods()}[args._memory_worker]
    cuda = args.device.startswith("cuda")
    base, _ = load_base_model(args)
    batch = make_batch(args, base.config.vocab_size)
    warm_up_runtime(base, batch[:1, :8])  # the same for every method
    if cuda:
        sync(args.device)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_method = "torch.cuda.max_memory_allocated"
    else:
        baseline = rss_bytes()
        hwm_reset = start_peak_window()
        peak_method = "VmHWM after reset (/proc/self/clear_refs)" if hwm_reset else "ru_maxrss (NOT reset)"
    model, optimizer = build_method(base, method, args, copy_base=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for _ in range(args.mem_steps):
        train_step(model, optimizer, batch, args.device)
    if cuda:
        sync(args.device)
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes(hwm_reset)
    out = {
        "method": method.key,
        "peak_bytes": peak,
        "base_bytes": baseline,
        "train_peak_over_base_bytes": peak - baseline,
        "peak_method": peak_method,
        "trainable_params": trainable,
        "steps": args.mem_steps,
    }
    emit_memory_result(__file__, out)


# --------------------------------------------------------------------------------------------------- reporting
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
            "time_ratio_vs_lora": safe_ratio(t["step_time_median_s"], base_t and base_t["step_time_median_s"]),
            "mem_ratio_vs_lora": safe_ratio(
                m.get("train_peak_over_base_bytes"), base_m.get("train_peak_over_base_bytes")
            ),
        }
        if base_t is not None:
            paired = [a / b for a, b in zip(t["step_times_s"], base_t["step_times_s"])]
            row["paired_time_ratios"] = paired
            row["paired_time_ratio_median"] = statistics.median(paired)
        rows.append(row)
    return rows


def results_table(rows: list[dict[str, Any]], device: str) -> str:
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
    return markdown_table(header, [results_row(r) for r in rows])


def results_row(r: dict[str, Any]) -> list[str]:
    return [
        r["method"],
        str(r["rank"]),
        f"{r['trainable_params']:,}",
        f"{r['step_time_median_s']:.3f}",
        f"{r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}",
        fmt_ratio(r["time_ratio_vs_lora"]),
        fmt_mib(r["peak_mem_bytes"]),
        fmt_mib(r["train_mem_over_base_bytes"]),
        fmt_ratio(r["mem_ratio_vs_lora"]),
    ]


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
    add_round_args(parser, "method")
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
    add_memory_args(parser, "timings and parameter counts only")
    add_output_args(parser, "overhead")
    args = parser.parse_args(argv)
    known = {m.key for m in all_methods()}
    args.method_keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = set(args.method_keys) - known
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {sorted(known)}")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    check_round_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    import torch

    if args._memory_worker is not None:
        memory_worker(args)
        return 0

    methods = [m for m in all_methods() if m.key in args.method_keys]
    started = time.time()
    load_start = load_average()
    log(f"{len(methods)} methods, batch {args.batch_size}x{args.seq_len}, device {args.device}")
    timing, model_info = run_timing(args, methods)
    timing_s = time.time() - started
    memory = {} if args.skip_memory else run_memory_workers(__file__, [m.key for m in methods], log)
    load_end = load_average()

    targets_match = {}
    for method in methods:
        base = timing.get(method.baseline)
        if base is not None and method.key != method.baseline:
            targets_match[method.key] = timing[method.key]["adapted_module_names"] == base["adapted_module_names"]
    rows = build_rows(methods, timing, memory, args)
    verdict = target_verdict(rows)
    table = results_table(rows, args.device)
    elapsed = time.time() - started

    mem_definition = (
        "torch.cuda.max_memory_allocated during adapter creation + training steps; 'over base' subtracts "
        "torch.cuda.memory_allocated after loading the base model"
        if args.device.startswith("cuda")
        else "peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs after loading the base model) of "
        "a fresh process that loads the base model, builds one method and trains --mem-steps steps; 'over base' "
        "subtracts the RSS after loading the base model (after gc + malloc_trim)"
    )
    machine = machine_info(
        torch_threads=torch.get_num_threads(),
        device=args.device,
        **(
            {"cuda_device": torch.cuda.get_device_name(torch.device(args.device)), "cuda": torch.version.cuda}
            if args.device.startswith("cuda")
            else {}
        ),
    )
    sources = (
        REPO_ROOT / "peft_selective" / "tuners" / "selective" / f for f in ("config.py", "layer.py", "model.py")
    )
    report = {
        **report_header("overhead", sources, machine, load_start, load_end),
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
    if losses_differ(losses.values()):
        notes.append(f"WARNING: initial losses differ across methods (should be equal, zero-init updates): {losses}")
    notes.append(f"Peak memory: {mem_definition}.")
    notes.append(runtime_note(elapsed, load_start, load_end))
    text = "\n".join(notes)
    details = f" ({machine['torch_threads']} threads), device {args.device}"
    publish(args, report, "Overhead benchmark results", details, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
