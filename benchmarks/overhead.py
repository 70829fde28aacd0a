"""Training-step overhead of the selective methods against PEFT LoRA on the same modules, and of the trainer penalties.

For every method the benchmark measures, on the same base weights and the same fixed token batch:

* **step time**: one optimizer step (forward with a causal-LM loss, backward, `AdamW.step()`, `zero_grad`), median
  over repeats after warm-up, and the throughput it gives (training tokens per second). By default all methods live
  in one process and are timed *round-robin* (one step of each method per round, the order rotated every round), so a
  load spike on a shared machine hits every method alike; `--sequential` times one method at a time instead (a 7B
  base, where the methods do not fit in memory together);
* **peak memory**: on CPU measured in a fresh subprocess per method (see `memory_worker`): the growth of the
  process's peak resident set size (Linux `VmHWM`, reset through `/proc/self/clear_refs`) above the RSS of the loaded
  base model. On CUDA `torch.cuda.max_memory_allocated` above the memory allocated by the method's loaded base
  model, measured in the timing process itself (`--memory-mode inline`, CUDA's default: tensor accounting is exact
  there, and a 7B base is not reloaded once more per method) or in a subprocess per method (`--memory-mode
  subprocess`); `torch.cuda.max_memory_reserved` is recorded too;
* **trainable parameters**.

Rows: SelectiveMLP full-rank and low-rank, GeometryProjected (calibrated first; calibration timed separately) against
LoRA on gate_proj/up_proj; SAProj full-rank and low-rank against LoRA on q/k/v/o; LoRA on all linear layers; full
fine-tuning (float bases only) against it; and the penalties of `peft_selective.continual.ContinualDPOTrainer` (the anchor KL, EWC,
both) on top of SelectiveMLP low-rank, against it. LoRA rows use the same rank with `lora_alpha` equal to our `alpha`
and no dropout.

Bases: a random-init Llama of `--config` (SmolLM2-135M by default, also Llama-3.2-1B and Llama-2-7B shapes) or the
bundled real model, in `--dtype`, or 4-bit (`--quantization 4bit`: bitsandbytes NF4, loaded through
`from_pretrained` from a saved copy of the random-init weights, one fresh load per method).

Usage (see benchmarks/README.md):

    python benchmarks/overhead.py                     # defaults: random-init SmolLM2-135M architecture, CPU
    python benchmarks/overhead.py --config tiny --repeats 3 --output-dir /tmp/bench   # smoke test
    python benchmarks/overhead.py --config llama-1b --quantization 4bit --device cuda --dtype bfloat16 \\
        --batch-size 4 --seq-len 512 --threads 0 --output-name overhead_cuda_llama-1b_4bit
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    losses_differ,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    prefixed_log,
    publish_as,
    release_free_memory,
    report_header,
    rss_bytes,
    run_memory_workers_argv,
    run_rounds,
    runtime_note,
    safe_ratio,
    setup_torch,
    start_peak_window,
    warm_up_runtime,
)
from benchmarks.methods import METHODS, peft_config  # noqa: E402


TARGET_THRESHOLD = 1.1
# Weights of the trainer penalties in the penalty rows (as in benchmarks/continual_dpo.py); the step's cost does not
# depend on them.
KL_COEF = 0.1
EWC_COEF = 1.0
# GeometryProjected calibration data: this many times the tokens `calibrate` requires (`min_tokens_per_dim` x the
# widest adapted input).
CALIBRATION_TOKEN_MARGIN = 1.25
# A finished save of a base model in --model-cache-dir (written last, so a folder without it is an unfinished save).
BASE_MARKER = "overhead_base.json"
log = prefixed_log("overhead")

# Random-init Llama architectures. `smollm2-135m` mirrors HuggingFaceTB/SmolLM2-135M (the bundled model's
# architecture), `llama-1b` meta-llama/Llama-3.2-1B, `llama-7b` meta-llama/Llama-2-7b-hf (shapes only: weights are
# random; Llama-3.2's "llama3" RoPE scaling is left out, it does not change the cost); `tiny` is for smoke tests only.
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
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "llama-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "tiny": {"vocab_size": 1024, **TINY_LLAMA},
}

PENALTY_KEYS = ["penalty_kl", "penalty_ewc", "penalty_all"]


# --------------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    """A row: an adapter method of the registry (`benchmarks.methods`), maybe with trainer penalties on top."""

    key: str
    label: str
    group: str  # rows of one group are compared with that group's reference row
    baseline: str  # key of the row this row is compared with
    adapter: str  # key of `benchmarks.methods.METHODS` ("full_ft": full fine-tuning, no PEFT)
    penalties: tuple[str, ...] = ()  # trainer penalties added to every step: "kl", "ewc"
    same_targets: bool = True  # adapts exactly the modules of its baseline (checked)

    @property
    def full_finetuning(self) -> bool:
        return METHODS[self.adapter].full_finetuning

    @property
    def rank(self) -> int | None:
        """None: full rank; 0: `--rank` (the real rank comes from the command line)."""
        adapter = METHODS[self.adapter]
        return None if adapter.full_rank or adapter.full_finetuning else 0

    def make_config(self, args: argparse.Namespace) -> Any:
        """The PEFT config at `--rank` / `--alpha` (full-rank methods take neither); None for full fine-tuning."""
        return peft_config(self.adapter, args.rank, args.alpha)


def all_methods() -> list[Method]:
    low = "selective_mlp_lowrank"
    return [
        Method("lora_mlp", "LoRA gate/up", "mlp", "lora_mlp", "lora_mlp"),
        Method("selective_mlp_lowrank", "SelectiveMLP low-rank", "mlp", "lora_mlp", low),
        Method("selective_mlp_full", "SelectiveMLP full-rank", "mlp", "lora_mlp", "selective_mlp_full"),
        # GeometryProjected on gate/up at `--rank` / `--alpha` (the scale of the other low-rank rows); tolerance, norm
        # cap and everything else at the config's defaults
        Method("geometry", "GeometryProjected gate/up", "mlp", "lora_mlp", "geometry_mlp"),
        Method("lora_attn", "LoRA q/k/v/o", "attn", "lora_attn", "lora_attn"),
        Method("saproj_lowrank", "SAProj low-rank", "attn", "lora_attn", "saproj_lowrank"),
        Method("saproj_full", "SAProj full-rank", "attn", "lora_attn", "saproj_full"),
        Method("lora_all", "LoRA all-linear", "all", "lora_all", "lora_all"),
        Method("full_ft", "Full fine-tuning", "all", "lora_all", "full_ft", same_targets=False),
        Method("penalty_kl", "SelectiveMLP low-rank + KL", "penalty", "selective_mlp_lowrank", low, ("kl",)),
        Method("penalty_ewc", "SelectiveMLP low-rank + EWC", "penalty", "selective_mlp_lowrank", low, ("ewc",)),
        Method(
            "penalty_all", "SelectiveMLP low-rank + KL + EWC", "penalty", "selective_mlp_lowrank", low, ("kl", "ewc")
        ),
    ]


# --------------------------------------------------------------------------------------------------- model, data
def torch_dtype(args: argparse.Namespace):
    import torch

    return getattr(torch, args.dtype)


def build_float_model(args: argparse.Namespace):
    """The float base model (`args.dtype`, on `args.device`) and a description of where it came from.

    Random init runs directly on the device in the target dtype (a 7B model initialized on CPU in fp32 takes minutes).
    """
    import torch

    dtype = torch_dtype(args)
    source = args.model
    if source in ("embedded", "auto"):
        try:
            from peft_selective.demo.embedded import load_embedded_model

            model, _tokenizer = load_embedded_model()
            model = model.to(device=args.device, dtype=dtype)
            description = "bundled real model (peft_selective.demo.embedded.load_embedded_model)"
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
        with torch.device(args.device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        description = f"random-init LlamaForCausalLM, architecture {args.config!r} (not trained weights)"
    return model, {"source": source, "description": description}


def prepare_base(model, args: argparse.Namespace):
    """Train mode, no KV cache and, with `--gradient-checkpointing`, non-reentrant checkpointing with input gradients
    enabled (as `peft.prepare_model_for_kbit_training` does, without its fp32 upcast of the float layers)."""
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def device_map_target(device: str) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def saved_base_key(args: argparse.Namespace) -> dict[str, Any]:
    """What a saved base must match to be reused."""
    key: dict[str, Any] = {"model": args.model, "seed": args.seed, "dtype": args.dtype}
    if args.model != "embedded":
        key.update(config=args.config, architecture=ARCHITECTURES[args.config])
    return key


def saved_base_folder(args: argparse.Namespace) -> Path:
    name = args.model if args.model == "embedded" else f"{args.model}-{args.config}"
    return Path(args.model_cache_dir) / f"{name}-seed{args.seed}-{args.dtype}"


def ensure_saved_base(args: argparse.Namespace) -> dict[str, Any]:
    """Save the float base (random init on the device, or the bundled model) with `save_pretrained` (safetensors) into
    `saved_base_folder(args)`, unless a finished save of the same base is already there. Returns the model info."""
    import torch

    folder = saved_base_folder(args)
    marker = folder / BASE_MARKER
    key = saved_base_key(args)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            log(f"reusing the saved base in {folder}")
            return {**saved["model_info"], "saved_base": str(folder), "saved_base_reused": True}
    if args._memory_worker is not None:
        raise RuntimeError(f"memory worker: no finished save of the base in {folder}")
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or different save in our own sub-folder
    started = time.perf_counter()
    model, info = build_float_model(args)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - started
    model.save_pretrained(folder)
    del model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    info["save_s"] = round(time.perf_counter() - started, 1)
    log(f"saved the {info['parameters']:,}-parameter base to {folder} (build {built:.1f}s, total {info['save_s']}s)")
    marker.write_text(json.dumps({"key": key, "model_info": info}, indent=2) + "\n")
    return {**info, "saved_base": str(folder), "saved_base_reused": False}


def load_quantized_base(args: argparse.Namespace):
    """A fresh 4-bit NF4 (double quantization, compute dtype `--dtype`) base from the saved folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(args)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        saved_base_folder(args),
        quantization_config=quantization,
        device_map={"": device_map_target(args.device)},
        dtype=dtype,
        attn_implementation=args.attn_implementation,
    )


