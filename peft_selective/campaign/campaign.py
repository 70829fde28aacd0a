"""A monthly continual-DPO campaign kept in one directory, the single source of truth.

The directory's paths (`campaign.json`, `evaluations.json`, `data/<month>/`, `adapters/<month>/`, `buffer/`,
`fisher/`, `cards/<month>/`, `runs/<month>/`) are named in `peft_selective.campaign.layout`, which describes each;
the config is `peft_selective.campaign.config.CampaignConfig`.

Every file is written atomically (temp file + rename) and `campaign.json` last: a run killed at any point leaves the
previous consistent state, and `run_month` with the same month continues from the last checkpoint. Month t is
trained by [`ContinualDPOTrainer`] on top of the adapters of months 1..t−1, loaded from `adapters/` and checked
against their recorded SHA-256.

What the directory is trusted with (`Campaign.verify`): campaign.json records the SHA-256 of every file the campaign
relies on (each month's splits, reference log-probs, behaviour before it, calibration text, adapter config and
weights, geometry report and card; each evaluations.json entry; the config; the rehearsal buffer's and the Fisher's
files as the last done month left them) and a fingerprint of the base model (its shapes, and a hash of
`FINGERPRINT_ELEMENTS` evenly spaced elements of every tensor). A command refuses a file that changed, is missing or
is reached through a symbolic link, naming it. campaign.json itself is not checksummed: an edit of it that keeps it
consistent is not detected (its month names and config are still checked).

A month is only recorded when the model is healthy (`peft_selective.continual.health`, options `health_check`, `max_perplexity_ratio`,
`max_kl_to_base`): a non-finite loss or vanished gradients in training, or non-finite metrics, an exploded
reference-text perplexity or KL to the base in its evaluation, refuse it with `ModelHealthError`. The month's
adapter, rehearsal rows and Fisher are written only after its evaluation passed, and a refused month's data,
checkpoints and state entries are removed: the directory is left as before the month.

One command at a time (`Campaign.lock`): every command that changes the directory (`init`, `run_month`, `evaluate`,
`report`, `push`, `abandon`) holds its exclusive lock, `.lock` (`peft_selective.utils.lock`), from start to end, and
reads the state under it; a second command is refused, naming the holder (pid, host, start time, command). A lock
left by a crashed process on this host is taken over; one whose holder cannot be proven gone (another host, a
filesystem without `flock`) is broken with `continual-dpo unlock`. A resumed month continues from its last complete
checkpoint (`peft_selective.continual.trainer.last_complete_checkpoint`: one cut by a kill or a full disk is skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset, load_dataset
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, ProgressCallback, TrainerCallback

from ..continual.ewc import FISHER_METADATA
from ..continual.health import ModelHealthError, check_evaluation
from ..continual.preference_data import PreferenceDataError, preference_row_problem, validate_preference_dataset
from ..continual.rehearsal import RehearsalBuffer
from ..continual.trainer import ContinualDPOTrainer, last_complete_checkpoint
from ..evaluation.preference import retention_cells
from ..evaluation.suites import (
    bleed_table,
    evaluate_model,
    fit_style_signature,
    general_table,
    implicit_reward_matrix,
    knowledge_table,
    learning_table,
    month_behaviour,
    ranking_table,
    reference_logps_for,
    retention_intervals,
    retention_matrix,
    retention_numbers,
)
from ..quantization import keep_4bit_layers_trainable
from ..utils.io import atomic_write, atomic_write_json, sha256_file
from ..utils.lock import DirectoryLock, DirectoryLockedError
from . import layout
from .config import EMBEDDED, FLAT_OPTIONS, CampaignConfig, normalize_checks
from .layout import BASELINE, CampaignLayout, check_month_name


logger = logging.getLogger(__name__)

#: 3: checksums of every state file (`"files"` per month, `"config_sha256"`, `"evaluations_sha256"`,
#: `"shared_files"`) and the base model's weights in its fingerprint. 4: the training defaults include the recommended
#: retention; a config key missing from an older file takes its format's default (`config.FORMAT_TRAINING_DEFAULTS`).
#: 5: the recommended KL on every second step at 0.2 (format 4: every step at 0.1). Formats 1 (flat) to 4 are read
#: (and written as 5).
FORMAT_VERSION = 5
#: The repo a dry run of `push` shows its plan for when the campaign names none.
PLACEHOLDER_REPO = "your-name/your-adapters"
#: Characters of general reference text (`peft_selective.evaluation.preference.reference_text`) per calibration text of geometry_projected.
_CALIBRATION_CHUNK = 1000


class CampaignError(RuntimeError):
    """The campaign directory is missing, corrupted, or asked to do something out of order."""


# ------------------------------------------------------------------------------------------------- month timing
#: The phases of `run_month` timed in the month's `timing_s` (wall seconds of the run that finished the month), in
#: order: checksums checked; the month's data read, checked, split and written; the model loaded (base + done months'
#: adapters); the base evaluated (month 0, the first month only); what is measured before the month (the base's
#: log-probs of its test pairs, the behaviour of the model before it); the trainer built (rehearsal mix, boundary
#: answers, tokenization); the geometry calibration; training (from the continuations of the anchors its steps draw);
#: the retention dial; the evaluation after the month (and its health check); the month finished (adapter saved, the
#: buffer rows' reference log-probs, the Fisher); the card and the state written. `total` is the whole call.
MONTH_PHASES = (
    "verify", "data", "load_model", "baseline_evaluation", "before_month", "trainer", "calibration", "training",
    "retention_dial", "evaluation", "finish", "card",
)  # fmt: skip
#: The phases whose work only measures the month (what `month_time_split` calls its evaluation).
EVALUATION_PHASES = ("before_month", "evaluation")


class _PhaseClock:
    """Wall seconds of named phases, summed per name (a phase may run in several pieces)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def record(self) -> dict[str, float]:
        """The phases in `MONTH_PHASES` order, and `total`, rounded to 10 ms."""
        timing = {name: round(self.seconds[name], 2) for name in MONTH_PHASES if name in self.seconds}
        timing["total"] = round(time.perf_counter() - self.started, 2)
        return timing


def month_time_split(timing: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """From a month's `timing_s`: `training` (the `training` phase), `evaluation` (the `EVALUATION_PHASES`: what the
    month spends measuring itself, every month), `baseline_evaluation` (month 0's, once per campaign; 0 after the
    first month) and `total`; None for a month recorded without timing (by an older peft-selective)."""
    if not timing:
        return None
    return {
        "training": timing.get("training", 0.0),
        "evaluation": round(sum(timing.get(name, 0.0) for name in EVALUATION_PHASES), 2),
        "baseline_evaluation": timing.get("baseline_evaluation", 0.0),
        "total": timing.get("total", 0.0),
    }


# ------------------------------------------------------------------------------------------------- retention dial
#: Fewest training rows held out to choose the retention scale ("auto").
MIN_VALIDATION_ROWS = 4


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


_sha256 = sha256_file


def _json_digest(value: Any) -> str:
    """The SHA-256 of a JSON value as stored (a JSON round trip first: tuples, int keys), keys sorted."""
    stored = json.loads(json.dumps(value, allow_nan=True))
    return hashlib.sha256(json.dumps(stored, sort_keys=True, allow_nan=True).encode("utf-8")).hexdigest()


def _adapter_file_mismatch(model: PeftModel, adapter_name: str, weights: Path) -> list[str]:
    """How the tensors of a loaded adapter's file differ from those of the adapter PEFT built from its config
    (missing, unexpected, other shape); empty when they agree. Reads the file's header only."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from ..tuners.selective.model import rename_legacy_keys

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    with safe_open(str(weights), framework="pt") as handle:
        saved = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    saved = rename_legacy_keys(saved)  # peft-selective 0.1.0 names, renamed the same way on load
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shared = sorted(expected.keys() & saved.keys())
    shapes = [f"{k} {list(saved[k])} (expected {list(expected[k])})" for k in shared if saved[k] != expected[k]]
    problems = []
    for what, keys in (("missing tensors", missing), ("unexpected tensors", unexpected), ("other shapes", shapes)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}")
    return problems


def _chunks(text: str, size: int = _CALIBRATION_CHUNK) -> list[str]:
    pieces = (text[i : i + size].strip() for i in range(0, len(text), size))
    return [piece for piece in pieces if piece]


def _chat_text(tokenizer, row: dict[str, Any]) -> str:
    """A preference row's prompt + chosen answer as the model reads it (the chat template for conversations)."""
    prompt, chosen = row.get("prompt"), row["chosen"]
    if isinstance(chosen, list):  # conversational
        messages = list(prompt or []) + list(chosen)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(str(message.get("content", "")) for message in messages)
    return f"{prompt or ''}{chosen}"


def read_calibration_texts(path: Union[str, Path]) -> list[str]:
    """The user's calibration text for geometry_projected: a `.txt` file (paragraphs separated by blank lines) or a
    `.jsonl` file with a `"text"` string per line; texts longer than 1000 characters are cut into chunks (calibration
    reads at most `max_length` tokens of each). A clear error names a missing, unreadable, malformed or empty file."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"The calibration data {path} must be a .txt file or a .jsonl file with a 'text' field.")
    if not path.is_file():
        raise FileNotFoundError(f"The calibration data file {path} does not exist.")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the calibration data {path} as UTF-8 text: {error}") from error
    if path.suffix.lower() == ".txt":
        texts = [paragraph.strip() for paragraph in re.split(r"\n\s*\n", content)]
    else:
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error}).") from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {number}: expected an object with a 'text' string: {line[:200]}")
            texts.append(row["text"].strip())
    texts = [chunk for text in texts for chunk in _chunks(text)]
    if not texts:
        raise ValueError(f"The calibration data file {path} holds no text.")
    return texts


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CampaignError(
            f"{path} is corrupted ({error}); it is the campaign's {what}. Restore it from a backup, or start a new "
            "campaign with `continual-dpo init`."
        ) from error


def _load_config(path: Path, stored: Any, format_version: int) -> CampaignConfig:
    """The config stored in `path` (campaign.json of `format_version`): the nested form, or the flat one written by
    peft-selective 0.1/0.2 (`learning_rate`, `eval_batch_size`, ... at the top, `rank: 0` for full rank), migrated by
    [`CampaignConfig.from_dict`]; keys missing from an older file take the defaults of its format, not today's."""
    if not isinstance(stored, dict):
        raise CampaignError(f"{path} has no config mapping (got {stored!r:.100}).")
    known = {f.name for f in dataclasses.fields(CampaignConfig)} | set(FLAT_OPTIONS)
    unknown = sorted(set(stored) - known)
    if unknown:
        raise CampaignError(f"{path} has unknown config keys {unknown}: was it written by another version?")
    if stored.get("rank") == 0:  # peft-selective 0.1/0.2 wrote full rank as 0
        stored = {**stored, "rank": None}
    return CampaignConfig.from_dict(stored, format_version=format_version)


def _write_jsonl(path: Path, dataset: Dataset) -> None:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset)
    atomic_write(path, lines.encode("utf-8"))


#: Column added while a month's data is checked: where each row comes from (`"june.jsonl, line 4"`), so that an error
#: names the user's line, not a row of a shuffled split. Removed before anything is written or trained.
_SOURCE = "__source__"


def _read_jsonl(path: Path) -> Dataset:
    """A JSONL file's rows, each with its `_SOURCE` line; a clear error names an empty file or the first line that is
    not UTF-8, not JSON or not an object (or, when the rows cannot share one schema, the first malformed row's line).
    Every row's keys are columns, a row without one holding None there."""
    rows, lines = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: not UTF-8 ({error.reason} at byte {error.start} of the line): save the file "
                "as UTF-8."
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error}): {line[:200]}") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {number}: expected a JSON object with 'chosen' and 'rejected': {line[:200]}"
            )
        rows.append(row)
        lines.append(f"{path}, line {number}")
    if not rows:
        raise ValueError(f"{path} holds no rows: a month needs preference pairs, one JSON object per line.")
    columns = dict.fromkeys(key for row in rows for key in row)  # every row's keys (`from_list` keeps the first's)
    try:
        dataset = Dataset.from_dict({key: [row.get(key) for row in rows] for key in columns})
    except Exception as error:  # noqa: BLE001 - pyarrow raises many kinds on rows of different shapes
        chosen = next((row["chosen"] for row in rows if row.get("chosen") is not None), None)
        for row, where in zip(rows, lines):  # a DPO field of another type or format than the first row's: its line
            problem = preference_row_problem(row, isinstance(chosen, list))
            if problem:
                raise PreferenceDataError(f"{where}: {problem}. Fix or remove this row.") from None
        raise ValueError(
            f"{path}: the rows do not share one schema ({error}); give every line the same fields."
        ) from error
    return dataset.add_column(_SOURCE, lines)


