"""Helpers shared by the benchmark scripts: provenance (commit, source hashes, machine), the command line, round-robin
timing, process memory and the fresh-process-per-arm memory driver, and writing the result files."""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------------ provenance
def git_commit() -> str | None:
    """HEAD of the checkout, or `BENCHMARK_GIT_COMMIT` when set: on a machine that received a copy of the tree (a
    remote GPU), the copy's `.git` may not match the files that run, so the caller names the commit it copied."""
    if os.environ.get("BENCHMARK_GIT_COMMIT"):
        return os.environ["BENCHMARK_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digests(files: Iterable[Path]) -> dict[str, str]:
    """sha256 of the measured sources: the working tree may differ from the commit."""
    return {str(f.relative_to(REPO_ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def machine_info(**extra: Any) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from peft_selective.utils.machine import cpu_info

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **extra,
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    info.update(cpu_info())  # which CPU kernels ran: results are reproducible on the same kind of CPU only
    return info


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load average: on a shared machine it says how much the timings were disturbed."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def command_line(benchmark: str) -> str:
    """The command as it would be typed from the repository root, for the result files."""
    return f"python benchmarks/{benchmark}.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))


def report_header(benchmark: str, sources: Iterable[Path], machine: dict[str, Any], load_start, load_end) -> dict:
    """The provenance keys every result JSON starts with, in their order there."""
    return {
        "benchmark": benchmark,
        "command": command_line(benchmark),
        "argv": sys.argv,
        "git_commit": git_commit(),
        "source_sha256": source_digests(sources),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_1_5_15": {"start": load_start, "end": load_end},
    }


# ------------------------------------------------------------------------------------------------------ models
# `--config tiny`: a random-init 2-layer Llama for smoke tests (its numbers mean nothing); the vocabulary is the
# script's (a fixed size, or its own tokenizer's).
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def load_frozen_base(kind: str, device: str):
    """`kind` "embedded": the bundled SmolLM2-135M-Instruct (fp32); "tiny": a random 2-layer Llama (`TINY_LLAMA`, seed
    0) with the bundled tokenizer. Moved to `device`, every weight frozen. Returns (model, tokenizer)."""
    import torch

    from peft_selective.demo.embedded import embedded_model_path, load_embedded_model

    if kind == "embedded":
        model, tokenizer = load_embedded_model()
    else:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
        torch.manual_seed(0)
        config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def short_month_dpo_options(
    out: Path, steps: int, batch_size: int, lr: float, beta: float, max_length: int, device: str, seed: int
) -> dict[str, Any]:
    """`DPOConfig` options of a benchmark month: a few steps at a constant rate (every step at the full rate, no
    warm-up step at lr 0), fp32 on CPU (bf16 autocast there is far slower), no checkpoints, no reporting."""
    import torch

    cuda = device.startswith("cuda")
    return dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        beta=beta,
        max_length=max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not cuda,
        tf32=cuda and torch.cuda.is_available(),
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )


def adapted_module_names(peft_model) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return sorted(
        name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)
    )


# ------------------------------------------------------------------------------------------------------ run set-up
def prefixed_log(benchmark: str) -> Callable[[str], None]:
    """`print` tagged with the benchmark's name and flushed, so that progress shows while a step runs."""

    def log(message: str) -> None:
        print(f"[{benchmark}] {message}", flush=True)

    return log


def setup_torch(threads: int | None) -> int:
    """Hub offline (the benchmarks download nothing) and `threads` torch threads where given.

    Returns torch's own default thread count, read before it is changed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return default_threads


def add_round_args(parser: argparse.ArgumentParser, unit: str) -> None:
    """--warmup, --repeats (round-robin rounds of one step of every `unit`) and --mem-steps."""
    parser.add_argument("--warmup", type=int, default=1, help=f"untimed rounds (one step of every {unit} each)")
    parser.add_argument("--repeats", type=int, default=5, help=f"timed rounds (one step of every {unit} each)")
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps per memory subprocess")


def check_round_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup < 0 or args.repeats < 1 or args.mem_steps < 1:
        parser.error("--warmup >= 0, --repeats >= 1 and --mem-steps >= 1 are required")


def add_memory_args(parser: argparse.ArgumentParser, skip_help: str) -> None:
    parser.add_argument("--skip-memory", action="store_true", help=skip_help)
    # hidden: how `run_memory_workers` re-runs the script for one arm
    parser.add_argument("--_memory-worker", default=None, help=argparse.SUPPRESS)


def add_output_args(parser: argparse.ArgumentParser, benchmark: str) -> None:
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help=f"where {benchmark}.{{json,md}} go")
    parser.add_argument("--no-write", action="store_true", help="print only, write no result files")


# ------------------------------------------------------------------------------------------------------ timing
def rotated(items: list[str], round_index: int) -> list[str]:
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def run_rounds(
    keys: list[str],
    warmup: int,
    repeats: int,
    step: Callable[[str, bool], float],
    log: Callable[[str], None],
    label: str,
) -> None:
    """`warmup` + `repeats` rounds of one `step(key, warm)` per key, the order rotated every round, so that a load
    spike on a shared machine hits every key alike. `step` records its own measurements and returns its wall time."""
    total = warmup + repeats
    for round_index in range(total):
        warm = round_index < warmup
        last = {key: step(key, warm) for key in rotated(keys, round_index)}
        tag = "warm-up" if warm else "timed"
        log(f"{label} {round_index + 1}/{total} ({tag}): " + ", ".join(f"{key} {last[key]:.2f}s" for key in keys))


def losses_differ(losses: Iterable[float]) -> bool:
    """Whether first-step losses disagree: every update starts at zero, so all methods must start from one loss."""
    values = list(losses)
    return max(values) - min(values) > 1e-4 * max(1.0, abs(max(values)))


# ------------------------------------------------------------------------------------------- process memory (Linux)
def read_status_kb(field: str) -> int | None:
    """A `/proc/self/status` field in kB (`VmRSS`, `VmHWM`, ...); `None` where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """`gc` + `malloc_trim`: hand freed heap pages back so that RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    return (read_status_kb("VmRSS") or 0) * 1024


def start_peak_window() -> bool:
    """Reset VmHWM; False where it cannot be reset or read, and the peak is then the process's lifetime peak."""
    return reset_peak_rss() and read_status_kb("VmHWM") is not None


def peak_rss_bytes(hwm_reset: bool) -> int:
    if hwm_reset:
        return (read_status_kb("VmHWM") or 0) * 1024
    import resource  # Unix only: imported where needed, so that `_common` itself imports anywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up_runtime(model, ids) -> None:
    """One forward + backward on `ids`, then free: one-off costs (autograd engine, kernel libraries, lazy imports)
    land before the memory baseline, not on the measured arm."""
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    release_free_memory()


# ------------------------------------------------------------------------------ memory: a fresh process per arm
def _memory_marker(script: str) -> str:
    # the worker's result line among everything else the libraries print
    return f"{Path(script).stem.upper()}_MEMORY_JSON:"


def emit_memory_result(script: str, result: dict[str, Any]) -> None:
    """In the worker: hand `result` to `run_memory_workers` in the parent."""
    print(_memory_marker(script) + json.dumps(result), flush=True)


def memory_worker_result(script: str, key: str) -> dict[str, Any]:
    """Re-run `script` with this command line plus `--_memory-worker KEY`, and read back its result."""
    marker = _memory_marker(script)
    cmd = [sys.executable, str(Path(script).resolve()), *sys.argv[1:], "--_memory-worker", key]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"memory worker for {key} failed (exit code {proc.returncode})")
    return json.loads(lines[-1][len(marker) :])


def run_memory_workers(
    script: str, keys: list[str], log: Callable[[str], None], note: str = "fresh subprocess"
) -> dict[str, dict[str, Any]]:
    """Peak memory of every arm, each in a fresh process: nothing another arm allocated is counted."""
    results = {}
    for key in keys:
        log(f"memory: {key} ({note})")
        results[key] = memory_worker_result(script, key)
    return results


# ------------------------------------------------------------------------------------------------------ reporting
def safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def fmt_mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """The first column left-aligned (labels), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def write_results(output_dir: Path, report: dict[str, Any], title: str, machine_details: str, text: str) -> list[Path]:
    """`<benchmark>.json` (the whole report) and `<benchmark>.md` (provenance lines, then `text`).

    `machine_details` follows the torch version on the markdown's machine line.
    """
    name, machine = report["benchmark"], report["machine"]
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(
        f"# {title}\n\n"
        f"Command: `{report['command']}`  \nCommit: `{report['git_commit']}`  \nDate (UTC): {report['date_utc']}  \n"
        f"Machine: {machine['platform']}, {machine.get('cpu_model', '')}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}{machine_details}\n\n" + text + "\n"
    )
    return [json_path, md_path]


def runtime_note(elapsed: float, load_start, load_end) -> str:
    def three(load) -> str:  # the same text from os.getloadavg()'s tuple and from the list a JSON report reads back
        return "n/a" if load is None else "[" + ", ".join(f"{value:.2f}" for value in load) + "]"

    return f"Runtime: {elapsed:.0f} s. Load average (1/5/15 min) start {three(load_start)}, end {three(load_end)}."


def publish(
    args: argparse.Namespace,
    report: dict[str, Any],
    title: str,
    machine_details: str,
    text: str,
    log: Callable[[str], None],
) -> None:
    """Print the summary, then write the result files (see `write_results`) unless --no-write."""
    print()
    print(text)
    if not args.no_write:
        json_path, md_path = write_results(args.output_dir, report, title, machine_details, text)
        print()
        log(f"wrote {json_path} and {md_path}")


# ------------------------------------------------------------------------------------------ helpers added later
def run_memory_workers_argv(
    script: str,
    argv: list[str],
    keys: list[str],
    log: Callable[[str], None],
    note: str = "fresh subprocess",
) -> dict[str, dict[str, Any]]:
    """`run_memory_workers` with the command line given explicitly instead of `sys.argv[1:]`: for a `main(argv)` called
    from Python (a test) or a parent that must pass the workers extra options (a model folder it created)."""
    marker = _memory_marker(script)
    results = {}
    for key in keys:
        log(f"memory: {key} ({note})")
        cmd = [sys.executable, str(Path(script).resolve()), *argv, "--_memory-worker", key]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise RuntimeError(f"memory worker for {key} failed (exit code {proc.returncode})")
        results[key] = json.loads(lines[-1][len(marker) :])
    return results


def publish_as(
    args: argparse.Namespace,
    report: dict[str, Any],
    output_name: str,
    title: str,
    machine_details: str,
    text: str,
    log: Callable[[str], None],
) -> None:
    """`publish`, with the result files named `<output_name>.{json,md}` instead of after the benchmark, so that runs
    of one benchmark in other settings (a GPU, a larger model) sit beside its committed results."""
    if output_name == report["benchmark"]:
        publish(args, report, title, machine_details, text, log)
        return
    print()
    print(text)
    if args.no_write:
        return
    with_name = {**report, "benchmark": output_name}  # `write_results` names the files after this key
    json_path, md_path = write_results(args.output_dir, with_name, title, machine_details, text)
    report_text = json.dumps({**report, "output_name": output_name}, indent=2) + "\n"
    json_path.write_text(report_text)  # the JSON keeps the benchmark's own name
    print()
    log(f"wrote {json_path} and {md_path}")