class BaseProvider:
    """Hands out one base model per method: a deep copy of one float model built once, or (4-bit, where a deep copy
    of the quantized model is not reliable) a fresh `from_pretrained` of the saved base."""

    def __init__(self, args: argparse.Namespace, copies: bool = True) -> None:
        self.args = args
        self.copies = copies  # False: hand out the float model itself (one method per process)
        self.quantized = args.quantization == "4bit"
        self._float = None
        if self.quantized:
            self.info = ensure_saved_base(args)
        else:
            self._float, self.info = build_float_model(args)
            self.info["parameters"] = sum(p.numel() for p in self._float.parameters())
        self.vocab_size = self._vocab_size()

    def _vocab_size(self) -> int:
        if self._float is not None:
            return self._float.config.vocab_size
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(saved_base_folder(self.args)).vocab_size

    def get(self):
        if self.quantized:
            started = time.perf_counter()
            model = load_quantized_base(self.args)
            log(f"loaded a 4-bit base from {saved_base_folder(self.args)} in {time.perf_counter() - started:.1f}s")
            return prepare_base(model, self.args)
        model = copy.deepcopy(self._float) if self.copies else self._float
        return prepare_base(model, self.args)

    def release(self) -> None:
        self._float = None
        gc.collect()


def random_ids(rows: int, length: int, vocab_size: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, length), generator=generator)