def load_preference_data(source: Union[str, Path], split: str = "train") -> Dataset:
    """A preference dataset from a local `.jsonl` / `.json` / `.parquet` / `.csv` file or a Hub dataset name."""
    return _without_source(_load_with_source(source, split))


def _load_with_source(source: Union[str, Path, Dataset], split: str = "train") -> Dataset:
    """`load_preference_data` with the `_SOURCE` column: `file, line N` for JSONL, `file, record N` otherwise."""
    if isinstance(source, Dataset):
        return source.add_column(_SOURCE, [f"row {i} of the given Dataset" for i in range(len(source))])
    path = Path(source)
    formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix in formats:
        if not path.is_file():
            raise FileNotFoundError(f"Preference data file {path} does not exist.")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        try:
            dataset = load_dataset(formats[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds on a malformed file
            raise ValueError(f"Could not read {path} as {formats[path.suffix]}: {error}") from error
    elif path.exists():
        raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .parquet or .csv.")
    else:
        dataset = load_dataset(str(source), split=split)
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no rows: a month needs preference pairs.")
    return dataset.add_column(_SOURCE, [f"{source}, record {i + 1}" for i in range(len(dataset))])


def _without_source(dataset: Dataset) -> Dataset:
    return dataset.remove_columns(_SOURCE) if _SOURCE in dataset.column_names else dataset


def _prompt_tokens(tokenizer, row: dict[str, Any]) -> Optional[int]:
    """The tokens of a row's prompt as TRL's DPO tokenization counts them (the prompt's tokens shared with prompt +
    chosen and prompt + rejected), or None for an implicit-prompt row."""
    prompt = row.get("prompt")
    if prompt is None:
        return None

    def ids(value, **kwargs) -> list[int]:
        if isinstance(row["chosen"], list):  # conversational
            out = tokenizer.apply_chat_template(value, tokenize=True, **kwargs)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return list(tokenizer(value)["input_ids"])

    prompt_ids = ids(prompt, add_generation_prompt=True)
    shared = len(prompt_ids)
    for answer in (row["chosen"], row["rejected"]):
        full = ids(prompt + answer)
        shared = min(
            shared,
            next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full))),
        )
    return shared


def _base_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config.get_text_config()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {key: getattr(config, key, None) for key in keys}


#: Elements of every base-model tensor hashed by its fingerprint (evenly spaced, the first and the last included).
FINGERPRINT_ELEMENTS = 64


def _weights_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the base model's weights: SHA-256 over every tensor's name, shape, dtype and
    `FINGERPRINT_ELEMENTS` evenly spaced elements. Other weights (another checkpoint, a fine-tune written over the
    files) change nearly every element, so the digest; an edit confined to elements that are not sampled is not seen."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        count = flat.numel()
        # integer positions: a float32 linspace rounds the last one past the end of a tensor of 28M elements
        steps = min(count, FINGERPRINT_ELEMENTS)
        index = torch.arange(steps, dtype=torch.int64) * max(count - 1, 0) // max(steps - 1, 1)
        sample = flat[index.to(flat.device)].cpu()
        if sample.is_floating_point():
            sample = sample.to(torch.float64)  # bfloat16 has no numpy type; float64 holds every float exactly
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _base_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The base model's shapes (from its config) and `weights_sha256` (`_weights_digest`)."""
    config = model.config.get_text_config()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {**{key: getattr(config, key, None) for key in keys}, "weights_sha256": _weights_digest(model)}


#: The Hub model the bundled GGUF (`peft_selective.demo.embedded`) is a Q4_1 conversion of (by its file name and its
#: GGUF metadata: organization HuggingFaceTB, SmolLM2 135M).
EMBEDDED_CONVERTED_FROM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _base_precision(model: torch.nn.Module) -> str:
    """The precision the base was loaded in, read from the model: bitsandbytes' 4-bit compute dtype and the dtype of
    the unquantized weights depend on the machine and the transformers version, not on the config alone."""
    floating = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    others = "/".join(floating) or "none"
    quantization = getattr(model.config, "quantization_config", None)
    if getattr(model, "is_loaded_in_4bit", False):
        compute = str(quantization.bnb_4bit_compute_dtype).removeprefix("torch.")
        return (
            f"4-bit {quantization.bnb_4bit_quant_type} (bitsandbytes), compute dtype {compute}; other weights {others}"
        )
    if getattr(model, "is_loaded_in_8bit", False):
        return f"8-bit LLM.int8 (bitsandbytes); other weights {others}"
    return others


def _base_source(base_model: str, model: torch.nn.Module) -> dict[str, Any]:
    """Where the loaded base's weights come from, for the model card: the bundled GGUF file (the weights trained on are
    its dequantized Q4_1 ones, not the Hub checkpoint's), a local folder, or a Hub id at the cached commit."""
    if base_model == EMBEDDED:
        from ..demo.embedded import _read_marker, embedded_gguf_path

        marker = _read_marker(Path(model.name_or_path)) or {}  # what the converted folder was converted from
        package = [str(marker[k]) for k in ("source_package", "source_package_version") if marker.get(k)]
        try:
            gguf = str(embedded_gguf_path())
        except (ImportError, FileNotFoundError):  # the converted cache outlives an uninstalled package
            gguf = marker.get("source_file")
        return {
            "kind": "embedded",
            "path": gguf,
            "gguf_file": marker.get("source_file"),
            "source_package": " ".join(package) or None,
            "converted_from": EMBEDDED_CONVERTED_FROM,
        }
    if Path(base_model).is_dir():
        return {"kind": "local", "path": str(Path(base_model).resolve())}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base_model, "config.json")  # .../snapshots/<commit>/config.json: what was loaded
    return {
        "kind": "hub",
        "path": base_model,
        "revision": Path(cached).parent.name if isinstance(cached, str) else None,
    }


# ------------------------------------------------------------------------------------------------- knowledge pool
_ITEM_KEYS = ("question", "answer", "distractors", "aliases", "entity")


def _item_dict(item: Any) -> dict[str, Any]:
    return {
        "question": item.question,
        "answer": item.answer,
        "distractors": list(item.distractors),
        "aliases": list(item.aliases),
        "entity": item.entity,
    }


def read_knowledge_items(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The user's knowledge items from a JSONL file: one `{"question", "answer", "distractors": [...], "aliases"?:
    [...], "entity"?}` object per line; a clear error names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The knowledge data file {path} does not exist.")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error}).") from error
        problem = None
        if not isinstance(row, dict):
            problem = "expected an object"
        elif unknown := sorted(set(row) - set(_ITEM_KEYS)):
            problem = f"unknown keys {unknown} (allowed: {list(_ITEM_KEYS)})"
        elif not all(isinstance(row.get(key), str) and row[key].strip() for key in ("question", "answer")):
            problem = "`question` and `answer` must be non-empty strings"
        elif not (isinstance(row.get("distractors"), list) and row["distractors"]):
            problem = "`distractors` must be a non-empty list of wrong answers (multiple choice needs them)"
        elif not all(isinstance(x, str) and x.strip() for x in row["distractors"] + list(row.get("aliases") or [])):
            problem = "`distractors` and `aliases` must hold non-empty strings"
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}: {line[:200]}")
        items.append(
            {
                "question": row["question"],
                "answer": row["answer"],
                "distractors": list(row["distractors"]),
                "aliases": list(row.get("aliases") or []),
                "entity": row.get("entity"),
            }
        )
    if not items:
        raise ValueError(f"The knowledge data file {path} holds no item.")
    return items


def _overlapping(items: list[dict[str, Any]], collections: list[Any]) -> dict[int, str]:
    """Index -> the `check_no_overlap` message, for the items that overlap one of `collections` (checked in chunks,
    then one by one inside a chunk that overlaps)."""
    from ..evaluation import check_no_overlap

    found: dict[int, str] = {}
    chunk = 32
    for start in range(0, len(items), chunk):
        try:
            check_no_overlap(items[start : start + chunk], *collections)
            continue
        except ValueError:
            pass
        for index in range(start, min(start + chunk, len(items))):
            try:
                check_no_overlap([items[index]], *collections)
            except ValueError as error:
                found[index] = str(error)
    return found


def _knowledge_pool(config: CampaignConfig) -> dict[str, Any]:
    """The candidate knowledge items stored at `init` (`campaign.json` "knowledge_pool"): the user's
    (`knowledge_data`) or the first `knowledge_questions` of `peft_selective.demo.months.knowledge_items`; the items that overlap
    the KL anchor prompts are refused (the user's) or excluded (the built-in ones) right away."""
    from ..continual.anchors import general_anchor_prompts
    from ..demo.months import knowledge_items

    if config.knowledge_data:
        items, source = read_knowledge_items(config.knowledge_data), str(config.knowledge_data)
    else:
        items, source = [_item_dict(item) for item in knowledge_items(n=None, seed=config.seed)], "builtin"
        items = items[: config.knowledge_questions]
    anchors = _overlapping(items, [general_anchor_prompts()])
    if anchors and source != "builtin":
        first = next(iter(anchors.values()))
        raise CampaignError(f"Your knowledge items overlap the KL anchor prompts of the training: {first}")
    return {"source": source, "items": items, "excluded": {str(index): "kl-anchors" for index in sorted(anchors)}}


class _LoggedProgress(ProgressCallback):
    """The Trainer's progress bar, its per-step metrics sent to the log (DEBUG: `continual-dpo --verbose`) rather
    than printed between the bars. `report_to` receives them as before."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(f"Training {args.adapter_name}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            logger.debug("Step %d: %s", state.global_step, shown)


# ------------------------------------------------------------------------------------------------- the campaign
def _exclusive(method):
    """Make `method` a command of the campaign that holds its lock from start to end ([`Campaign.lock`])."""

    @functools.wraps(method)
    def command(self, *args, **kwargs):
        month = f" {args[0]}" if args and isinstance(args[0], str) else ""
        with self.lock(f"{method.__name__}{month}"):
            return method(self, *args, **kwargs)

    return command


class Campaign:
    """A campaign directory (see the module docstring). Open one with `Campaign(dir)`, create one with
    [`Campaign.init`]."""

    def __init__(self, directory: Union[str, Path]) -> None:
        self.directory = Path(directory)
        self.layout = CampaignLayout(self.directory)
        path = self.layout.campaign_file
        if not path.is_file():
            raise CampaignError(
                f"No campaign in {self.directory} ({layout.CAMPAIGN_FILE} missing): create one with `init`."
            )
        state = _read_json(path, "state")
        if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
            raise CampaignError(f"{path} is not a campaign state file (no format_version / config).")
        if state["format_version"] > FORMAT_VERSION:
            raise CampaignError(
                f"{path} has format {state['format_version']}; this peft-selective reads up to {FORMAT_VERSION}: "
                "upgrade the library."
            )
        recorded = state.get("config_sha256")
        if recorded is not None and recorded != _json_digest(state["config"]):
            raise CampaignError(
                f"The config in {path} changed since the campaign wrote it (SHA-256 mismatch): a campaign's options "
                "are fixed at `init`, its months were trained with them. Restore the file from a backup, or start a new "
                "campaign with the options you want."
            )
        self.config = _load_config(path, state["config"], state["format_version"])
        for month in state.get("months", []):
            try:  # month names become folder names: a crafted one could point outside the campaign directory
                check_month_name(month.get("name") if isinstance(month, dict) else month, f" in {path}")
            except ValueError as error:
                raise CampaignError(f"{error} Was the file edited by hand? Restore it from a backup.") from None
        self.state = state
        evaluations = self.layout.evaluations_file
        self.evaluations: dict[str, Any] = (
            _read_json(evaluations, "evaluation history") if evaluations.exists() else {}
        )

    @classmethod
    def init(cls, directory: Union[str, Path], config: CampaignConfig, overwrite: bool = False) -> Campaign:
        directory = Path(directory)
        paths = CampaignLayout(directory)
        if paths.campaign_file.exists() and not overwrite:
            raise CampaignError(
                f"{directory} already holds a campaign; pick another directory, or pass --overwrite to start over "
                "(its months, evaluations, adapters, cards, rehearsal buffer and Fisher are deleted)."
            )
        pool = _knowledge_pool(config)  # before anything is written: a bad --knowledge_data file leaves no trace
        with DirectoryLock(directory, "init", "campaign directory"):  # not while a command runs, nor two inits
            if paths.campaign_file.exists() and not overwrite:
                raise CampaignError(
                    f"{directory} already holds a campaign (created meanwhile); pick another directory."
                )
            if overwrite:  # the old state must not leak into the new campaign (its base evaluation, Fisher, buffer...)
                for path in [paths.evaluations_file] + [
                    paths.folder(name) for name in (*layout.MONTH_FOLDERS, *layout.SHARED_FOLDERS)
                ]:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    elif path.exists() or path.is_symlink():
                        path.unlink()
            state = {
                "format_version": FORMAT_VERSION,
                "created_at": _now(),
                "config": config.to_dict(),
                "base_fingerprint": None,
                "knowledge_pool": pool,
                "months": [],
            }
            atomic_write_json(CampaignLayout(directory).campaign_file, state)
        return cls(directory)

    # ---------------------------------------------------------------------------------------------- state
    @property
    def months(self) -> list[dict[str, Any]]:
        return self.state["months"]

    @property
    def done_months(self) -> list[str]:
        return [month["name"] for month in self.months if month["status"] == "done"]

    def month(self, name: str) -> Optional[dict[str, Any]]:
        return next((month for month in self.months if month["name"] == name), None)

    # Under `accelerate launch` every process runs the campaign; only the main one writes, and evaluates.
    @property
    def _is_main(self) -> bool:
        return PartialState().is_main_process

    def _barrier(self) -> None:
        PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def lock(self, command: str):
        """Hold the campaign directory's exclusive lock (`peft_selective.utils.lock`) for `command`, and re-read the
        state under it, so that nothing another command committed before is overwritten. The main process takes it;
        when another command holds it, every process raises `DirectoryLockedError` naming the holder. Reentrant."""
        depth = getattr(self, "_lock_depth", 0)
        lock = DirectoryLock(self.directory, command, "campaign directory")
        refusal = None
        if self._is_main:
            try:
                lock.acquire()
            except DirectoryLockedError as error:
                refusal = str(error)
        (refusal,) = broadcast_object_list([refusal])  # every process goes on, or stops, together
        if refusal is not None:
            raise DirectoryLockedError(refusal)
        try:
            if depth == 0:  # the outermost command: the state as the last command left it
                vars(self).update(vars(type(self)(self.directory)))
            self._lock_depth = depth + 1
            yield self
        finally:
            self._lock_depth = depth
            if self._is_main:
                lock.release()

    def _save_state(self) -> None:
        if self._is_main:
            if self.state["format_version"] < FORMAT_VERSION:  # an older campaign.json: written in today's form
                self.state.update(format_version=FORMAT_VERSION, config=self.config.to_dict())
            self.state["config_sha256"] = _json_digest(self.state["config"])
            atomic_write_json(self.layout.campaign_file, self.state)

    def _save_evaluations(self) -> None:
        if self._is_main:
            atomic_write_json(self.layout.evaluations_file, self.evaluations)

    # ---------------------------------------------------------------------------------------------- checksums
    def _relative(self, path: Path) -> str:
        return path.relative_to(self.directory).as_posix()

    def _record(self, entry: dict[str, Any], *paths: Path) -> None:
        """Record the SHA-256 of `paths` (those that exist) in the month's `"files"`."""
        files = entry.setdefault("files", {})
        for path in paths:
            if path.is_file():
                files[self._relative(path)] = _sha256(path)

    def _check_file(self, relative: str, recorded: str, owner: str) -> None:
        path = self.directory / relative
        where = self.directory
        for part in PurePosixPath(relative).parts:  # a link would make the campaign read (or write) elsewhere
            where = where / part
            if where.is_symlink():
                raise CampaignError(
                    f"{relative} ({owner}) is a symbolic link: the campaign only trusts regular files inside its "
                    "directory. Put the file itself there (restore it from a backup)."
                )
        if not path.is_file():
            raise CampaignError(
                f"{relative} ({owner}) is missing. Restore it from a backup; without one, rerun the campaign from "
                "that month in a new directory."
            )
        if _sha256(path) != recorded:
            raise CampaignError(
                f"{relative} ({owner}) changed since the campaign wrote it (SHA-256 mismatch): the file is corrupted "
                "or was edited, and results built on it would silently differ. Restore it from a backup; without "
                "one, rerun the campaign from that month in a new directory."
            )

    def _verify_month(self, name: str, folders: Sequence[str] = (layout.DATA_DIR, layout.ADAPTERS_DIR)) -> None:
        """Check the month's recorded files in `folders` (cards are outputs: `report` rewrites them, `push` checks
        them). A format-2 month only recorded its adapter weights (`adapter_sha256`)."""
        entry = self.month(name)
        files = entry.get("files") or {}
        weights = self._relative(self.layout.adapter_weights(name))
        if weights not in files and entry.get("adapter_sha256") and layout.ADAPTERS_DIR in folders:
            self._check_file(weights, entry["adapter_sha256"], f"month {name!r}'s adapter")  # a format-2 month
        for relative, recorded in files.items():
            if PurePosixPath(relative).parts[0] in folders:
                self._check_file(relative, recorded, f"month {name!r}")

    def verify(self, skip_evaluations: Sequence[str] = ()) -> None:
        """Check every recorded checksum the commands rely on: each done month's data and adapter files and the
        evaluations (but `skip_evaluations`, about to be measured again). Raises `CampaignError` naming the file."""
        for name in self.done_months:
            self._verify_month(name)
        recorded = {k: v for k, v in self.state.get("evaluations_sha256", {}).items() if k not in skip_evaluations}
        file = layout.EVALUATIONS_FILE
        if recorded and not self.layout.evaluations_file.is_file():
            raise CampaignError(
                f"{file} is missing: the evaluations of {', '.join(recorded)} are lost. Restore it from a backup; "
                "`continual-dpo eval --month NAME` measures a done month again, but the base's (month-0, measured "
                "before the first month) cannot be: without a backup, start over with `init --overwrite`."
            )
        for key, digest in recorded.items():
            if key not in self.evaluations:
                raise CampaignError(
                    f"{file} has no entry {key!r} (recorded in {layout.CAMPAIGN_FILE}): restore the file from a "
                    "backup, or measure the month again with `continual-dpo eval --month NAME`."
                )
            if _json_digest(self.evaluations[key]) != digest:
                raise CampaignError(
                    f"{file}: the entry {key!r} changed since the campaign wrote it (SHA-256 mismatch). Restore the "
                    "file from a backup, or measure the month again with `continual-dpo eval --month NAME`."
                )

    def _record_evaluation(self, key: str) -> None:
        self.state.setdefault("evaluations_sha256", {})[key] = _json_digest(self.evaluations[key])

    def _shared_files(self) -> dict[str, str]:
        """SHA-256 of every file of the rehearsal buffer and the Fisher store (temp files, named `.*`, left out)."""
        found = {}
        for folder in (self.layout.buffer, self.layout.fisher):
            if folder.is_dir():
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and not path.name.startswith("."):
                        found[self._relative(path)] = _sha256(path)
        return found

    def _verify_shared(self) -> None:
        """The buffer and the Fisher as the last done month left them (checked before a new month trains on them)."""
        for relative, recorded in self.state.get("shared_files", {}).items():
            self._check_file(
                relative, recorded, f"written by month {self.done_months[-1]!r}" if self.done_months else ""
            )

    # ---------------------------------------------------------------------------------------------- models
    def load_tokenizer(self):
        """The base model's tokenizer alone (to check a month's data before anything is loaded or written)."""
        if self.config.base_model == EMBEDDED:
            from ..demo.embedded import embedded_model_path

            return AutoTokenizer.from_pretrained(embedded_model_path(), local_files_only=True)
        return AutoTokenizer.from_pretrained(self.config.base_model)

    def load_base(self):
        """The base model (quantized as configured) and its tokenizer; its fingerprint must match the campaign's."""
        config = self.config
        if config.base_model == EMBEDDED:
            from ..demo.embedded import load_embedded_model

            model, tokenizer = load_embedded_model(quantization=config.quantization)
        else:
            kwargs: dict[str, Any] = {}
            if config.quantization == "4bit":
                compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
                )
            elif config.quantization == "8bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            if config.quantization and torch.cuda.is_available():  # a quantized base goes to this process's GPU
                kwargs["device_map"] = {"": PartialState().local_process_index}
            model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.base_model)
        fingerprint = _base_fingerprint(model)
        self._loaded_fingerprint = fingerprint
        # what the month's card states as the base trained on (recorded in the month's entry)
        self._loaded_base = {**_base_source(config.base_model, model), "precision": _base_precision(model)}
        recorded = self.state.get("base_fingerprint")
        shapes = {key: value for key, value in fingerprint.items() if key != "weights_sha256"}
        if recorded is not None and {k: v for k, v in recorded.items() if k != "weights_sha256"} != shapes:
            raise CampaignError(
                f"The base model {config.base_model!r} does not match the one this campaign was trained on "
                f"(recorded {recorded}, loaded {fingerprint})."
            )
        if recorded is not None and recorded.get("weights_sha256") not in (None, fingerprint["weights_sha256"]):
            raise CampaignError(
                f"The weights of the base model {config.base_model!r} differ from those this campaign was trained on "
                f"(same shapes, but a sample of {FINGERPRINT_ELEMENTS} elements per tensor hashes differently): were "
                "they replaced or fine-tuned in place? Load the original weights, or start a new campaign."
            )
        if recorded is not None and "weights_sha256" not in recorded:  # format 2: from now on, the weights too
            logger.info("Recording the base model's weights fingerprint (campaign.json of format 2 had none).")
            recorded["weights_sha256"] = fingerprint["weights_sha256"]
        # Before the month-0 (or any) evaluation: on AVX512-BF16 CPUs bitsandbytes would repack the 4-bit weights,
        # cutting the next month's gradient and changing the evaluation's kernels (see `peft_selective.quantization`).
        keep_4bit_layers_trainable(model)
        return model.eval(), tokenizer

    def load_model(self, upto: Optional[str] = None):
        """The model after month `upto` (default: the last done month): the base with the adapters of every month up
        to it, all active and frozen, each checked against its recorded SHA-256. Returns `(model, tokenizer)`."""
        done = self.done_months
        if upto is not None:
            if upto not in done:
                raise CampaignError(f"Month {upto!r} is not done (done: {done}).")
            done = done[: done.index(upto) + 1]
        model, tokenizer = self.load_base()
        for index, name in enumerate(done):
            folder = self.layout.adapter(name)
            weights = self.layout.adapter_weights(name)
            if not weights.is_file():
                raise CampaignError(f"The adapter of month {name!r} is missing ({weights}).")
            recorded = self.month(name).get("adapter_sha256")
            if recorded and _sha256(weights) != recorded:
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) changed since it was trained (SHA-256 mismatch): the "
                    "file is corrupted or was replaced. Restore it, or rerun the campaign from that month."
                )
            self._verify_month(name, (layout.ADAPTERS_DIR,))  # adapter_config.json too: its alpha scales the update
            try:
                if index == 0:
                    model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(folder, adapter_name=name, is_trainable=False)
            except RuntimeError as error:  # torch's load_state_dict: "size mismatch for ..."
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) does not fit the model its adapter_config.json "
                    f"describes: restore the month's adapter folder, or rerun the campaign from that month. {error}"
                ) from error
            # PEFT only warns about a missing tensor (the update would silently start from its init) and ignores an
            # unexpected one: the file must hold exactly the adapter's tensors, at the adapter's shapes.
            problems = _adapter_file_mismatch(model, name, weights)
            if problems:
                raise CampaignError(
                    f"The adapter of month {name!r} ({weights}) does not match the adapter its adapter_config.json "
                    f"describes: {'; '.join(problems)}. The file is incomplete or belongs to another run: restore the "
                    "month's adapter folder, or rerun the campaign from that month."
                )
        if done:
            model.base_model.set_adapter(done)
            model.base_model.set_requires_grad(done, requires_grad=False)
        return model, tokenizer

    # ---------------------------------------------------------------------------------------------- data
    def _month_data(
        self,
        name: str,
        data: Optional[Union[str, Path, Dataset]],
        test_data,
        test_fraction: float,
        validation_fraction: Optional[float] = None,
    ) -> tuple[dict[str, Dataset], dict[str, Any]]:
        """The month's `train` and `test` splits (and `validation`, held out of the training rows with
        `validation_fraction`, for the retention dial): split, checked and written for a new month, read back when
        resuming. Also returns what the month's `data` record says of the test split's cap."""
        folder = self.layout.data(name)
        entry = self.month(name)
        if entry is not None:  # resuming: the month's data is the stored one
            self._verify_month(name, (layout.DATA_DIR,))
            has_validation = self.layout.split(name, "validation").is_file()
            names = ("train", "test", "validation") if has_validation else ("train", "test")
            splits = {split: Dataset.from_json(str(self.layout.split(name, split))) for split in names}
            if data is not None:
                new, _ = self._split(data, test_data, test_fraction)
                if "validation" in splits:  # the same rows held out again (seeded)
                    new.update(self._hold_out(name, new["train"], rows=len(splits["validation"])))
                new = {split: _without_source(dataset) for split, dataset in new.items()}
                if _digest(new["train"]) != entry["data"]["train_sha256"]:
                    raise CampaignError(
                        f"Month {name!r} was started with other training data ({entry['data']['source']}); rerun it "
                        "without --data (or with the same data) to resume, or drop it with `continual-dpo abandon "
                        f"{name} --campaign_dir {self.directory}` and run it again with the new data."
                    )
            return splits, {}
        if data is None:
            raise CampaignError(f"Month {name!r} is new: pass its preference data (--data).")
        try:
            splits, sampling = self._split(data, test_data, test_fraction)
        except (OSError, ValueError) as error:
            raise type(error)(f"Month {name!r} was not registered: {error}") from error
        self._check_same_format(name, data, splits["train"])
        if validation_fraction is not None:
            splits.update(self._hold_out(name, splits["train"], fraction=validation_fraction))
        self._check_prompt_lengths(name, splits)
        splits = {split: _without_source(dataset) for split, dataset in splits.items()}
        pool = self.knowledge_pool
        if pool["source"] != "builtin":  # the user's own items must not be about what the month trains on
            found = _overlapping(pool["items"], [list(splits["train"]), list(splits["test"])])
            if found:
                shown = "; ".join(found[i] for i in sorted(found)[:3])
                raise CampaignError(
                    f"Month {name!r} was not registered: {len(found)} of your knowledge items ({pool['source']}) "
                    f"overlap its training or test prompts, so the knowledge probe would measure memorised training "
                    f"data. Remove them from the month's data or start a campaign with other items. {shown}"
                )
        if self._is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for split, dataset in splits.items():
                _write_jsonl(self.layout.split(name, split), dataset)
        self._barrier()
        return splits, sampling

    def _check_same_format(self, name: str, data, train: Dataset) -> None:
        """Refuse a new month whose rows are not written as the last done month's (conversational or plain text, the
        same columns): every month, and the rehearsed rows of the earlier ones, are trained and scored together."""
        if not self.done_months:
            return
        previous = self.done_months[-1]
        with self.layout.split(previous, "train").open(encoding="utf-8") as file:
            stored = json.loads(file.readline())
        given = {column: train[0][column] for column in train.column_names if column != _SOURCE}
        ours, theirs = _row_format(given), _row_format(stored)
        if ours == theirs:
            return
        source = data if isinstance(data, (str, Path)) else "the Dataset"
        missing, extra = sorted(set(stored) - set(given)), sorted(set(given) - set(stored))
        fix = (
            f"write its rows as month {previous!r}'s ({json.dumps(stored, ensure_ascii=False)[:200]})"
            if ours[0] != theirs[0]
            else "give it the same columns"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (not in {previous!r}: {', '.join(extra)})" if extra else "")
        )
        raise CampaignError(
            f"Month {name!r} was not registered: its data ({source}) is {ours[0]} with columns {', '.join(ours[1])}, "
            f"but month {previous!r}'s is {theirs[0]} with columns {', '.join(theirs[1])}. The months and their "
            f"rehearsed rows are trained together in one format: {fix}, or start a new campaign for this format."
        )

    def _split(self, data, test_data, test_fraction: float) -> tuple[dict[str, Dataset], dict[str, Any]]:
        """The train and test splits, with their `_SOURCE` column, every row checked; the test split capped at
        `max_test_rows` (a seeded sample: every evaluation of every later month scores it, by generation)."""
        train = _load_with_source(data)
        validate_preference_dataset(train, "train", row_names=train[_SOURCE])
        if test_data is not None:
            test = _load_with_source(test_data)
        else:
            if not 0 < test_fraction < 1 or len(train) < 2:
                raise ValueError(
                    f"Cannot hold out a test split (test_fraction={test_fraction}, {len(train)} rows): pass test data."
                )
            parts = train.train_test_split(test_size=test_fraction, seed=self.config.seed)
            train, test = parts["train"], parts["test"]
        validate_preference_dataset(test, "test", row_names=test[_SOURCE])
        sampling: dict[str, Any] = {}
        cap = self.config.max_test_rows
        if cap is not None and len(test) > cap:
            sampling = {
                "test_rows_given": len(test),
                "test_sampled": f"{cap} of {len(test)} rows, sampled with seed {self.config.seed} (max_test_rows)",
            }
            logger.warning(
                "The test split has %d rows: %d are kept, sampled with seed %d (max_test_rows; every later evaluation "
                "scores them).",
                len(test),
                cap,
                self.config.seed,
            )
            test = test.shuffle(seed=self.config.seed).select(range(cap))
        return {"train": train, "test": test}, sampling

    def _check_prompt_lengths(self, name: str, splits: dict[str, Dataset]) -> None:
        """Refuse the month (before it is registered) when a prompt fills `max_length`: a training row would leave no
        answer to train on, a test row would be scored as wrong forever. Names the rows by their line in the user's
        file. Training rows may be dropped instead with the campaign's `drop_long_prompts` (the trainer logs them)."""
        training = self.config.training
        max_length = training.get("max_length")
        if max_length is None or training.get("truncation_mode", "keep_start") != "keep_start":
            return
        tokenizer = self.load_tokenizer()
        long = []
        checked = {
            split: dataset
            for split, dataset in splits.items()
            if split == "test" or not training.get("drop_long_prompts")
        }
        with tqdm(total=sum(map(len, checked.values())), desc=f"Checking {name}'s prompt lengths") as progress:
            for split, dataset in checked.items():
                for row in dataset:
                    tokens = _prompt_tokens(tokenizer, row)
                    if tokens is not None and tokens >= max_length:
                        long.append(f"{row[_SOURCE]} ({split}, {tokens} tokens)")
                    progress.update()
        if long:
            shown = "; ".join(long[:10]) + (f"; and {len(long) - 10} more" if len(long) > 10 else "")
            raise CampaignError(
                f"Month {name!r} was not registered: {len(long)} row(s) have a prompt of at least max_length="
                f"{max_length} tokens (the campaign's, set at `init`), leaving no answer to train on or to score: "
                f"{shown}. Shorten or remove these rows, then run the month again"
                + (
                    "; training rows may instead be dropped (and counted) by a campaign made with "
                    "`init --drop_long_prompts`."
                    if any("(test," not in row for row in long)
                    else "."
                )
            )

    def _hold_out(
        self, name: str, train: Dataset, fraction: Optional[float] = None, rows: Optional[int] = None
    ) -> dict[str, Dataset]:
        """Hold `rows` (or `fraction`, at least `MIN_VALIDATION_ROWS`) of the month's training rows out of training,
        seeded: the rows on which the retention dial is chosen. They come from the training split, so they are never
        test rows."""
        if rows is None:
            rows = max(MIN_VALIDATION_ROWS, round(fraction * len(train)))
        if len(train) - rows < 1:
            raise CampaignError(
                f"Month {name!r} was not registered: its {len(train)} training rows are too few to hold out {rows} for "
                "retention_scale='auto' (at least 4): pass more data, or a fixed retention_scale."
            )
        parts = train.train_test_split(test_size=rows, seed=self.config.seed)
        return {"train": parts["train"], "validation": parts["test"]}

    # ---------------------------------------------------------------------------------------------- knowledge & checks
    @property
    def knowledge_pool(self) -> dict[str, Any]:
        """`{"source", "items", "excluded": {index: month or "kl-anchors"}}`: the candidate knowledge items stored at
        `init` and those excluded so far (they overlap a month's prompts or the KL anchors)."""
        if "knowledge_pool" not in self.state:  # a campaign from before the pool: built now, the done months excluded
            pool = _knowledge_pool(self.config)
            for month in self.months:
                if self.layout.split(month["name"], "train").is_file():
                    rows = [Dataset.from_json(str(self.layout.split(month["name"], s))) for s in ("train", "test")]
                    self._exclude(pool, month["name"], [list(rows[0]), list(rows[1])])
            self.state["knowledge_pool"] = pool
            self.state.pop("knowledge_questions", None)
            self._save_state()
        return self.state["knowledge_pool"]

    @staticmethod
    def _exclude(pool: dict[str, Any], name: str, collections: list[Any]) -> int:
        candidates = [i for i in range(len(pool["items"])) if str(i) not in pool["excluded"]]
        found = _overlapping([pool["items"][i] for i in candidates], collections)
        for k in found:
            pool["excluded"][str(candidates[k])] = name
        return len(found)

    def knowledge_survivors(self) -> list[int]:
        """Indices of the pool items that overlap no month's prompts nor the KL anchors: every knowledge column of the
        report is re-aggregated on them."""
        pool = self.knowledge_pool
        return [i for i in range(len(pool["items"])) if str(i) not in pool["excluded"]]

    def _exact_indices(self) -> list[int]:
        return self.knowledge_survivors()[: self.config.evaluation.knowledge_exact_items]

    def month_spec(self, name: str) -> dict[str, Any]:
        """The month's behavioural spec for `peft_selective.evaluation.suites.month_tests`: its checks, bleed checks and fitted
        style signature (or why there is none)."""
        entry = self.month(name) or {}
        checks = entry.get("checks") or {}
        return {
            "checks": checks.get("checks") or [],
            "bleed_checks": checks.get("bleed_checks") or [],
            "style_signature": entry.get("style_signature"),
            "style_note": entry.get("style_note"),
        }

    def _before_behaviour(self, months: list[str]) -> dict[str, Any]:
        """Per month, the behavioural scores of the model before it on its held-out prompts (`before_behaviour.json`)."""
        found = {}
        for name in months:
            path = self.layout.before_behaviour(name)
            if path.is_file():
                found[name] = _read_json(path, "behaviour before the month")
        return found

    def _evaluate(
        self,
        model,
        tokenizer,
        months: list[str],
        show_progress: bool = False,
        timings: Optional[dict[str, float]] = None,
    ) -> dict[str, Any]:
        """`evaluate_model` with everything the campaign knows: the months' held-out pairs and specs, the base's
        log-probs and off-scope generations, the knowledge pool and its exact-match subset (`timings`: filled with the
        seconds of each suite)."""
        evaluation_config = self.config.evaluation_config()
        survivors = self.knowledge_survivors()
        if 0 < len(survivors) < evaluation_config.knowledge_min_items:
            logger.warning(
                "Only %d knowledge items survive the overlap checks (of %d): the knowledge intervals are wide.",
                len(survivors),
                len(self.knowledge_pool["items"]),
            )
        return evaluate_model(
            model,
            tokenizer,
            evaluation_config,
            test_sets=self.test_sets(months),
            reference_logps=self._reference_logps(months),
            knowledge_items=self.knowledge_pool["items"],
            show_progress=show_progress,
            month_specs={name: self.month_spec(name) for name in months},
            exact_indices=self._exact_indices(),
            base_offscope=self.evaluations.get(BASELINE, {}).get("offscope_generations"),
            timings=timings,
        )

    def test_sets(self, months: list[str]) -> dict[str, Dataset]:
        return {name: Dataset.from_json(str(self.layout.split(name, "test"))) for name in months}

    def _reference_logps(self, months: list[str]) -> dict[str, Any]:
        return {name: _read_json(self.layout.reference_logps(name), "reference") for name in months}

    # ---------------------------------------------------------------------------------------------- a month
    @_exclusive
    def run_month(
        self,
        name: str,
        data: Optional[Union[str, Path, Dataset]] = None,
        test_data: Optional[Union[str, Path, Dataset]] = None,
        test_fraction: float = 0.2,
        callbacks: Optional[list[TrainerCallback]] = None,
        keep_checkpoints: bool = False,
        health_check: Optional[bool] = None,
        max_perplexity_ratio: Optional[float] = None,
        max_kl_to_base: Optional[float] = None,
        checks: Optional[Union[str, list, dict]] = None,
        retention_scale: Optional[Union[str, float]] = None,
        retention_keep_learning: Optional[float] = None,
        retention_budget: Optional[float] = None,
        retention_scales: Optional[list[float]] = None,
        retention_layer_scales: Optional[str] = None,
        validation_fraction: Optional[float] = None,
        calibration_data: Optional[Union[str, Path]] = None,
    ) -> dict[str, Any]:
        """Train month `name` on top of the done months, then evaluate it, write its card and mark it done.

        `checks` declares what the month teaches, for its behavioural learning and bleed: a list of check specs
        (`peft_selective.evaluation.Check.from_spec`: regex / JSON schema / "module:function"), or `{"checks": [...],
        "bleed_checks": [...]}`, or a path / JSON / YAML string of either; default: the campaign config's `checks`
        entry for the month. They are validated, and the user's own knowledge items checked against the month's
        prompts, before the month is registered. A month without checks is scored by agreement, and its bleed by a
        style signature fitted on its chosen vs rejected answers.

        A month that was interrupted continues from its last checkpoint when run again (its data is the stored one);
        a done month is refused. Returns the month's entry of `campaign.json`.

        The model-health guard (`peft_selective.continual.health`; `health_check`, `max_perplexity_ratio`, `max_kl_to_base`: the
        campaign's, unless given here for this month) refuses a broken month with [`~peft_selective.continual.health.ModelHealthError`]:
        during training (non-finite loss, vanished gradients) or after its evaluation (non-finite metrics, perplexity
        or KL to the base over the limits). Its adapter, rehearsal rows and Fisher are only written once the
        evaluation passed; on a refusal the month's data, checkpoints and state entries are removed, so the directory
        is as it was before the month (byte for byte, for a month started by this call) and `campaign.json` still ends
        at the last good month. Fix the cause and run the month again, with its data. The measured values and limits
        are recorded in the month's entry (`health`).

        The retention dial (`retention_scale`, `retention_keep_learning`, `retention_budget`, `retention_scales`,
        `retention_layer_scales`, `validation_fraction`: the campaign's, unless given here; fixed when the month is
        registered, a resumed month keeps them) multiplies the month's update after training by a scale, baked into
        its adapter before the evaluation (`peft_selective.retention.scale_adapter`); `retention_layer_scales`
        multiplies it per group of blocks on top (e.g. `"0-9:0.5"`: the lower blocks kept closer). With `"auto"`,
        `validation_fraction` of the training rows are held out (`data/<month>/validation.jsonl`, never trained on,
        never test rows); after training, for each scale of the grid (scale 1 included) the month's adapter is
        scaled temporarily and measured: the
        learning gain = behavioural score on the validation rows (greedy answers scored by the month's checks, else
        agreement, as the evaluation does) minus that of the model before the month on the same rows, and the
        forgetting = KL to the month t−1 model (the earlier adapters only) on the generic prompts (nats per token).
        `peft_selective.retention.choose_scale` picks the scale: the most learning within `retention_budget` when
        set, else the least forgetting keeping `retention_keep_learning` of the full update's gain. The month's entry
        records `retention: {"scale", "rule", "curve": [{"scale", "score", "learning_gain", "forgetting"}], ...}`
        (with per-block factors also `layer_scales` and the effective `layer_factors`) and its card shows it.

        With `method="geometry_projected"` the month's adapter is calibrated before training
        (`peft_selective.calibrate`, with the last month's adapter as `previous_adapter`, so the subspace it protected
        stays protected) on: `calibration_reference_chars` of general reference text (`peft_selective.evaluation.preference.reference_text`),
        every earlier month's training chats (prompt + chosen answer, from `data/<month>/train.jsonl`) and the month's
        own `calibration_data` (a `.txt` file, paragraphs separated by blank lines, or a `.jsonl` file with a `"text"`
        field per line; checked before the month is registered, stored in `data/<month>/calibration.jsonl` so that a
        resumed month is calibrated the same). With `calibration_anchors` (default) it also protects the bleed region:
        the month t−1 model's answers to the retention KL's anchor prompts (general, same-shape variants of the
        month's prompts, earlier months'; `ContinualDPOTrainer.off_scope_anchors`), at the answer positions only, and
        every source weighs the same (`peft_selective.tuners.geometry.calibration.weighted_sources`); without it the
        texts weigh by their tokens. The month's entry records `calibration` (the texts per source, the
        calibration tokens, the tolerance, norm cap and the largest per-layer bound of the relative output change on
        the protected data); the full per-layer report is `adapters/<month>/geometry_report.json`. A calibration that
        fails (too little protected text for a layer) leaves no trace of the month, as a health refusal.

        The month's entry records where its time went, `timing_s`: the wall seconds of each phase of this call
        (`MONTH_PHASES`: data, the trainer's construction, training, evaluation, finish, card, ...) and `total`, and
        `evaluation_suites_s`, the seconds of each suite of its evaluation. A resumed month records the call that
        finished it (its training: the steps after the checkpoint).
        """
        clock = _PhaseClock()
        check_month_name(name)
        entry = self.month(name)
        if entry is not None and entry["status"] == "done":
            raise CampaignError(
                f"Month {name!r} is already done: `continual-dpo eval --month {name} --campaign_dir {self.directory}` "
                "shows its evaluation. To train on more data, run it as a new month, under a new name."
            )
        pending = [month["name"] for month in self.months if month["status"] != "done" and month["name"] != name]
        if pending:
            raise CampaignError(
                f"Month {pending[0]!r} was interrupted: run it again to finish it first, or drop it with "
                f"`continual-dpo abandon {pending[0]}`."
            )
        with clock.phase("verify"):
            self.verify()
            if entry is None:  # a resumed month may have updated them already (its Fisher, its rehearsal rows)
                self._verify_shared()
        overrides = dict(
            health_check=health_check, max_perplexity_ratio=max_perplexity_ratio, max_kl_to_base=max_kl_to_base
        )
        limits = {key: getattr(self.config, key) if value is None else value for key, value in overrides.items()}
        if checks is None and entry is None:
            checks = (self.config.checks or {}).get(name)
        try:
            month_checks = normalize_checks(checks, f"checks of month {name!r}") if checks is not None else None
        except ValueError as error:
            raise CampaignError(f"Month {name!r} was not registered: {error}") from error
        if entry is not None and month_checks is not None and month_checks != entry.get("checks"):
            raise CampaignError(
                f"Month {name!r} was started with other checks ({entry.get('checks')}); rerun it without --checks "
                "(or with the same checks) to resume."
            )
        retention_overrides = dict(
            scale=retention_scale,
            keep_learning=retention_keep_learning,
            budget=retention_budget,
            scales=retention_scales,
            layer_scales=retention_layer_scales,
            validation_fraction=validation_fraction,
        )
        if entry is None:
            try:
                retention = self.config.retention_options(**retention_overrides)
            except ValueError as error:
                raise CampaignError(f"Month {name!r} was not registered: {error}") from error
        else:  # a resumed month keeps the options it was registered with (its held-out rows depend on them)
            retention = entry.get("retention_options")
            if any(v is not None for v in retention_overrides.values()) and (
                self.config.retention_options(**retention_overrides) != retention
            ):
                raise CampaignError(
                    f"Month {name!r} was started with other retention options ({retention or 'off'}); rerun it "
                    "without them (or with the same) to resume."
                )
        with clock.phase("data"):
            user_calibration = self._user_calibration(name, entry, calibration_data)
            before = self._before_month(entry is None)
            holdout = retention["validation_fraction"] if retention and retention["scale"] == "auto" else None
            splits, sampling = self._month_data(name, data, test_data, test_fraction, holdout)
            calibration_path = self.layout.calibration(name)
            if entry is None and user_calibration and self._is_main:
                texts = "".join(json.dumps({"text": t}) + "\n" for t in user_calibration)
                atomic_write(calibration_path, texts.encode())
        previous = self.done_months
        with clock.phase("load_model"):
            model, tokenizer = self.load_model()
        if self.state["base_fingerprint"] is None:
            self.state["base_fingerprint"] = self._loaded_fingerprint
        if entry is None:
            source = data if isinstance(data, (str, Path)) else "in-memory Dataset"
            entry = {
                "name": name,
                "status": "training",
                "started_at": _now(),
                "data": {
                    "source": str(source),
                    "train_rows": len(splits["train"]),
                    "test_rows": len(splits["test"]),
                    "train_sha256": _digest(splits["train"]),
                    **sampling,
                },
            }
            self._record(entry, *(self.layout.split(name, split) for split in splits), calibration_path)
            if "validation" in splits:
                entry["data"]["validation_rows"] = len(splits["validation"])
            if retention is not None:
                entry["retention_options"] = retention
            if month_checks and (month_checks["checks"] or month_checks["bleed_checks"]):
                entry["checks"] = month_checks
            if not (month_checks and (month_checks["checks"] or month_checks["bleed_checks"])):
                # Bleed of a month without checks: a style signature of its chosen vs rejected answers, if any.
                train = splits["train"]
                entry["style_signature"], entry["style_note"] = fit_style_signature(train["chosen"], train["rejected"])
            pool = self.knowledge_pool
            excluded = self._exclude(pool, name, [list(splits["train"]), list(splits["test"])])
            if excluded:
                logger.info("%d knowledge items overlap month %r's prompts: excluded from the report.", excluded, name)
            self.months.append(entry)
        self._save_state()

        evaluation_config = self.config.evaluation_config()
        if BASELINE not in self.evaluations and not previous and self._is_main:
            logger.info("Evaluating the base model (month 0).")
            with clock.phase("baseline_evaluation"):
                self.evaluations[BASELINE] = evaluate_model(
                    model,
                    tokenizer,
                    evaluation_config,
                    knowledge_items=self.knowledge_pool["items"],
                    show_progress=True,
                    exact_indices=self._exact_indices(),
                    keep_offscope=True,  # the base's rate of every later month's style on the same off-scope prompts
                )
            self._save_evaluations()
            self._record_evaluation(BASELINE)
        reference_path = self.layout.reference_logps(name)
        before_path = self.layout.before_behaviour(name)
        with clock.phase("before_month"):
            if not reference_path.exists() and self._is_main:  # the base's log-probs: R[t][name] is measured on them
                context = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
                with context:
                    logps = reference_logps_for(
                        model, tokenizer, splits["test"], evaluation_config, show_progress=True
                    )
                atomic_write_json(reference_path, logps)
            if "behaviour" in evaluation_config.suites and not before_path.exists() and self._is_main:
                # The model before the month on the month's held-out prompts: the paired baseline of what it learned.
                spec = self.month_spec(name)
                behaviour = month_behaviour(model, tokenizer, splits["test"], spec, evaluation_config, name)
                atomic_write_json(before_path, behaviour)
        if self._is_main:  # what was measured before the month, checked from now on (written atomically above)
            recorded = entry.get("files", {})
            self._record(entry, *(p for p in (reference_path, before_path) if self._relative(p) not in recorded))
            self._save_state()

        self._barrier()
        run_dir = self.layout.runs(name)
        fisher_dir = self.layout.fisher if self.config.training["ewc_coef"] > 0 else None
        with clock.phase("trainer"):
            trainer = ContinualDPOTrainer(
                model,
                args=self.config.training_args(run_dir, name, fisher_dir),
                train_dataset=splits["train"],
                train_dataset_validated=True,  # checked by `_split` when the month was registered
                processing_class=tokenizer,
                peft_config=self.config.peft_config(),
                rehearsal_buffer=RehearsalBuffer(self.layout.buffer),
                callbacks=callbacks,
            )
        if trainer.pop_callback(ProgressCallback) is not None:  # absent with disable_tqdm
            trainer.add_callback(_LoggedProgress())
        calibration = None
        if self.config.method == "geometry_projected":
            try:
                with clock.phase("calibration"):
                    calibration = self._calibrate(trainer, tokenizer, name, previous, user_calibration)
            except ValueError as error:  # too little protected text for a layer, no layer with room
                if self._is_main:
                    raise CampaignError(
                        f"Month {name!r}: the geometry_projected calibration failed: {error} (raise "
                        f"`calibration_reference_chars`, now {self.config.calibration_reference_chars}, or pass more "
                        f"text with --calibration_data). {self._undo_month(name, before)}"
                    ) from error
                raise
        checkpoint = last_complete_checkpoint(run_dir)  # one cut by a kill or a full disk is skipped, with a warning
        if checkpoint:
            logger.info("Month %r resumes from %s.", name, checkpoint)
        try:
            with clock.phase("training"):
                result = trainer.train(resume_from_checkpoint=checkpoint)
        except ModelHealthError as error:  # raised on every process alike (the loss is gathered, gradients reduced)
            if self._is_main:
                raise ModelHealthError(
                    f"{error} {self._undo_month(name, before)}", error.measured, error.limits
                ) from error
            raise
        policy = trainer.accelerator.unwrap_model(trainer.model)
        dial = None
        if retention:
            with clock.phase("retention_dial"):
                dial = self._retention_dial(policy, tokenizer, name, previous, splits, retention)
        # The main process evaluates; nothing of the month is written until the evaluation passed the guard.
        evaluation, health, refusal = None, None, None
        suite_seconds: dict[str, float] = {}
        if self._is_main:
            months = previous + [name]
            logger.info("Evaluating the model after month %r.", name)
            with clock.phase("evaluation"):
                evaluation = self._evaluate(policy, tokenizer, months, show_progress=True, timings=suite_seconds)
            if limits["health_check"]:
                try:
                    health = check_evaluation(
                        name,
                        evaluation,
                        self.evaluations.get(BASELINE),
                        limits["max_perplexity_ratio"],
                        limits["max_kl_to_base"],
                    )
                except ModelHealthError as error:
                    refusal = error
        (refused,) = broadcast_object_list([refusal is not None])  # every process stops, or goes on, together
        if refused:
            if not self._is_main:
                raise ModelHealthError(f"Month {name!r} was refused by the main process's health check.")
            raise ModelHealthError(
                f"{refusal} {self._undo_month(name, before)}", refusal.measured, refusal.limits
            ) from refusal
        with clock.phase("finish"):
            if self._is_main:
                self._save_adapter(trainer.model, name)
                if calibration is not None:
                    calibration[0].save(self.layout.adapter(name))  # geometry_report.json: the per-layer bounds
            finish = trainer.finish_month(name, overwrite=True)
        entry["data"]["rehearsal_rows"] = sum(v for k, v in trainer.rehearsal_summary.items() if k != "new")
        # fewer than `boundary_pairs` when answers were skipped (empty, the month's own, no whole sentence in budget)
        entry["data"]["boundary_rows"] = trainer.boundary_rows
        if not self._is_main:
            self._barrier()  # the main process writes the month's results
            return entry
        self.evaluations[name] = evaluation
        self._save_evaluations()
        self._record_evaluation(name)
        entry.update(
            status="done",
            finished_at=_now(),
            adapter_sha256=_sha256(self.layout.adapter_weights(name)),
            training={"train_loss": result.training_loss, "steps": result.global_step, **finish},
            base=self._loaded_base,
        )
        adapter = self.layout.adapter(name)
        self._record(entry, *(adapter / f for f in (*layout.ADAPTER_FILES, layout.GEOMETRY_REPORT_FILE)))
        self.state["shared_files"] = self._shared_files()
        if health is not None:
            entry["health"] = health
        if dial is not None:
            entry["retention"] = dial
        if calibration is not None:
            entry["calibration"] = calibration[1]
        with clock.phase("card"):
            self.write_card(name)
        # Not checksummed, not read by any command: a campaign.json without them (older months) loads the same.
        entry["timing_s"] = clock.record()
        entry["evaluation_suites_s"] = {suite: round(seconds, 2) for suite, seconds in suite_seconds.items()}
        self._save_state()
        if not keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        self._barrier()
        return entry

    # ---------------------------------------------------------------------------------------------- calibration
    def _user_calibration(
        self, name: str, entry: Optional[dict[str, Any]], calibration_data: Optional[Union[str, Path]]
    ) -> list[str]:
        """The month's own calibration texts (geometry_projected): read from `calibration_data` for a new month, the
        stored ones for a resumed month (which `calibration_data`, if given again, must match). Checked before the
        month is registered."""
        texts = None
        if calibration_data is not None:
            if self.config.method != "geometry_projected":
                raise CampaignError(
                    f"Month {name!r} was not registered: --calibration_data is only used by method "
                    f"'geometry_projected' (this campaign trains {self.config.method!r})."
                )
            try:
                texts = read_calibration_texts(calibration_data)
            except (OSError, ValueError) as error:
                raise CampaignError(f"Month {name!r} was not registered: {error}") from error
        if entry is None:
            return texts or []
        stored_path = self.layout.calibration(name)
        stored = read_calibration_texts(stored_path) if stored_path.is_file() else []
        if texts is not None and texts != stored:
            raise CampaignError(
                f"Month {name!r} was started with other calibration data; rerun it without --calibration_data (or with "
                "the same file) to resume."
            )
        return stored

    def calibration_texts(self, tokenizer, months: Sequence[str], user_texts: Sequence[str] = ()) -> dict[str, list]:
        """The protected data of a geometry_projected month, by source: `reference_text` (the first
        `calibration_reference_chars` of `peft_selective.evaluation.preference.reference_text`, in chunks of 1000 characters),
        `earlier_months` (every training row of `months`, prompt + chosen answer, as the chat template writes them)
        and `calibration_data` (the month's own texts)."""
        from ..evaluation.preference import reference_text

        reference = reference_text()[: self.config.calibration_reference_chars]
        earlier = []
        for month in months:
            rows = Dataset.from_json(str(self.layout.split(month, "train")))
            earlier += [_chat_text(tokenizer, row) for row in rows]
        return {
            "reference_text": _chunks(reference),
            "earlier_months": [text for text in earlier if text.strip()],
            "calibration_data": list(user_texts),
        }

    def _calibrate(self, trainer, tokenizer, name: str, previous: list[str], user_texts: list[str]):
        """Calibrate the month's GeometryProjected adapter (every process, the same data). Returns the report and the
        month's `calibration` record."""
        from .. import calibrate

        sources: dict[str, list] = self.calibration_texts(tokenizer, previous, user_texts)
        if not any(sources.values()):
            raise ValueError(
                "no protected text (calibration_reference_chars is 0, no earlier month, no calibration_data)"
            )
        counts = {source: len(group) for source, group in sources.items()}
        if self.config.calibration_anchors:
            # the bleed region: the month t-1 model's answers off-scope, each source weighing the same
            anchors = trainer.off_scope_anchors()
            sources["bleed_region"] = anchors.calibration_batches(self.config.evaluation.batch_size)
            counts["bleed_region"] = len(anchors)
            protected_data = sources
        else:  # every text weighs by its tokens (what campaigns did before `calibration_anchors`)
            protected_data = [text for group in sources.values() for text in group]
        report = calibrate(
            trainer.model,
            protected_data,
            tokenizer,
            adapter_name=name,
            previous_adapter=previous[-1] if previous else None,
            batch_size=self.config.evaluation.batch_size,
            max_length=self.config.training["max_length"],
            show_progress=True,
        )
        layers = report.layers.values()
        record = {
            "texts": counts,
            "weighting": "equal per source" if self.config.calibration_anchors else "per token",
            "previous_adapter": previous[-1] if previous else None,
            "calibration_tokens": report.calibration_tokens,
            "tolerance": report.tolerance,
            "norm_cap": report.norm_cap,
            "layers": len(report.layers),
            "max_bound": report.max_bound,
            "protected_dim": {
                "min": min(g.protected_dim for g in layers),
                "max": max(g.protected_dim for g in layers),
            },
            "free_dim": {"min": min(g.free_dim for g in layers), "max": max(g.free_dim for g in layers)},
            "soft_projector_layers": sum(g.soft_projector for g in layers),
            "report": layout.relative_path(layout.ADAPTERS_DIR, name, layout.GEOMETRY_REPORT_FILE),
        }
        logger.info(
            "Month %r calibrated on %d protected tokens: %d layers, largest bound %.4f (tolerance %g).",
            name,
            report.calibration_tokens,
            len(report.layers),
            report.max_bound,
            report.tolerance,
        )
        return report, record

    # ---------------------------------------------------------------------------------------------- retention dial
    def _retention_dial(
        self, policy, tokenizer, name: str, previous: list[str], splits: dict[str, Dataset], options: dict[str, Any]
    ) -> dict[str, Any]:
        """Bake the month's retention scale into its adapter (every process), the fixed one or, for `"auto"`, the one
        the main process chooses on the validation rows (see [`run_month`]). Returns the month's `retention` record."""
        from ..retention import scale_adapter

        if options["scale"] == "auto":
            record = self._choose_retention(policy, tokenizer, name, previous, splits["validation"], options)
            (record,) = broadcast_object_list([record])  # the main process chose; every process bakes the same
        else:
            record = {"scale": options["scale"], "rule": "fixed", "curve": []}
        layer_scales = options.get("layer_scales")
        baked = scale_adapter(policy, name, record["scale"], layer_scales)
        if layer_scales is not None:
            record |= {"layer_scales": layer_scales, "layer_factors": baked["layer_factors"]}
        logger.info(
            "Month %r: retention scale %g (%s)%s.",
            name,
            record["scale"],
            record["rule"],
            f", per block x {layer_scales}" if layer_scales else "",
        )
        return record

    def _choose_retention(
        self, policy, tokenizer, name: str, previous: list[str], validation: Dataset, options: dict[str, Any]
    ) -> Optional[dict[str, Any]]:
        """The curve over `options["scales"]` on the validation rows and the choice (main process; `None` elsewhere)."""
        from ..continual.reference import active_adapters
        from ..evaluation.preference import generic_prompts, kl_to_reference
        from ..retention import choose_scale, scaled_adapter

        if not self._is_main:
            return None
        evaluation_config = self.config.evaluation_config()
        spec = self.month_spec(name)
        prompts = generic_prompts()[: evaluation_config.drift_prompts]

        def score() -> tuple[float, str]:
            result = month_behaviour(policy, tokenizer, validation, spec, evaluation_config)
            return _mean(result["scores"]), result["scored_by"]

        with active_adapters(policy, previous):  # the month t-1 model, on the same rows
            before, scored_by = score()
        curve = []
        for scale in options["scales"]:
            with scaled_adapter(policy, name, scale, options.get("layer_scales")):
                after, _ = score()
                forgetting = kl_to_reference(
                    policy,
                    lambda: active_adapters(policy, previous),
                    tokenizer,
                    prompts,
                    batch_size=evaluation_config.batch_size,
                    max_length=evaluation_config.max_length,
                )
            curve.append({"scale": scale, "score": after, "learning_gain": after - before, "forgetting": forgetting})
            logger.info(
                "Month %r at scale %g: validation score %.3f (gain %+.3f), KL to the month before %.5f.",
                name,
                scale,
                after,
                after - before,
                forgetting,
            )
        if options["budget"] is not None:
            choice = choose_scale(curve, forgetting_budget=options["budget"])
        else:
            choice = choose_scale(curve, keep_learning_share=options["keep_learning"])
        if not choice["met"]:
            logger.warning("Month %r: %s (scale %g).", name, choice["rule"], choice["scale"])
        return {
            "scale": choice["scale"],
            "rule": choice["rule"],
            "met": choice["met"],
            "curve": curve,
            "before": before,
            "scored_by": scored_by,
            "validation_rows": len(validation),
            "forgetting": "KL to the month t-1 model on the generic prompts (nats per token)",
        }

    # ---------------------------------------------------------------------------------------------- health guard
    def _before_month(self, new: bool) -> dict[str, Any]:
        """What [`_undo_month`] needs to put the directory back as it was before a month: for a month started by this
        call the bytes of the two state files, and which of the shared folders existed."""

        def content(path: Path) -> Optional[bytes]:
            return path.read_bytes() if path.is_file() else None

        return {
            "new": new,
            "state": content(self.layout.campaign_file) if new else None,
            "evaluations": content(self.layout.evaluations_file) if new else None,
            "folders": {
                folder: self.layout.folder(folder).is_dir()
                for folder in (*layout.MONTH_FOLDERS, *layout.SHARED_FOLDERS)
            },
        }

    @_exclusive
    def abandon(self, name: str) -> str:
        """Drop the interrupted (or refused) month `name`: its checkpoints, data, adapter, card, rehearsal rows and
        state entries, as a refused month's; the done months, the base's evaluation and fingerprint stay. Returns
        what was done, in words."""
        check_month_name(name)
        entry = self.month(name)
        if entry is None:
            raise CampaignError(
                f"There is no interrupted month {name!r} (months: {[m['name'] for m in self.months]})."
            )
        if entry["status"] == "done":
            raise CampaignError(
                f"Month {name!r} is done: only an interrupted month can be abandoned (a done month's adapter is "
                "built on by the later ones)."
            )
        folders = dict.fromkeys((*layout.MONTH_FOLDERS, *layout.SHARED_FOLDERS), True)  # kept, even if empty
        return f"Month {name!r} abandoned. " + self._undo_month(
            name, {"new": False, "state": None, "evaluations": None, "folders": folders}
        )

    def _undo_month(self, name: str, before: dict[str, Any]) -> str:
        """Remove every trace of the refused month `name` (main process): its checkpoints, data, adapter, card,
        buffer rows and Fisher, folders it created, then its entries in the state files (last, as every write of the
        campaign). Returns the sentence for the error message."""
        if not self._is_main:
            return ""
        for folder in layout.MONTH_FOLDERS:  # runs/ first: a rerun must never resume from the broken checkpoints
            shutil.rmtree(self.layout.folder(folder) / name, ignore_errors=True)
        kept = []
        buffer_dir, fisher_dir = self.layout.buffer, self.layout.fisher
        if not before["folders"][layout.BUFFER_DIR]:
            shutil.rmtree(buffer_dir, ignore_errors=True)
        elif (buffer_dir / "manifest.json").is_file():  # only a resumed month can have reached the buffer
            buffer = RehearsalBuffer(buffer_dir)
            if name in buffer:
                buffer.remove_month(name)
        if not before["folders"][layout.FISHER_DIR]:
            shutil.rmtree(fisher_dir, ignore_errors=True)
        elif (fisher_dir / FISHER_METADATA).is_file() and name in _read_json(
            fisher_dir / FISHER_METADATA, "Fisher metadata"
        ).get("months", []):
            kept.append(
                f"{layout.FISHER_DIR}/ (it already sums month {name!r}: restore it from a backup before the rerun)"
            )
        for folder in layout.MONTH_FOLDERS:
            path = self.layout.folder(folder)
            if not before["folders"][folder] and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        state_path, evaluations_path = self.layout.campaign_file, self.layout.evaluations_file
        if before["new"]:
            atomic_write(state_path, before["state"])
            if before["evaluations"] is None:
                evaluations_path.unlink(missing_ok=True)
            else:
                atomic_write(evaluations_path, before["evaluations"])
        else:  # a resumed month: the campaign without it
            self.state["months"] = [month for month in self.months if month["name"] != name]
            self.state.get("evaluations_sha256", {}).pop(name, None)
            self._save_state()
            if self.evaluations.pop(name, None) is not None:
                self._save_evaluations()
        self.state = _read_json(state_path, "state")
        self.evaluations = _read_json(evaluations_path, "evaluation history") if evaluations_path.exists() else {}
        last = self.done_months[-1] if self.done_months else None
        sentence = (
            f"Nothing of month {name!r} was kept: {layout.CAMPAIGN_FILE} still ends at "
            + (f"month {last!r}" if last else "no done month")
            + "; no evaluation, card, adapter, rehearsal rows or Fisher of it were written, and its data and "
            "checkpoints were removed. Fix the cause and run the month again with its data."
        )
        if kept:
            sentence += " Left as it was: " + "; ".join(kept) + "."
        return sentence

    def _save_adapter(self, model, name: str) -> None:
        policy = model.module if hasattr(model, "module") else model
        target = self.layout.adapter(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as staging:
            policy.save_pretrained(staging, selected_adapters=[name])
            saved = Path(staging) / name if name != "default" else Path(staging)
            if target.exists():
                shutil.rmtree(target)
            saved.rename(target)

    # ---------------------------------------------------------------------------------------------- evaluation
    @_exclusive
    def evaluate(
        self,
        month: Optional[str] = None,
        lm_eval_tasks: Optional[Sequence[str]] = None,
        lm_eval_include_path: Optional[Union[str, Path]] = None,
        lm_eval_limit: Optional[int] = None,
        recompute: bool = False,
    ) -> dict[str, Any]:
        """The evaluation of the model after `month` (default: the last done one) on every month's held-out pairs up
        to it and on the general suites.

        The one stored by `run_month` (or an earlier `evaluate`) is returned as it is when it can be trusted: its
        checksum and those of every adapter it was measured on match (`verify`; the evaluation options are fixed at
        `init`), and it holds the lm-eval tasks asked for. Otherwise, or with `recompute`, the model is loaded and
        measured again, and the result stored; the log says why.

        `lm_eval_tasks` adds EleutherAI lm-evaluation-harness tasks (`mmlu`, `arc_easy`, ... with Hub access, or local
        task definitions in `lm_eval_include_path`, e.g. written by `peft_selective.evaluation.write_knowledge_task`)
        run on the same model, every month's adapter stacked; stored under `"lm_eval"` with the options under
        `"lm_eval_options"` (needs the `lm-eval` extra).
        """
        done = self.done_months
        if not done:
            raise CampaignError("No month is done yet: run one with `run-month`.")
        month = month or done[-1]
        if month not in done:
            raise CampaignError(f"Month {month!r} is not done (done: {done}).")
        lm_eval_options = None
        if lm_eval_tasks:
            include = str(lm_eval_include_path) if lm_eval_include_path is not None else None
            lm_eval_options = {"tasks": list(lm_eval_tasks), "include_path": include, "limit": lm_eval_limit}
        if not recompute:
            self.verify()  # the stored evaluation too: a stale or edited one is refused, naming it
            stale = self._stale_evaluation(month, lm_eval_options)
            if stale is None:
                logger.info(
                    "Month %r: its stored evaluation (checksums verified) is returned; pass --recompute to measure it "
                    "again.",
                    month,
                )
                return self.evaluations[month]
            logger.info("Month %r is measured again: %s", month, stale)
        self.verify(skip_evaluations=[month])  # the month's evaluation is measured again
        model, tokenizer = self.load_model(upto=month)
        months = done[: done.index(month) + 1]
        logger.info("Evaluating the model after month %r.", month)
        evaluation = self._evaluate(model, tokenizer, months, show_progress=True)
        if lm_eval_tasks:
            from ..evaluation import run_lm_eval

            evaluation["lm_eval"] = run_lm_eval(
                model, tokenizer, list(lm_eval_tasks), include_path=lm_eval_include_path, limit=lm_eval_limit
            )
            evaluation["lm_eval_options"] = lm_eval_options
        self.evaluations[month] = evaluation
        self._save_evaluations()
        self._record_evaluation(month)
        self._save_state()
        return self.evaluations[month]

    def _stale_evaluation(self, month: str, lm_eval_options: Optional[dict[str, Any]]) -> Optional[str]:
        """Why the stored evaluation of `month` (already verified) cannot be returned for this request; None if it can."""
        stored = self.evaluations.get(month)
        if stored is None:
            return f"{layout.EVALUATIONS_FILE} has no evaluation of it."
        if month not in self.state.get("evaluations_sha256", {}):
            return "its stored evaluation has no recorded checksum (written by an older peft-selective)."
        if lm_eval_options is not None:
            had = stored.get("lm_eval_options") or {}
            same = {k: v for k, v in had.items() if k != "tasks"} == {
                k: v for k, v in lm_eval_options.items() if k != "tasks"
            }
            if not (same and set(lm_eval_options["tasks"]) <= set(had.get("tasks", []))):
                return f"the lm-eval options asked for ({lm_eval_options}) are not those stored ({had or 'none'})."
        return None

    def retention(self) -> dict[str, Any]:
        """The behavioural retention matrix of the done months (`R`, its intervals `ci95`), the average and BWT with
        their intervals, and the implicit-reward matrix kept under its own name (`implicit_reward`)."""
        months = self.done_months
        return {
            "months": months,
            "R": retention_matrix(self.evaluations, months),
            "ci95": retention_intervals(self.evaluations, months),
            **retention_numbers(self.evaluations, months),
            "implicit_reward": implicit_reward_matrix(self.evaluations, months),
        }

    def report_inputs(self, months: Optional[list[str]] = None) -> dict[str, Any]:
        """What [`format_report`] needs besides the evaluations: the surviving knowledge items, each month's behaviour
        before it, and notes (knowledge items excluded, months whose bleed is not measured)."""
        months = self.done_months if months is None else months
        pool = self.knowledge_pool
        survivors = self.knowledge_survivors()
        notes = [
            f"Knowledge: {len(survivors)} of the {len(pool['items'])} pool items ({pool['source']}) overlap no "
            f"month's prompts nor the KL anchors and are reported in every column; {len(pool['excluded'])} excluded."
        ]
        minimum = self.config.evaluation_config().knowledge_min_items
        if len(survivors) < minimum:
            notes.append(
                f"Only {len(survivors)} knowledge items survive (fewer than {minimum}): the knowledge intervals are "
                "wide; use a larger pool (`knowledge_questions`, or more items in `knowledge_data`)."
            )
        for name in months:
            spec = self.month_spec(name)
            if not (spec["checks"] or spec["bleed_checks"] or spec["style_signature"]):
                notes.append(f"Month {name}: bleed not measured ({spec['style_note'] or 'no style test'}).")
        return {"surviving": survivors, "before": self._before_behaviour(months), "notes": notes}

    @_exclusive
    def report(self) -> str:
        """The retention matrix and the general-ability table as markdown (and every month's card rewritten)."""
        months = self.done_months
        if not months:
            raise CampaignError("No month is done yet: nothing to report.")
        self.verify()
        for name in months:
            self.write_card(name)
        self._save_state()  # the cards' checksums
        return format_report(self.evaluations, months, **self.report_inputs(months))

    def month_summary(self, name: str) -> str:
        """A few lines on the done month `name`: its training, what it learned, retention so far (backward transfer
        from the second month on), perplexity and KL against month 0, its time (training vs evaluation, for a month
        recorded with its `timing_s`), and where its card and the full tables are."""
        months = self.done_months[: self.done_months.index(name) + 1]
        entry, evaluation = self.month(name), self.evaluations.get(name, {})
        data, training = entry["data"], entry["training"]
        scale = (entry.get("retention") or {}).get("scale")
        lines = [
            f"Month {name} done: {training['steps']} steps (train loss {_fmt(training.get('train_loss'), 4)}) on "
            f"{data['train_rows']} new rows and {data.get('rehearsal_rows', 0)} rehearsed"
            + (f", retention scale {scale}." if scale is not None else ".")
        ]
        learned = learning_table(self.evaluations, [name], self._before_behaviour([name])).get(name)
        if learned:
            verdict = {True: "learned", False: "not learned (its interval reaches 0)"}.get(learned.get("learned"))
            lines.append(
                f"  Its held-out prompts ({_scored_by(self.evaluations, name)}): before {_ci(learned.get('before'))}, "
                f"after {_ci(learned['after'])}, gain {_ci(learned.get('gain'), signed=True)}"
                + (f": {verdict}." if verdict else ".")
            )
        numbers = retention_numbers(self.evaluations, months)
        bwt = _ci(numbers["bwt_interval"], signed=True) or _no_bwt(months)
        lines.append(f"  Retention: average score {_ci(numbers['average']) or 'n/a'}, backward transfer {bwt}.")
        general, base = evaluation.get("general", {}), self.evaluations.get(BASELINE, {}).get("general", {})
        if "perplexity" in general:
            lines.append(
                f"  Perplexity {_fmt(general['perplexity'], 2)} (month 0: {_fmt(base.get('perplexity'), 2)}), KL to "
                f"the base {_fmt(general.get('kl_to_base'), 4)} nats/token."
            )
        split = month_time_split(entry.get("timing_s"))
        if split:
            baseline = split["baseline_evaluation"]
            lines.append(
                f"  Time: {split['total']:.0f} s; training {split['training']:.0f} s, evaluation "
                f"{split['evaluation']:.0f} s" + (f" (and month 0's, once: {baseline:.0f} s)." if baseline else ".")
            )
        lines.append(
            f"  Card: {self.layout.card(name) / layout.CARD_FILE}. Every table: `continual-dpo report --campaign_dir "
            f"{self.directory}`."
        )
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------- cards & hub
    def card_context(self, name: str) -> dict[str, Any]:
        done = self.done_months
        months = done[: done.index(name) + 1] if name in done else done + [name]
        config = self.config
        inputs = self.report_inputs(months)
        numbers = retention_numbers(self.evaluations, months)
        columns = [c for c in [BASELINE, *months] if c in self.evaluations]
        return {
            "month": name,
            "months": months,
            "base_model": EMBEDDED_CONVERTED_FROM if config.base_model == EMBEDDED else config.base_model,
            "base": self._card_base(name, months),
            "quantization": config.quantization,
            "method": config.method,
            "method_config": self._saved_adapter_config(name),
            "training": {**config.training, "seed": config.seed} | self._geometry_settings(name),
            "data": {m: self.month(m)["data"] for m in months},
            "retention": {
                "months": months,
                "R": retention_matrix(self.evaluations, months),
                "ci95": retention_intervals(self.evaluations, months),
                "scored_by": {m: _scored_by(self.evaluations, m) for m in months},
                **{k: v for k, v in numbers.items() if k in ("average", "bwt_interval")},
            },
            "learning": learning_table(self.evaluations, months, inputs["before"]),
            "ranking": ranking_table(self.evaluations, months),
            "bleed": bleed_table(self.evaluations, months),
            "knowledge": {
                **knowledge_table(self.evaluations, columns, inputs["surviving"]),
                "pool": len(self.knowledge_pool["items"]),
            },
            "general": {c: self.evaluations[c]["general"] for c in columns},
            "retention_dial": {
                m: self.month(m)["retention"] for m in months if (self.month(m) or {}).get("retention")
            },
            "hub_repo": config.hub_repo,
            "license": config.license,
            "limitations": inputs["notes"][1:],  # the first note (how many knowledge items) is in the card's table
        }

    def _card_base(self, name: str, months: list[str]) -> dict[str, Any]:
        """The base as month `name` was trained on it (its record: source and precision as loaded), with the
        campaign's fingerprint; earlier months trained in another precision are named."""
        base = dict((self.month(name) or {}).get("base") or self._configured_base())
        precisions = {m: ((self.month(m) or {}).get("base") or {}).get("precision") for m in months}
        if len(set(precisions.values())) > 1:
            base["precision"] = "; ".join(f"{m}: {p or 'not recorded'}" for m, p in precisions.items())
        return {**base, "fingerprint": self.state.get("base_fingerprint")}

    def _configured_base(self) -> dict[str, Any]:
        """A month trained before the months recorded their base: its source from the config, precision unknown."""
        if self.config.base_model == EMBEDDED:
            return {"kind": "embedded", "path": None, "converted_from": EMBEDDED_CONVERTED_FROM, "precision": None}
        kind = "local" if Path(self.config.base_model).is_dir() else "hub"
        return {"kind": kind, "path": self.config.base_model, "precision": None}

    def _saved_adapter_config(self, name: str) -> dict[str, Any]:
        """The month's saved adapter_config.json: the target modules as the tuner resolved them on the model (the
        campaign's config leaves them to be resolved, `None`)."""
        path = self.layout.adapter(name) / layout.ADAPTER_CONFIG_FILE
        if not path.is_file():
            raise CampaignError(f"{path} is missing: month {name!r} has no saved adapter to describe in its card.")
        return json.loads(path.read_text(encoding="utf-8"))

    def _geometry_settings(self, name: str) -> dict[str, Any]:
        """geometry_projected: the calibration settings, and the month's calibration (tokens, largest bound)."""
        if self.config.method != "geometry_projected":
            return {}
        settings: dict[str, Any] = {"calibration_reference_chars": self.config.calibration_reference_chars}
        record = (self.month(name) or {}).get("calibration")
        if record:
            settings["calibration"] = {
                key: record[key] for key in ("texts", "calibration_tokens", "max_bound", "previous_adapter")
            }
        return settings

    def write_card(self, name: str) -> Path:
        from .model_card import render_model_card

        readme = render_model_card(self.card_context(name), self.layout.card(name))
        self._record(self.month(name), *(self.layout.card(name) / f for f in layout.CARD_FILES))  # checked by `push`
        return readme

    @_exclusive
    def push(self, repo_id: Optional[str] = None, dry_run: bool = False, token: Optional[str] = None) -> list[str]:
        from .hub import push_campaign

        repo_id = repo_id or self.config.hub_repo
        if not repo_id and not dry_run:
            raise CampaignError(
                "No Hub repo to push to: name it with `continual-dpo push --repo_id USER/NAME` (`push(repo_id=...)`); "
                "a campaign created with `init --hub_repo USER/NAME` pushes there by default. `--dry_run` lists the "
                "files without one."
            )
        self.verify()
        if not repo_id:  # a dry run reads the plan; the paths inside the repo do not depend on its name
            print(f"No Hub repo named (--repo_id, or init --hub_repo): the plan is shown for {PLACEHOLDER_REPO}.")
            repo_id = PLACEHOLDER_REPO
        return push_campaign(self.directory, repo_id, dry_run=dry_run, token=token)


def _row_format(row: dict[str, Any]) -> tuple[str, list[str]]:
    """("conversational" or "plain text", the sorted columns) of a preference row."""
    conversational = isinstance(row.get("chosen"), list)
    kind = 'conversational (lists of {"role", "content"} messages)' if conversational else "plain text (strings)"
    return kind, sorted(row)


def _digest(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _no_bwt(months: list[str]) -> str:
    """Why there is no backward transfer to show."""
    if len(months) < 2:
        return "n/a (needs two months)"
    return "n/a (no earlier month scored on the same items after the last one)"


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _scored_by(evaluations: dict[str, Any], month: str) -> Optional[str]:
    """How month's held-out answers are scored: "checks: a, b" or "agreement" (from its own evaluation)."""
    cell = evaluations.get(month, {}).get("behaviour", {}).get(month)
    if not cell:
        return None
    return "checks: " + ", ".join(cell["checks"]) if cell.get("scored_by") == "checks" else "agreement"


def _ci(summary: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    """`0.812 [0.700, 0.900]` from a `{"mean", "ci95"}` summary ("" when None)."""
    if not summary:
        return ""
    sign = "+" if signed else ""
    lo, hi = summary["ci95"]
    return f"{summary['mean']:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def format_report(
    evaluations: dict[str, Any],
    months: list[str],
    surviving: Optional[list[int]] = None,
    before: Optional[dict[str, Any]] = None,
    notes: Optional[list[str]] = None,
) -> str:
    """Markdown: what was learned and kept, judged by behaviour (generation-based), with 95% intervals, then what is
    not generation-based.

    - The behavioural retention matrix R[t][i] (rows: after month t; columns: month i's held-out prompts, scored by
      its checks or by agreement), the average and the backward transfer (paired interval, same items).
    - Learning per month: the score before the month (`before`, the campaign's `before_behaviour.json`), right after
      it, the paired gain, and whether it learned (the gain's interval above 0).
    - Bleed: share of off-scope answers carrying each month's style, and the base's rate on the same prompts.
    - Knowledge: multiple-choice and exact-match accuracy on the `surviving` pool items (the same in every column).
    - Ranking of the held-out pairs (log-likelihood, not generation) and the implicit-reward accuracy against the base.
    - The general-ability table against month 0 (perplexity, KL, refusals, drift).
    """
    lines = [
        "Behavioural retention R[t][i]: greedy answers to month i's held-out prompts after month t, scored by the "
        "month's checks (else agreement with its chosen answers), with 95% intervals.",
        "",
        "| after \\ on | " + " | ".join(months) + " |",
        "|---|" + "---:|" * len(months),
    ]
    intervals = retention_intervals(evaluations, months)
    cells = retention_cells(retention_matrix(evaluations, months), intervals, bold_diagonal=False, missing="")
    lines += [f"| {month} | " + " | ".join(row) + " |" for month, row in zip(months, cells)]
    numbers = retention_numbers(evaluations, months)
    bwt = _ci(numbers["bwt_interval"], signed=True)
    bwt = f"{bwt} (paired, same items)" if bwt else _no_bwt(months)
    lines += ["", f"Average score {_ci(numbers['average']) or 'n/a'}, backward transfer {bwt}."]

    learning = learning_table(evaluations, months, before)
    if learning:
        lines += ["", "| month | scored by | before the month | right after | gain (paired) | learned |"]
        lines.append("|---|---|---:|---:|---:|---|")
        for month, entry in learning.items():
            learned = {True: "yes", False: "no"}.get(entry.get("learned"), "")
            lines.append(
                f"| {month} | {_scored_by(evaluations, month)} | {_ci(entry.get('before'))} | {_ci(entry['after'])} | "
                f"{_ci(entry.get('gain'), signed=True)} | {learned} |"
            )
    bleed = bleed_table(evaluations, months)
    if bleed:
        lines += [
            "",
            "Bleed: share of off-scope answers (generic prompts, knowledge questions, the other months' prompts) that "
            "carry the month's style.",
            "",
            "| month's style | tested by | " + " | ".join(f"after {m}" for m in months) + " | base, same prompts |",
            "|---|---|" + "---:|" * (len(months) + 1),
        ]
        for month, entry in bleed.items():
            cells = [_ci(entry["after"].get(m)) for m in months]
            tested = entry["styles"] or f"none: {entry['note']}"
            lines.append(f"| {month} | {tested} | " + " | ".join(cells) + f" | {_ci(entry.get('base'))} |")
    columns = [c for c in [BASELINE, *months] if c in evaluations]
    knowledge = knowledge_table(evaluations, columns, surviving)
    if knowledge["mc"]:
        lines += ["", "| knowledge | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines.append(
            f"| multiple choice (n={knowledge['n_mc']}) | "
            + " | ".join(_ci(knowledge["mc"].get(c)) for c in columns)
            + " |"
        )
        if knowledge["exact"]:
            lines.append(
                f"| exact match (n={knowledge['n_exact']}) | "
                + " | ".join(_ci(knowledge["exact"].get(c)) for c in columns)
                + " |"
            )
    ranking = ranking_table(evaluations, months)
    if ranking:
        lines += [
            "",
            f"Ranking of the held-out pairs after {months[-1]} (log-likelihood, not generation): length-normalised "
            "accuracy and mean margin (nats/token); the implicit-reward accuracy against the base only shows that "
            "training moved the log-probs.",
            "",
            "| pairs | ranking accuracy | mean margin | implicit-reward accuracy |",
            "|---|---:|---:|---:|",
        ]
        for month, entry in ranking.items():
            lines.append(
                f"| {month} | {_ci(entry['ranking_accuracy'])} | {_fmt(entry['ranking_margin'], 4)} | "
                f"{_fmt(entry['implicit_reward_accuracy'])} |"
            )
    table = general_table(evaluations, columns)
    if table:
        lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for metric, row in table.items():
            lines.append(f"| {metric} | " + " | ".join(_fmt(row.get(c), 4) for c in columns) + " |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)