@dataclass
class Data:
    """Everything the steps read: the training batch (`--seed`), and where needed GeometryProjected's calibration
    batches (`--seed` + 1) and the KL's anchor batch (`--seed` + 2), all random tokens."""

    batch: Any
    vocab_size: int
    calibration: list[dict[str, Any]] | None = None
    anchor: Any = None


def make_data(args: argparse.Namespace, vocab_size: int, methods: list[Method]) -> Data:
    batch = random_ids(args.batch_size, args.seq_len, vocab_size, args.seed).to(args.device)
    data = Data(batch, vocab_size)
    if any("kl" in m.penalties for m in methods):
        data.anchor = make_anchor_batch(args, vocab_size)
    return data


def calibration_batches(args: argparse.Namespace, vocab_size: int, needed_tokens: float) -> list[dict[str, Any]]:
    """Random-token batches of `--batch-size x --seq-len` (seed `--seed` + 1, not the training batch), enough for
    `CALIBRATION_TOKEN_MARGIN` x the tokens `calibrate` requires; given as tokenized batches (`to_batches` accepts
    dicts with `input_ids` and `attention_mask`)."""
    import torch

    per_batch = args.batch_size * args.seq_len
    count = max(1, math.ceil(needed_tokens * CALIBRATION_TOKEN_MARGIN / per_batch))
    ids = random_ids(count * args.batch_size, args.seq_len, vocab_size, args.seed + 1)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(args.batch_size, dim=0)
    ]


def trainer_kl_defaults() -> dict[str, Any]:
    """The `ContinualDPOConfig` defaults of the KL term (direction, anchor continuation length, anchor length cap)."""
    from dataclasses import fields

    from peft_selective.continual.config import ContinualDPOConfig

    defaults = {f.name: f.default for f in fields(ContinualDPOConfig)}
    return {
        "kl_direction": defaults["kl_direction"],
        "kl_anchor_max_new_tokens": defaults["kl_anchor_max_new_tokens"],
        "kl_max_anchor_length": defaults["kl_max_anchor_length"],
    }


def anchor_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """(rows, length, scored positions) of the KL's anchor batch."""
    defaults = trainer_kl_defaults()
    rows = args.kl_batch_size or max(1, args.batch_size // 2)  # the trainer's default kl_batch_size
    length = max(2, min(args.kl_anchor_length, defaults["kl_max_anchor_length"]))
    scored = min(defaults["kl_anchor_max_new_tokens"], length - 1)
    return rows, length, scored


def make_anchor_batch(args: argparse.Namespace, vocab_size: int):
    """A `peft_selective.continual.anchors.AnchorBatch` as `AnchorSet.sample` builds it: `kl_batch_size` rows of random tokens (a prompt
    followed by its continuation), no padding, scoring the positions that predict the continuation's tokens."""
    import torch

    from peft_selective.continual.anchors import AnchorBatch

    rows, length, scored = anchor_shape(args)
    ids = random_ids(rows, length, vocab_size, args.seed + 2)
    score_mask = torch.zeros_like(ids)
    score_mask[:, length - 1 - scored : length - 1] = 1
    device = args.device
    return AnchorBatch(ids.to(device), torch.ones_like(ids).to(device), score_mask.to(device))


# --------------------------------------------------------------------------------------------------- one method
@dataclass
class Run:
    """One method's model, optimizer, penalty state and measurements."""

    method: Method
    model: Any
    optimizer: Any
    trainable_params: int
    adapted_modules: list[str]
    adapter_name: str = "default"
    reference: Any = None  # the KL's reference: `PreviousMonthReference(model, [])`, the base with the adapter off
    anchor: Any = None
    kl_direction: str = "forward"
    fisher: Any = None  # the EWC's `FisherState`, normalised as the trainer holds it
    calibration: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    kl_values: list[float] = field(default_factory=list)
    ewc_values: list[float] = field(default_factory=list)
    failed: str | None = None


class CalibrationFailed(Exception):
    """`peft_selective.calibrate` raised: the method's row is reported as failed, the other rows still run."""


def calibrate_geometry(model, args: argparse.Namespace, data: Data) -> dict[str, Any]:
    """`peft_selective.calibrate` on random-token batches, as a user calls it before training; timed (synchronized)."""
    import peft_selective
    from peft_selective.tuners.selective.layer import SelectiveLayer

    config = model.peft_config["default"]
    widest = max(m.in_features for m in model.modules() if isinstance(m, SelectiveLayer) and "default" in m.rank)
    needed = config.min_tokens_per_dim * widest
    if data.calibration is None:
        data.calibration = calibration_batches(args, data.vocab_size, needed)
    sync(args.device)
    start = time.perf_counter()
    try:
        report = peft_selective.calibrate(model, data.calibration, show_progress=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        if is_oom(exc):
            raise
        raise CalibrationFailed(
            f"peft_selective.calibrate failed on {args.device}: {type(exc).__name__}: {exc}"
        ) from exc
    sync(args.device)
    seconds = time.perf_counter() - start
    dims = [g.protected_dim for g in report.layers.values()]
    return {
        "seconds": seconds,
        "tokens": report.calibration_tokens,
        "tokens_required": needed,
        "batches": len(data.calibration),
        "layers": len(report.layers),
        "protected_dim_median": statistics.median(dims),
        "soft_projectors": sum(g.soft_projector for g in report.layers.values()),
        "max_bound": report.max_bound,
        "data": f"random tokens (seed {args.seed + 1}), {len(data.calibration)} batches of "
        f"{args.batch_size}x{args.seq_len}",
    }


def synthetic_fisher(model, args: argparse.Namespace, adapter_name: str):
    """A `FisherState` for the adapted layers, positive random values (seed `--seed` + 3) of the shapes a real one
    has (one `(out, in)` tensor per layer), created on the device where the trainer's state ends up after its first
    step, checked with the trainer's own `check_fisher_matches`, then normalised and cast to `--ewc-fisher-dtype` as
    the trainer does once (`FisherState.normalized(..., in_place=True)`: one copy at any time)."""
    import torch

    from peft_selective.continual.ewc import FisherState, adapted_layers, check_fisher_matches

    device = torch.device(device_map_target(args.device)) if args.device.startswith("cuda") else args.device
    generator = torch.Generator(device=device).manual_seed(args.seed + 3)
    fisher = {}
    for name, layer in adapted_layers(model, adapter_name).items():
        base = layer.get_base_layer()
        shape = (base.out_features, base.in_features)
        fisher[name] = torch.rand(shape, generator=generator, device=device) + 0.5
    state = FisherState(fisher, ["synthetic"], 64, None)
    check_fisher_matches(model, adapter_name, state)
    return state.normalized(getattr(torch, args.ewc_fisher_dtype), in_place=True)  # as the trainer does


def build_run(base, method: Method, args: argparse.Namespace, data: Data) -> Run:
    """`method` on `base` (used, not copied), in train mode, calibrated where needed, with its AdamW optimizer and
    penalty state."""
    import torch
    from peft import get_peft_model

    import peft_selective  # noqa: F401 - registers the selective PEFT types

    torch.manual_seed(args.seed)  # same adapter init (A matrices) whatever was built before
    if method.full_finetuning:
        model = base
        model.requires_grad_(True)
    else:
        model = get_peft_model(base, method.make_config(args))
    model.train()
    calibration = None
    if not method.full_finetuning and getattr(model.peft_config["default"], "requires_calibration", False):
        calibration = calibrate_geometry(model, args, data)
        log(f"{method.key}: calibrated in {calibration['seconds']:.2f}s on {calibration['tokens']} tokens")
        model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = Run(
        method=method,
        model=model,
        optimizer=torch.optim.AdamW(trainable, lr=args.lr),
        trainable_params=sum(p.numel() for p in trainable),
        adapted_modules=adapted_module_names(model),
        calibration=calibration,
    )
    if "kl" in method.penalties:
        from peft_selective.continual.reference import PreviousMonthReference

        # The trainer's reference for a first-month PEFT model: the policy with no adapter active.
        run.reference = PreviousMonthReference(model, [])
        run.anchor = data.anchor
        run.kl_direction = trainer_kl_defaults()["kl_direction"]
    if "ewc" in method.penalties:
        run.fisher = synthetic_fisher(model, args, run.adapter_name)
    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def train_step(run: Run, batch, device: str) -> float:
    """One training step of `run` (its loss, plus its penalties the way `ContinualDPOTrainer.compute_loss` adds them);
    records the loss (before the step) and the penalty values; returns the seconds."""
    sync(device)
    start = time.perf_counter()
    loss = run.model(input_ids=batch, labels=batch, use_cache=False).loss
    total, kl, ewc = loss, None, None
    if run.reference is not None:
        from peft_selective.continual.anchors import anchor_kl

        kl = anchor_kl(run.model, run.reference, run.anchor, run.kl_direction)
        total = total + KL_COEF * kl
    if run.fisher is not None:
        from peft_selective.continual.ewc import ewc_penalty

        ewc = ewc_penalty(run.model, run.adapter_name, run.fisher, fisher_mean=1.0)
        total = total + EWC_COEF * ewc
    total.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    run.losses.append(float(total.detach()))
    if kl is not None:
        run.kl_values.append(float(kl.detach()))
    if ewc is not None:
        run.ewc_values.append(float(ewc.detach()))
    return seconds


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------- timing
def create_run(provider: BaseProvider, method: Method, args: argparse.Namespace, data: Data, state: dict) -> Run:
    """Load or copy a base and build `method` on it. With inline memory (CUDA), measure the allocations of this base,
    the adapter and `--mem-steps` training steps (the first steps of the method, untimed), like `memory_worker`."""
    import torch

    inline = args.memory_mode == "inline"
    if inline:
        sync(args.device)
        before = torch.cuda.memory_allocated()
    base = provider.get()
    if inline:
        if not state.get("runtime_warm"):
            # one-off allocations of the kernel libraries (cuBLAS workspaces...) on the first forward + backward of the
            # process: not this method's, so they are added to what was there before
            sync(args.device)
            loaded = torch.cuda.memory_allocated()
            warm_up_runtime(base, data.batch[:1, :8])
            sync(args.device)
            before += torch.cuda.memory_allocated() - loaded
            state["runtime_warm"] = True
        sync(args.device)
        base_bytes = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
    run = build_run(base, method, args, data)
    if inline:
        if run.calibration is not None:
            sync(args.device)
            torch.cuda.reset_peak_memory_stats()  # the calibration statistics are not training memory
        for _ in range(args.mem_steps):
            train_step(run, data.batch, args.device)
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() - before
        run.memory = {
            "method": method.key,
            "peak_bytes": peak,
            "base_bytes": base_bytes,
            "train_peak_over_base_bytes": peak - base_bytes,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "peak_method": "torch.cuda.max_memory_allocated in the timing process, minus what was allocated before "
            "this method's base was loaded",
            "trainable_params": run.trainable_params,
            "steps": args.mem_steps,
        }
    return run


def summarize_run(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    times = run.times
    median = statistics.median(times)
    out = {
        "trainable_params": run.trainable_params,
        "adapted_modules": len(run.adapted_modules),
        "adapted_module_names": run.adapted_modules,
        "step_times_s": times,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "initial_loss": run.losses[0],
        "final_loss": run.losses[-1],
        "losses": run.losses,
    }
    if run.kl_values:
        out["kl_values"] = run.kl_values
    if run.ewc_values:
        out["ewc_values"] = run.ewc_values
    if run.calibration is not None:
        out["calibration"] = run.calibration
    return out


def free_run(run: Run | None, args: argparse.Namespace) -> None:
    if run is not None:
        run.model = run.optimizer = run.reference = run.fisher = run.anchor = None
    gc.collect()
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_timing(
    args: argparse.Namespace, methods: list[Method]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """Time every method (round-robin, or one after the other with `--sequential`). Returns the timings, the model
    info, the inline memory readings and the methods that failed (out of memory, or calibration raised)."""
    provider = BaseProvider(args)
    model_info = dict(provider.info)
    data = make_data(args, provider.vocab_size, methods)
    state: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    memory: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}

    def fail(key: str, exc: BaseException) -> None:
        if isinstance(exc, CalibrationFailed):
            failed[key] = str(exc).splitlines()[0][:400]
        elif is_oom(exc):
            failed[key] = f"out of memory: {str(exc).splitlines()[0][:300]}"
        else:
            raise exc
        log(f"{key}: FAILED ({failed[key]})")

    if args.sequential:
        for method in methods:
            run = None
            try:
                run = create_run(provider, method, args, data, state)

                def step(key: str, warm: bool, run=run) -> float:
                    seconds = train_step(run, data.batch, args.device)
                    if not warm:
                        run.times.append(seconds)
                    return seconds

                run_rounds([method.key], args.warmup, args.repeats, step, log, f"{method.key} step")
                results[method.key] = summarize_run(run, args)
                if run.memory is not None:
                    memory[method.key] = run.memory
            except (RuntimeError, MemoryError, CalibrationFailed) as exc:
                fail(method.key, exc)
            free_run(run, args)
    else:
        runs: dict[str, Run] = {}
        for method in methods:
            try:
                runs[method.key] = create_run(provider, method, args, data, state)
            except (RuntimeError, MemoryError, CalibrationFailed) as exc:
                fail(method.key, exc)
                free_run(None, args)
        provider.release()

        def step(key: str, warm: bool) -> float:
            run = runs[key]
            if run.failed:
                return math.nan
            try:
                seconds = train_step(run, data.batch, args.device)
            except (RuntimeError, MemoryError) as exc:
                fail(key, exc)
                run.failed = failed[key]
                free_run(run, args)  # its memory goes back to the other methods
                return math.nan
            if not warm:
                run.times.append(seconds)
            return seconds

        run_rounds(list(runs), args.warmup, args.repeats, step, log, "round")
        for key, run in runs.items():
            if not run.failed:
                results[key] = summarize_run(run, args)
                if run.memory is not None:
                    memory[key] = run.memory
        for run in runs.values():
            free_run(run, args)  # drop the models before the memory subprocesses run
        runs.clear()  # not `del`: the `step` closure holds the name
    provider.release()
    free_run(None, args)
    return results, model_info, memory, failed


# --------------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: load the base, then build one method and train `--mem-steps` steps; print peaks."""
    import peft  # noqa: F401 - imported before the baseline so that library import costs are not counted
    import torch

    import peft_selective  # noqa: F401

    method = {m.key: m for m in all_methods()}[args._memory_worker]
    if method.penalties:
        import peft_selective.continual  # noqa: F401 - likewise
    cuda = args.device.startswith("cuda")
    provider = BaseProvider(args, copies=False)
    base = provider.get()
    data = make_data(args, provider.vocab_size, [method])
    warm_up_runtime(base, data.batch[:1, :8])  # the same for every method
    if cuda:
        sync(args.device)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_method = "torch.cuda.max_memory_allocated"
    else:
        baseline = rss_bytes()
        hwm_reset = start_peak_window()
        peak_method = "VmHWM after reset (/proc/self/clear_refs)" if hwm_reset else "ru_maxrss (NOT reset)"
    run = build_run(base, method, args, data)
    if run.calibration is not None:  # the calibration statistics are not training memory
        if cuda:
            sync(args.device)
            torch.cuda.reset_peak_memory_stats()
        else:
            data.calibration = None
            release_free_memory()
            hwm_reset = start_peak_window()
    for _ in range(args.mem_steps):
        train_step(run, data.batch, args.device)
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
        "trainable_params": run.trainable_params,
        "steps": args.mem_steps,
    }
    if cuda:
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    emit_memory_result(__file__, out)


# --------------------------------------------------------------------------------------------------- reporting
def rank_label(method: Method, args: argparse.Namespace) -> str | int:
    if method.full_finetuning:
        return "all"
    return "full" if method.rank is None else args.rank


def build_rows(methods: list[Method], timing: dict, memory: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        t = timing.get(method.key)
        if t is None:  # failed
            continue
        m = memory.get(method.key, {})
        base_t = timing.get(method.baseline)
        base_m = memory.get(method.baseline, {})
        row = {
            "key": method.key,
            "method": method.label,
            "group": method.group,
            "compared_with": method.baseline,
            "rank": rank_label(method, args),
            **{k: v for k, v in t.items() if k != "adapted_module_names"},
            "peak_mem_bytes": m.get("peak_bytes"),
            "train_mem_over_base_bytes": m.get("train_peak_over_base_bytes"),
            "peak_reserved_bytes": m.get("peak_reserved_bytes"),
            # "vs_lora" for continuity with earlier results: the ratio to the row named in `compared_with`
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


def results_table(rows: list[dict[str, Any]], device: str, labels: dict[str, str]) -> str:
    mem_label = "CUDA peak alloc" if device.startswith("cuda") else "peak RSS"
    header = [
        "method",
        "rank",
        "trainable params",
        "step time median (s)",
        "min-max (s)",
        "tokens/s",
        "compared with",
        "time vs ref",
        f"{mem_label} (MiB)",
        "train mem over base (MiB)",
        "mem vs ref",
    ]
    return markdown_table(header, [results_row(r, labels) for r in rows])


def results_row(r: dict[str, Any], labels: dict[str, str]) -> list[str]:
    return [
        r["method"],
        str(r["rank"]),
        f"{r['trainable_params']:,}",
        f"{r['step_time_median_s']:.3f}",
        f"{r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}",
        f"{r['tokens_per_s']:,.0f}",
        "itself" if r["compared_with"] == r["key"] else labels.get(r["compared_with"], r["compared_with"]),
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


def penalty_verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Step time of the penalty rows relative to SelectiveMLP low-rank without penalties (informational, no target)."""
    by_key = {r["key"]: r for r in rows}
    if "selective_mlp_lowrank" not in by_key:
        return None
    entries = {}
    for key in PENALTY_KEYS:
        row = by_key.get(key)
        if row is None:
            continue
        paired = row["paired_time_ratios"]
        entries[key] = {
            "label": row["method"],
            "ratio_of_medians": row["time_ratio_vs_lora"],
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
            "mem_ratio": row["mem_ratio_vs_lora"],
        }
    if not entries:
        return None
    return {
        "description": "step time of SelectiveMLP low-rank with the ContinualDPOTrainer penalties (anchor KL, EWC) "
        "relative to SelectiveMLP low-rank without them; informational, no target",
        "compared_with": "selective_mlp_lowrank",
        "rows": entries,
    }


def penalty_verdict_text(v: dict[str, Any] | None) -> str | None:
    if v is None:
        return None
    parts = [
        f"{e['label']} {e['ratio_of_medians']:.3f}x (paired median {e['paired_ratio_median']:.3f}x, range "
        f"{e['paired_ratio_min']:.3f}x-{e['paired_ratio_max']:.3f}x"
        + ("" if e["mem_ratio"] is None else f"; train memory {e['mem_ratio']:.2f}x")
        + ")"
        for e in v["rows"].values()
    ]
    return (
        "Penalties (informational, no target; step time vs SelectiveMLP low-rank without penalties): "
        + "; ".join(parts)
        + "."
    )


def calibration_text(timing: dict[str, dict[str, Any]]) -> str | None:
    lines = []
    for key, t in timing.items():
        c = t.get("calibration")
        if c is None:
            continue
        lines.append(
            f"{key} calibration (`peft_selective.calibrate`, before training, not in the step time): "
            f"{c['seconds']:.2f} s on {c['tokens']:,} tokens ({c['data']}; {c['tokens_required']:,.0f} required), "
            f"{c['layers']} layers, median protected dim {c['protected_dim_median']:g}, "
            f"{c['soft_projectors']} soft projector(s)."
        )
    return "\n".join(lines) or None


def library_versions() -> dict[str, str | None]:
    """Versions beyond `machine_info`'s torch / transformers / peft."""
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("bitsandbytes", "trl", "accelerate", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Step time, throughput, peak memory and trainable parameters of SelectiveMLP / SAProj (full-rank and "
            "low-rank) and GeometryProjected against PEFT LoRA on the same modules at the same rank, of LoRA on all "
            "linear layers and full fine-tuning, and of the ContinualDPOTrainer penalties (KL, EWC)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=["tiny-llama", "embedded", "auto"],
        default="tiny-llama",
        help="tiny-llama: random-init LlamaForCausalLM of --config (self-contained); embedded: the bundled real "
        "model (peft_selective.demo.embedded.load_embedded_model); auto: embedded if it loads, else tiny-llama.",
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
        "--quantization",
        choices=["none", "4bit"],
        default="none",
        help="4bit: bitsandbytes NF4 with double quantization, compute dtype --dtype; the base is saved once "
        "(save_pretrained) and every method gets a fresh from_pretrained of it. full_ft is skipped.",
    )
    parser.add_argument(
        "--model-cache-dir",
        type=Path,
        default=None,
        help="4bit: where the float base is saved (a sub-folder per model/config/seed/dtype, reused when it holds "
        "a finished save). Default: a temporary folder removed at the end.",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="non-reentrant gradient checkpointing on the base (with input gradients enabled)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time one method at a time (all its rounds), freeing it before the next, instead of round-robin with "
        "all methods in memory together (for bases too large for that, e.g. llama-7b)",
    )
    parser.add_argument(
        "--memory-mode",
        choices=["auto", "subprocess", "inline"],
        default="auto",
        help="subprocess: peak memory in a fresh process per method; inline (CUDA only): in the timing process, "
        "from torch.cuda's allocation counters, over each method's build and its first --mem-steps steps; auto: "
        "inline on CUDA, subprocess on CPU",
    )
    parser.add_argument(
        "--kl-batch-size",
        type=int,
        default=None,
        help="penalty rows: anchor sequences per KL term (default: the trainer's, half the batch size)",
    )
    parser.add_argument(
        "--kl-anchor-length",
        type=int,
        default=64,
        help="penalty rows: tokens per anchor sequence (capped at the trainer's kl_max_anchor_length)",
    )
    parser.add_argument(
        "--ewc-fisher-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="EWC rows: the dtype the Fisher is held in (ContinualDPOConfig.ewc_fisher_dtype)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; 0: torch's own default. Default: 1 on CPU (on a shared machine, OpenMP barriers "
        "make multi-threaded step times mostly scheduling noise), torch's own default on CUDA.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(m.key for m in all_methods()),
        help="comma-separated subset of: " + ", ".join(m.key for m in all_methods()),
    )
    parser.add_argument(
        "--output-name",
        default="overhead",
        help="result files <output-dir>/<output-name>.{json,md}, e.g. overhead_cuda_llama-7b_4bit for a GPU run",
    )
    add_memory_args(parser, "timings and parameter counts only")
    add_output_args(parser, "overhead")
    args = parser.parse_args(argv)
    known = {m.key for m in all_methods()}
    args.method_keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = set(args.method_keys) - known
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {sorted(known)}")
    if args.threads == 0:
        args.threads = None  # torch's default
    elif args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None and args.threads < 0:
        parser.error("--threads must be >= 0")
    cuda = args.device.startswith("cuda")
    if args.memory_mode == "auto":
        args.memory_mode = "inline" if cuda else "subprocess"
    if args.memory_mode == "inline" and not cuda:
        parser.error("--memory-mode inline needs CUDA: on CPU, RSS cannot tell one method's memory from another's")
    if args.skip_memory:
        args.memory_mode = "none"
    if args.kl_anchor_length < 2 or (args.kl_batch_size is not None and args.kl_batch_size < 1):
        parser.error("--kl-anchor-length >= 2 and --kl-batch-size >= 1 are required")
    check_round_args(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def selected_methods(args: argparse.Namespace) -> tuple[list[Method], dict[str, str]]:
    skipped = {}
    methods = []
    for method in all_methods():
        if method.key not in args.method_keys:
            continue
        if method.full_finetuning and args.quantization != "none":
            skipped[method.key] = "full fine-tuning of a quantized base is not possible (4-bit weights do not train)"
            log(f"skipping {method.key}: {skipped[method.key]}")
            continue
        methods.append(method)
    return methods, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    import torch

    temp_dir = None
    if args.quantization != "none" and args.model_cache_dir is None:
        if args._memory_worker is not None:
            raise SystemExit("memory worker: --model-cache-dir is required with --quantization")
        temp_dir = tempfile.mkdtemp(prefix="overhead-base-")
        args.model_cache_dir = Path(temp_dir)
    try:
        if args._memory_worker is not None:
            memory_worker(args)
            return 0
        return run_benchmark(args, torch)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, torch) -> int:
    methods, skipped = selected_methods(args)
    if not methods:
        raise SystemExit("no method left to run")
    cuda = args.device.startswith("cuda")
    started = time.time()
    load_start = load_average()
    log(
        f"{len(methods)} methods, batch {args.batch_size}x{args.seq_len}, device {args.device}, {args.dtype}, "
        f"quantization {args.quantization}, {'sequential' if args.sequential else 'round-robin'}"
    )
    timing, model_info, inline_memory, failed = run_timing(args, methods)
    timing_s = time.time() - started
    measured = [m for m in methods if m.key in timing]
    if args.memory_mode == "subprocess":
        worker_argv = list(args.argv)
        if args.quantization != "none":
            worker_argv += ["--model-cache-dir", str(args.model_cache_dir)]
        memory = run_memory_workers_argv(__file__, worker_argv, [m.key for m in measured], log)
    else:
        memory = inline_memory
    load_end = load_average()

    targets_match = {}
    for method in measured:
        base = timing.get(method.baseline)
        if base is not None and method.key != method.baseline and method.same_targets:
            targets_match[method.key] = timing[method.key]["adapted_module_names"] == base["adapted_module_names"]
    rows = build_rows(methods, timing, memory, args)
    verdict = target_verdict(rows)
    penalties = penalty_verdict(rows)
    labels = {m.key: m.label for m in all_methods()}
    table = results_table(rows, args.device, labels)
    elapsed = time.time() - started

    if args.memory_mode == "inline":
        mem_definition = (
            "torch.cuda.max_memory_allocated in the timing process over one method's base load, adapter creation "
            f"(after calibration, for GeometryProjected) and its first {args.mem_steps} training steps, minus what "
            "was allocated before its base was loaded; 'over base' also subtracts what loading its base allocated"
            + ("" if args.sequential else " (the other methods' weights and optimizer state stay constant meanwhile)")
        )
    elif cuda:
        mem_definition = (
            "torch.cuda.max_memory_allocated during adapter creation + training steps in a fresh process; 'over "
            "base' subtracts torch.cuda.memory_allocated after loading the base model"
        )
    else:
        mem_definition = (
            "peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs after loading the base model) of "
            "a fresh process that loads the base model, builds one method and trains --mem-steps steps; 'over base' "
            "subtracts the RSS after loading the base model (after gc + malloc_trim)"
        )
    machine = machine_info(
        torch_threads=torch.get_num_threads(),
        device=args.device,
        **library_versions(),
        **(
            {"cuda_device": torch.cuda.get_device_name(torch.device(args.device)), "cuda": torch.version.cuda}
            if cuda
            else {}
        ),
    )
    sources = [
        REPO_ROOT / "peft_selective" / "tuners" / "selective" / f for f in ("config.py", "layer.py", "model.py")
    ]
    sources += [REPO_ROOT / "peft_selective" / "tuners" / "geometry" / f for f in ("calibration.py", "config.py")]
    sources += [REPO_ROOT / "peft_selective" / "continual" / f for f in ("anchors.py", "ewc.py", "reference.py")]
    rows_shape = anchor_shape(args) if any("kl" in m.penalties for m in methods) else None
    report = {
        **report_header("overhead", sources, machine, load_start, load_end),
        "model": {
            **model_info,
            "config": args.config if model_info["source"] == "tiny-llama" else None,
            "quantization": (
                "bitsandbytes NF4, double quantization, compute dtype " + args.dtype
                if args.quantization == "4bit"
                else None
            ),
        },
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_per_step": args.batch_size * args.seq_len,
            "rank": args.rank,
            "alpha": args.alpha,
            "lora_dropout": 0.0,
            "warmup_rounds": args.warmup,
            "timed_rounds": args.repeats,
            "mem_steps": args.mem_steps,
            "optimizer": f"torch.optim.AdamW(lr={args.lr})",
            "dtype": args.dtype,
            "quantization": args.quantization,
            "gradient_checkpointing": args.gradient_checkpointing,
            "sequential": args.sequential,
            "memory_mode": args.memory_mode,
            "seed": args.seed,
            "step": "forward (causal-LM loss on a fixed random token batch) + backward + AdamW.step + zero_grad",
            "timing": (
                "one method at a time (--sequential): all rounds of a method, then the next; paired ratios pair the "
                "i-th timed steps"
                if args.sequential
                else "all methods in one process, round-robin, order rotated every round; median of timed rounds"
            ),
            "throughput": "tokens_per_s = batch_size * seq_len / median step time (training batch tokens only)",
            "peak_memory": mem_definition,
            "penalties": {
                "kl": "peft_selective.continual.anchors.anchor_kl(policy, PreviousMonthReference(policy, []), anchor_batch, "
                "direction): a reference forward (adapter off, no_grad) + a policy forward on the anchor batch",
                "ewc": "peft_selective.continual.ewc.ewc_penalty(policy, 'default', FisherState.normalized(dtype), fisher_mean=1.0) "
                "against a synthetic Fisher (uniform [0.5, 1.5), one (out, in) tensor per adapted layer, on the "
                f"device, held in {args.ewc_fisher_dtype})",
                "kl_coef": KL_COEF,
                "ewc_coef": EWC_COEF,
                "anchor_batch_rows_length_scored": rows_shape,
                "trainer_kl_defaults": trainer_kl_defaults() if rows_shape else None,
            },
            "geometry": "GeometryProjectedConfig(rank, alpha, target_modules=[gate_proj, up_proj]), defaults "
            "otherwise; calibrated with peft_selective.calibrate on random-token batches before training",
        },
        "skipped": skipped,
        "failed": failed,
        "targets_match_lora": targets_match,
        "results": rows,
        "memory_raw": memory,
        "target": verdict,
        "penalty_verdict": penalties,
        "runtime_s": {"timing": round(timing_s, 1), "total": round(elapsed, 1)},
    }
    # the command line this run was given (also when `main(argv)` is called from Python, e.g. a test)
    report["command"] = "python benchmarks/overhead.py" + ("" if not args.argv else " " + shlex.join(args.argv))
    report["argv"] = ["benchmarks/overhead.py", *args.argv]

    header = (
        f"Model: {model_info['description']}, {model_info['parameters']:,} parameters"
        f"{', 4-bit NF4 (bitsandbytes, double quant)' if args.quantization == '4bit' else ''}; batch "
        f"{args.batch_size}x{args.seq_len}, {args.dtype}, device {args.device}"
        f"{' (' + machine['cuda_device'] + ')' if cuda else ''} ({torch.get_num_threads()} torch thread(s)), "
        f"rank {args.rank}, alpha {args.alpha:g}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
        f"{args.warmup} warm-up + {args.repeats} timed "
        f"{'rounds per method, one method at a time' if args.sequential else 'round-robin rounds'}."
    )
    mismatched = [k for k, ok in targets_match.items() if not ok]
    notes = [header, "", table, "", verdict_text(verdict)]
    for extra in (penalty_verdict_text(penalties), calibration_text(timing)):
        if extra:
            notes.append(extra)
    for key, reason in skipped.items():
        notes.append(f"Skipped {key}: {reason}.")
    for key, reason in failed.items():
        notes.append(f"FAILED {key}: {reason}.")
    if mismatched:
        notes.append(f"WARNING: adapted modules differ from the matching reference row for {mismatched}.")
    losses = {r["key"]: r["initial_loss"] for r in rows}
    if rows and losses_differ(losses.values()):
        notes.append(f"WARNING: initial losses differ across methods (should be equal, zero-init updates): {losses}")
    if args.memory_mode != "none":
        notes.append(f"Peak memory: {mem_definition}.")
    notes.append(runtime_note(elapsed, load_start, load_end))
    text = "\n".join(notes)
    details = f" ({machine['torch_threads']} threads), device {args.device}"
    if cuda:
        details += f" ({machine['cuda_device']})"
    publish_as(args, report, args.output_name, "Overhead benchmark results", details, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
