"""Rehearsal buffer for monthly continual DPO: keep a small sample of every past month's preference data on disk and
mix it into the next month's training set, so the model keeps seeing what it learned before.

At the end of each month, a sample of that month's preference rows is added to the buffer; before the next month's
training, `mix_into` blends buffer rows into the new dataset at a chosen ratio. Mixing happens on the raw
text / conversational columns, *before* `DPOTrainer` tokenizes the dataset.

```python
from peft_selective.continual.rehearsal import RehearsalBuffer

buffer = RehearsalBuffer("rehearsal/", total_capacity=20_000)
train_dataset = buffer.mix_into(june_dataset, rehearsal_ratio=0.25, seed=42)  # 25% of the rows come from the buffer
# ... train on `train_dataset` ...
buffer.add_month("2025-06", june_dataset, capacity_per_month=2_000)  # then keep a sample of June for later months
```

On-disk layout (`buffer_dir/`):

- `month=<name>.<hash>.jsonl`: one JSON object per line, the sampled rows of a month. `<hash>` is the start of the
  file's SHA-256: a month's content is never rewritten in place, so the files listed by the previous manifest stay
  intact until the new manifest has replaced it.
- `manifest.json`: format version, `total_capacity`, and for every month (in the order they were added) its file,
  row count, SHA-256, sampling method, seed and dedup statistics, and how many of its rows carry stored reference
  log-probs (with a description of the model they come from). It is written last, atomically: it is the commit
  point of every change, and a crash at any moment leaves the previous consistent state loadable.
- `.lock` while a change is being made (`peft_selective.utils.lock`): each change holds it, and is made on the buffer
  as it is on disk at that moment, so two handles or processes never drop each other's months.

Reference log-probs (format version 2): a row may carry `reference_logps = {"chosen": float, "rejected": float,
"fingerprint": str}`, the summed log-probs of its chosen and rejected completions under the DPO reference of the month
that taught it (TRL's `ref_chosen_logps` / `ref_rejected_logps`), and a digest of the token ids they were computed on.
[`ContinualDPOTrainer.finish_month`] stores them (`set_reference_logps`) so that a later month scores a
rehearsed pair against its own month's reference, not against the month t−1 model (see
`ContinualDPOConfig.rehearsal_reference`). Version-1 buffers load as they are (no stored log-probs); the next change
writes version 2.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, overload

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, Value, concatenate_datasets

from ..utils.io import atomic_write, fsync_dir, is_json_serializable
from ..utils.lock import DirectoryLock
from ..utils.names import MONTH_NAME_BODY, is_month_name
from .preference_data import PreferenceDataError, check_preference_row, preference_row_problem


logger = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
#: Bump when the on-disk layout changes incompatibly; loading refuses manifests from newer versions.
#: 1: rows only. 2: rows may carry stored reference log-probs (`REFERENCE_LOGPS_KEY`) and month entries count them
#: (`reference_logps`, `reference`); version-1 manifests still load (no stored log-probs).
FORMAT_VERSION = 2
#: Row key of the stored reference log-probs: `{"chosen": float, "rejected": float, "fingerprint": str}`.
REFERENCE_LOGPS_KEY = "reference_logps"
#: Columns `mix_into(..., with_reference_logps=True)` adds: the stored values, `None` where a row has none.
STORED_REF_CHOSEN = "rehearsal_ref_chosen_logps"
STORED_REF_REJECTED = "rehearsal_ref_rejected_logps"
STORED_REF_FINGERPRINT = "rehearsal_ref_fingerprint"
_STORED_REF_COLUMNS = (STORED_REF_CHOSEN, STORED_REF_REJECTED, STORED_REF_FINGERPRINT)

SamplingMethod = Literal["reservoir", "stratified"]
_SAMPLING_METHODS = ("reservoir", "stratified")
# The DPO columns of TRL (the row schema itself is `preference_data`'s): `prompt` is optional.
_REQUIRED_COLUMNS = ("chosen", "rejected")
# Month names end up in file names: keep them portable (no separators, no leading dot).
_MONTH_FILE_RE = re.compile(rf"^month={MONTH_NAME_BODY}\.[0-9a-f]{{12}}\.jsonl$")
# Columns that only exist after tokenization: mixing must happen before it.
_TOKENIZED_COLUMNS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_input_ids", "chosen_input_ids")


class RehearsalBufferError(RuntimeError):
    """The on-disk buffer is corrupted or inconsistent (bad manifest, missing / truncated / edited month file).

    A malformed row handed to the buffer raises [`~peft_selective.continual.preference_data.PreferenceDataError`]
    instead, from the package's one preference-row schema (a stored row that fails that schema on load is a
    corrupted file, and raises this error naming the file and line)."""


@dataclass(frozen=True)
class MonthInfo:
    """
    Manifest entry of one month of the rehearsal buffer.

    Args:
        name (`str`):
            Name of the month, as given to [`RehearsalBuffer.add_month`] (e.g. `"2025-06"`).
        file (`str`):
            Name of the JSON Lines file holding the month's rows, relative to the buffer directory.
        count (`int`):
            Number of rows currently kept (after any shrinking to `total_capacity`).
        sha256 (`str`):
            SHA-256 of the file's bytes, checked on load.
        sampling (`str`):
            How the rows were sampled: `"reservoir"` or `"stratified"`.
        stratify_by (`Optional[str]`):
            Column the stratified sample was balanced over (also used when the month is shrunk), `None` for
            reservoir sampling.
        seed (`int`):
            Seed of the sampling; also seeds the (deterministic) choice of rows dropped when the month is shrunk.
        capacity (`int`):
            The `capacity_per_month` the month was added with.
        sampled (`int`):
            Rows kept when the month was added, before any shrinking.
        rows_seen (`int`):
            Rows read from the month's data.
        duplicates_within (`int`):
            Rows dropped because they repeated an earlier row of the same month.
        duplicates_across (`int`):
            Rows dropped because they were already in the buffer (from another month).
        added_at (`str`):
            When the month was added (ISO 8601, local time).
        reference_logps (`int`):
            Rows of the month that carry stored reference log-probs (`0` for months of a version-1 buffer).
        reference (`Optional[str]`):
            Description of the model the stored reference log-probs come from (the month's DPO reference), if any.
    """

    name: str
    file: str
    count: int
    sha256: str
    sampling: str
    stratify_by: Optional[str]
    seed: int
    capacity: int
    sampled: int
    rows_seen: int
    duplicates_within: int
    duplicates_across: int
    added_at: str
    reference_logps: int = 0
    reference: Optional[str] = None

    @classmethod
    def _from_manifest(cls, entry: Any, manifest_path: Path) -> MonthInfo:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(entry, dict):
            raise RehearsalBufferError(f"{manifest_path}: every entry of 'months' must be an object, got {entry!r}.")
        # Fields added in format version 2 have defaults: a version-1 entry lacks them.
        optional = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        entry = {**optional, **entry}
        missing = [name for name in fields if name not in entry]
        if missing:
            raise RehearsalBufferError(
                f"{manifest_path}: the entry of month {entry.get('name')!r} lacks the fields {missing}. The manifest "
                "is corrupted; restore the buffer directory from a backup."
            )
        info = cls(**{name: entry[name] for name in fields})
        if not isinstance(info.name, str) or not is_month_name(info.name):
            raise RehearsalBufferError(f"{manifest_path}: invalid month name {info.name!r}.")
        # The file name comes from disk: never let it point outside the buffer directory.
        if not isinstance(info.file, str) or not _MONTH_FILE_RE.match(info.file):
            raise RehearsalBufferError(f"{manifest_path}: month {info.name!r} has an invalid file name {info.file!r}.")
        if not isinstance(info.count, int) or isinstance(info.count, bool) or info.count < 0:
            raise RehearsalBufferError(f"{manifest_path}: month {info.name!r} has an invalid count {info.count!r}.")
        stored = info.reference_logps
        if not isinstance(stored, int) or isinstance(stored, bool) or not 0 <= stored <= info.count:
            raise RehearsalBufferError(
                f"{manifest_path}: month {info.name!r} has an invalid reference_logps count {stored!r}."
            )
        return info


# --------------------------------------------------------------------------------------------------------------------
# Sampling helpers (pure functions, deterministic given the `random.Random` they are handed)
# --------------------------------------------------------------------------------------------------------------------


def _reservoir_sample(items: Iterable[Any], k: int, rng: random.Random) -> list[Any]:
    """Uniform sample of `k` items in one pass (Algorithm R), returned in stream order."""
    reservoir: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


def _proportional_allocation(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over strata proportionally to `sizes` (largest remainder), at least one per non-empty stratum
    when `total` allows it. Ties go to the earlier stratum, so the result is deterministic."""
    n = sum(sizes)
    if total >= n:
        return list(sizes)
    nonempty = [i for i, size in enumerate(sizes) if size > 0]
    alloc = [0] * len(sizes)
    if total < len(nonempty):
        # Not enough room for one row per stratum: the largest strata get one each.
        for i in sorted(nonempty, key=lambda i: (-sizes[i], i))[:total]:
            alloc[i] = 1
        return alloc
    quotas = [total * size / n for size in sizes]
    for i in nonempty:
        alloc[i] = max(1, math.floor(quotas[i]))  # floor(quota) < size since total < n
    excess = sum(alloc) - total
    # The "at least one" bumps may overshoot: take back from the most over-allocated strata that have more than one.
    while excess > 0:
        for i in sorted((i for i in nonempty if alloc[i] > 1), key=lambda i: (quotas[i] - alloc[i], i)):
            if excess == 0:
                break
            alloc[i] -= 1
            excess -= 1
    deficit = total - sum(alloc)
    while deficit > 0:
        for i in sorted((i for i in nonempty if alloc[i] < sizes[i]), key=lambda i: (alloc[i] - quotas[i], i)):
            if deficit == 0:
                break
            alloc[i] += 1
            deficit -= 1
    return alloc


def _balanced_allocation(total: int, counts: list[int]) -> list[int]:
    """Split `total` as evenly as possible over groups holding `counts` items (water-filling): a group smaller than
    its fair share gives everything and the rest is shared by the others. Leftover units of the integer division go
    to the last (newest) groups."""
    if total >= sum(counts):
        return list(counts)
    alloc = [0] * len(counts)
    remaining = total
    open_groups = [i for i, count in enumerate(counts) if count > 0]
    while open_groups:
        share = remaining // len(open_groups)
        small = [i for i in open_groups if counts[i] <= share]
        if not small:
            for i in open_groups:
                alloc[i] = share
            for i in open_groups[len(open_groups) - (remaining - share * len(open_groups)) :]:
                alloc[i] += 1
            break
        for i in small:
            alloc[i] = counts[i]
            remaining -= counts[i]
        open_groups = [i for i in open_groups if counts[i] > share]
    return alloc


def _stratum_label(value: Any) -> str:
    # JSON, so that unhashable values (lists) and mixed types can be strata too.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _stratified_sample(
    rows: Iterable[dict[str, Any]], k: int, stratify_by: str, rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Proportional stratified sample of `k` rows in one pass, returned in stream order, plus the rows kept per
    stratum. One reservoir per stratum (of size `k`, the most any stratum can get), subsampled once the stratum sizes
    are known: a uniform subsample of a uniform sample is uniform."""
    reservoirs: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # insertion order = first appearance
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        label = _stratum_label(row[stratify_by])
        reservoir = reservoirs.setdefault(label, [])
        n = seen.get(label, 0)
        if n < k:
            reservoir.append((i, row))
        else:
            j = rng.randrange(n + 1)
            if j < k:
                reservoir[j] = (i, row)
        seen[label] = n + 1
    labels = list(reservoirs)
    alloc = _proportional_allocation(k, [seen[label] for label in labels])
    kept: list[tuple[int, dict[str, Any]]] = []
    for label, count in zip(labels, alloc):
        reservoir = reservoirs[label]
        kept.extend(reservoir if count == len(reservoir) else rng.sample(reservoir, count))
    kept.sort(key=lambda pair: pair[0])
    return [row for _, row in kept], dict(zip(labels, alloc))


# --------------------------------------------------------------------------------------------------------------------
# Row helpers
# --------------------------------------------------------------------------------------------------------------------


def _row_key(row: Mapping[str, Any]) -> bytes:
    """Dedup key of a row: its (prompt, chosen, rejected) triple. Conversational values are normalised by serialising
    them to JSON with sorted keys, so that message dicts with the same content but a different key order match."""
    triple = [row.get("prompt"), row["chosen"], row["rejected"]]
    text = json.dumps(triple, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    # 16-byte digests instead of the strings: dedup keeps one key per distinct row of the month in memory.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _row_format(row: Mapping[str, Any]) -> tuple[bool, bool]:
    """(has an explicit prompt, is conversational): rows of one buffer must agree on both, as TRL needs them to."""
    return "prompt" in row, isinstance(row["chosen"], list)


def _describe_format(fmt: tuple[bool, bool]) -> str:
    has_prompt, conversational = fmt
    kind = "conversational" if conversational else "plain-text"
    return (
        f"{kind} rows with an explicit prompt" if has_prompt else f"{kind} rows with an implicit prompt (no 'prompt')"
    )


def _check_reference_logps(value: Any) -> Optional[str]:
    """Why `value` is not a valid stored reference entry (`None` when it is)."""
    if not isinstance(value, Mapping) or set(value) != {"chosen", "rejected", "fingerprint"}:
        return "must be a dict with exactly the keys 'chosen', 'rejected' and 'fingerprint'"
    for side in ("chosen", "rejected"):
        number = value[side]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            return f"{side!r} must be a finite number, got {number!r}"
    if not isinstance(value["fingerprint"], str) or not value["fingerprint"]:
        return f"'fingerprint' must be a non-empty string, got {value['fingerprint']!r}"
    return None


def _reference_entry(value: Any, where: str) -> dict[str, Any]:
    """A stored reference entry from `value` (numbers as Python floats: JSON round-trips them exactly)."""
    if isinstance(value, Mapping):
        value = dict(value)
        for side in ("chosen", "rejected"):
            if side in value and not isinstance(value[side], bool):
                with contextlib.suppress(TypeError, ValueError):
                    value[side] = float(value[side])
    problem = _check_reference_logps(value)
    if problem is not None:
        raise ValueError(f"{where}: {REFERENCE_LOGPS_KEY!r} {problem}.")
    return {key: value[key] for key in ("chosen", "rejected", "fingerprint")}


def _has_reference_logps(row: Mapping[str, Any]) -> bool:
    return row.get(REFERENCE_LOGPS_KEY) is not None


def _locked_change(method):
    """Make `method` a change of the buffer under its lock, applied to the buffer as it is on disk now: a change
    prepared on this handle's copy would drop whatever another handle or process committed since it loaded."""

    @functools.wraps(method)
    def change(self, *args, **kwargs):
        with DirectoryLock(self.buffer_dir, f"RehearsalBuffer.{method.__name__}", "rehearsal buffer"):
            self.reload()
            return method(self, *args, **kwargs)

    return change


def _month_filename(name: str, sha256: str) -> str:
    return f"month={name}.{sha256[:12]}.jsonl"


def _serialize_rows(rows: list[dict[str, Any]], month: str) -> bytes:
    lines = []
    for row in rows:
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except (TypeError, ValueError) as err:
            bad = [column for column, value in row.items() if not is_json_serializable(value)]
            raise TypeError(
                f"Month {month!r}: the columns {bad} hold values that cannot be stored as JSON ({err}). The buffer "
                "keeps text / conversational preference rows; drop those columns first, e.g. "
                f"`dataset.remove_columns({bad})`."
            ) from err
    return "".join(line + "\n" for line in lines).encode("utf-8")


# --------------------------------------------------------------------------------------------------------------------
# The buffer
# --------------------------------------------------------------------------------------------------------------------


class RehearsalBuffer:
    """
    Preference rows sampled from earlier months, kept on disk, to mix into the training data of later months.

    Rows are dicts with the DPO columns of TRL: `chosen` and `rejected`, and `prompt` unless the rows use TRL's
    implicit-prompt format. Values are either plain strings or conversational lists of `{"role", "content"}` messages,
    and all rows of a buffer must use the same format. Rows are checked with the trainer's own schema
    (`peft_selective.continual.preference_data`); a malformed one raises `PreferenceDataError` naming the month and
    the row. Extra columns are kept; every row gets a `month` column with
    the name of the month it was added with.

    The buffer is small by design (a sample), so it is held in memory and every change rewrites the manifest. Any
    number of processes may read a buffer; a change holds the buffer's lock and is applied to the buffer as it is on
    disk (re-read first), so a second process changing it meanwhile is refused with
    [`~peft_selective.utils.lock.DirectoryLockedError`], never interleaved (with several ranks, call
    [`~RehearsalBuffer.add_month`] on the main process only).

    Args:
        buffer_dir (`str` or `os.PathLike`):
            Directory of the buffer. Loaded when it holds a `manifest.json`, otherwise the buffer starts empty; the
            directory is created on the first change.
        total_capacity (`Optional[int]`):
            Upper bound on the rows of all months together. When adding a month would exceed it, the months are
            shrunk to a balanced share each (see [`~RehearsalBuffer.add_month`]). `None` (the default) for no bound.
            Not taken from the manifest: pass it every time you open the buffer.
        verify_checksums (`bool`):
            Check each month file against the SHA-256 in the manifest when loading (row counts are always checked).
            Turn it off only to load a buffer whose files you edited by hand on purpose.

    Raises:
        RehearsalBufferError: if the directory holds a corrupted or inconsistent buffer.
    """

    def __init__(
        self,
        buffer_dir: Union[str, os.PathLike],
        total_capacity: Optional[int] = None,
        verify_checksums: bool = True,
    ):
        if total_capacity is not None and (
            not isinstance(total_capacity, int) or isinstance(total_capacity, bool) or total_capacity < 1
        ):
            raise ValueError(f"total_capacity must be a positive int or None, got {total_capacity!r}.")
        self.buffer_dir = Path(buffer_dir)
        self.total_capacity = total_capacity
        self.verify_checksums = verify_checksums
        self._infos: dict[str, MonthInfo] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._load()
        if total_capacity is not None and len(self) > total_capacity:
            # Opening must not write (readers may be many ranks); the next change shrinks the buffer.
            logger.warning(
                "The rehearsal buffer in %s holds %d rows, more than total_capacity=%d; it is shrunk at the next "
                "add_month.",
                self.buffer_dir,
                len(self),
                total_capacity,
            )

    def reload(self) -> None:
        """Re-read the buffer from disk (e.g. on the other ranks after the main process added a month)."""
        self._infos, self._rows = {}, {}
        self._load()

    # ---------------------------------------------------------------------------------------------------------------
    # Read access
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def months(self) -> list[str]:
        """Names of the months in the buffer, oldest (first added) first."""
        return list(self._infos)

    def __len__(self) -> int:
        return sum(info.count for info in self._infos.values())

    def __contains__(self, month: object) -> bool:
        return month in self._infos

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}: {info.count}" for name, info in self._infos.items())
        return f"RehearsalBuffer({str(self.buffer_dir)!r}, rows={len(self)}, months={{{counts}}})"

    def month_info(self, month: str) -> MonthInfo:
        """The manifest entry of `month` (counts, sampling method, seed, dedup statistics)."""
        self._check_known(month)
        return self._infos[month]

    def rows(self, month: Optional[str] = None) -> list[dict[str, Any]]:
        """
        Copies of the buffer's rows.

        Args:
            month (`Optional[str]`):
                Only the rows of this month. `None` (the default) for all rows, oldest month first.

        Returns:
            `list[dict]`: the rows, each with its `month` column.
        """
        if month is not None:
            self._check_known(month)
            return copy.deepcopy(self._rows[month])
        return [copy.deepcopy(row) for name in self._infos for row in self._rows[name]]

    def to_dataset(self) -> Dataset:
        """All rows as a `datasets.Dataset` (oldest month first, with the `month` column). A column that only some
        months have is `None` in the rows of the others."""
        rows = self.rows()
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        try:
            return Dataset.from_list([{column: row.get(column) for column in columns} for row in rows])
        except Exception as err:  # pyarrow raises several types for incompatible values
            raise ValueError(
                f"The rows of the months {self.months} cannot form one dataset ({err}): an extra column probably has "
                "different types in different months."
            ) from err

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """
        Draw `n` distinct rows, balanced across months, in random order.

        Every month contributes the same number of rows, except months holding fewer than that share, which give all
        their rows (the others make up the difference). Leftover rows of the integer division come from the newest
        months.

        Args:
            n (`int`):
                Number of rows, at most `len(buffer)`.
            seed (`int`):
                Seed of the draw: the same buffer, `n` and `seed` give the same rows in the same order.

        Returns:
            `list[dict]`: copies of the rows, each with its `month` column.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}.")
        if n > len(self):
            raise ValueError(
                f"Cannot sample {n} rows from a rehearsal buffer of {len(self)} rows; ask for at most len(buffer)."
            )
        rng = random.Random(seed)
        names = self.months
        alloc = _balanced_allocation(n, [self._infos[name].count for name in names])
        drawn = [row for name, k in zip(names, alloc) for row in rng.sample(self._rows[name], k)]
        rng.shuffle(drawn)
        return copy.deepcopy(drawn)

    # ---------------------------------------------------------------------------------------------------------------
    # Mixing
    # ---------------------------------------------------------------------------------------------------------------

    @overload
    def mix_into(
        self,
        new_dataset: Dataset,
        rehearsal_ratio: float,
        seed: int = 0,
        *,
        source_column: str = "source",
        return_summary: Literal[False] = False,
        with_reference_logps: bool = False,
    ) -> Dataset: ...

    @overload
    def mix_into(
        self,
        new_dataset: Dataset,
        rehearsal_ratio: float,
        seed: int = 0,
        *,
        source_column: str = "source",
        return_summary: Literal[True],
        with_reference_logps: bool = False,
    ) -> tuple[Dataset, dict[str, int]]: ...

    def mix_into(
        self,
        new_dataset: Dataset,
        rehearsal_ratio: float,
        seed: int = 0,
        *,
        source_column: str = "source",
        return_summary: bool = False,
        with_reference_logps: bool = False,
    ) -> Union[Dataset, tuple[Dataset, dict[str, int]]]:
        """
        Mix buffer rows into a new month's (untokenized) preference dataset.

        The number of buffer rows is chosen so that they make `rehearsal_ratio` of the mixed dataset:
        `n_buffer = round(rehearsal_ratio * n_new / (1 - rehearsal_ratio))` (e.g. 100 buffer rows for 300 new rows
        at 0.25), drawn balanced across months with [`~RehearsalBuffer.sample`]. If the buffer holds fewer rows, all of
        them are used and a warning is logged.

        The result has exactly the columns of `new_dataset` (same features) plus `source_column`: `"new"` for rows of
        `new_dataset`, `"rehearsal:<month>"` for buffer rows. Buffer columns that `new_dataset` lacks are dropped
        (including `month`, which `source` carries; it is kept if `new_dataset` has a `month` column), and columns of
        `new_dataset` that buffer rows lack are `None` for them. Nested fields absent from `new_dataset`'s features
        (e.g. an extra message key) are dropped. TRL's `DPOTrainer` keeps the extra string column through
        tokenization and drops it with its default `remove_unused_columns=True`.

        Call it before the trainer tokenizes the dataset (the buffer holds text, not token ids). With a ratio of 0,
        `new_dataset` is returned unchanged (no shuffle, no `source` column).

        Args:
            new_dataset (`datasets.Dataset`):
                The new month's preference dataset, in the same format as the buffer rows (plain text or
                conversational, explicit or implicit prompt).
            rehearsal_ratio (`float`):
                Fraction of the mixed dataset taken from the buffer, in `[0, 1)`.
            seed (`int`):
                Seed of both the buffer draw and the final shuffle, so that every rank builds the same dataset.
            source_column (`str`):
                Name of the provenance column added to the result.
            return_summary (`bool`):
                Also return the rows per source, e.g. `{"new": 300, "rehearsal:2025-05": 50, ...}` (months that gave
                no row are listed with 0). The summary is logged at INFO level either way.
            with_reference_logps (`bool`):
                Also add the columns `rehearsal_ref_chosen_logps`, `rehearsal_ref_rejected_logps` (float) and
                `rehearsal_ref_fingerprint` (string): the reference log-probs a buffer row was stored with (see the
                module docstring), `None` for the new rows and for buffer rows stored without them (not added when
                `rehearsal_ratio` is 0).

        Returns:
            `datasets.Dataset` (shuffled), or `(dataset, summary)` with `return_summary=True`.
        """
        if isinstance(new_dataset, (DatasetDict, IterableDatasetDict)):
            raise TypeError("new_dataset is a DatasetDict; pass one split, e.g. `dataset['train']`.")
        if isinstance(new_dataset, IterableDataset):
            raise TypeError(
                "new_dataset is an IterableDataset; mix_into needs its length to hold the ratio. Load the month as a "
                "map-style `datasets.Dataset` (without `streaming=True`)."
            )
        if not isinstance(new_dataset, Dataset):
            raise TypeError(f"new_dataset must be a datasets.Dataset, got {type(new_dataset).__name__}.")
        if isinstance(rehearsal_ratio, bool) or not isinstance(rehearsal_ratio, (int, float)):
            raise TypeError(f"rehearsal_ratio must be a float in [0, 1), got {rehearsal_ratio!r}.")
        if not 0 <= rehearsal_ratio < 1:
            raise ValueError(
                f"rehearsal_ratio must be in [0, 1) (the fraction of the mix taken from the buffer), got "
                f"{rehearsal_ratio!r}."
            )
        columns = list(new_dataset.column_names)
        tokenized = [column for column in _TOKENIZED_COLUMNS if column in columns]
        if tokenized:
            raise ValueError(
                f"new_dataset already has the token columns {tokenized}: mix_into works on the text / conversational "
                "columns and must run before tokenization. Pass the raw dataset and let the trainer tokenize the mix."
            )
        missing = [column for column in _REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise ValueError(f"new_dataset lacks the DPO columns {missing}; it has {columns}.")
        if rehearsal_ratio == 0:
            summary = {"new": len(new_dataset), **{f"rehearsal:{name}": 0 for name in self._infos}}
            return (new_dataset, summary) if return_summary else new_dataset
        if source_column in columns:
            raise ValueError(
                f"new_dataset already has a {source_column!r} column; rename it (`dataset.rename_column`) or pass "
                "another `source_column`."
            )
        clashing = [column for column in _STORED_REF_COLUMNS if with_reference_logps and column in columns]
        if clashing:
            raise ValueError(f"new_dataset already has the columns {clashing} that with_reference_logps=True adds.")

        n_new = len(new_dataset)
        n_buffer = round(rehearsal_ratio * n_new / (1 - rehearsal_ratio))
        if n_buffer > len(self):
            logger.warning(
                "rehearsal_ratio=%s asks for %d buffer rows next to %d new rows, but the buffer holds only %d; using "
                "all of them (a rehearsal fraction of %.3f).",
                rehearsal_ratio,
                n_buffer,
                n_new,
                len(self),
                len(self) / (n_new + len(self)) if n_new + len(self) else 0.0,
            )
            n_buffer = len(self)
        drawn = self.sample(n_buffer, seed=seed)
        self._check_mix_format(new_dataset, drawn)

        features = new_dataset.features.copy()
        features[source_column] = Value("string")
        stored_features = {
            STORED_REF_CHOSEN: Value("float64"),
            STORED_REF_REJECTED: Value("float64"),
            STORED_REF_FINGERPRINT: Value("string"),
        }
        if with_reference_logps:
            features.update(stored_features)
        lacking: set[str] = set()
        records = []
        for row in drawn:
            lacking.update(column for column in columns if column not in row)
            record = {column: row.get(column) for column in columns}
            record[source_column] = f"rehearsal:{row['month']}"
            if with_reference_logps:
                stored = row.get(REFERENCE_LOGPS_KEY) or {}
                record[STORED_REF_CHOSEN] = stored.get("chosen")
                record[STORED_REF_REJECTED] = stored.get("rejected")
                record[STORED_REF_FINGERPRINT] = stored.get("fingerprint")
            records.append(record)
        if lacking:
            logger.warning(
                "Buffer rows lack the columns %s of new_dataset; they are None in those rows.", sorted(lacking)
            )
        try:
            # Column lists rather than `from_list`, which fails on an empty list with features.
            rehearsal = Dataset.from_dict({c: [r[c] for r in records] for c in features}, features=features)
        except Exception as err:  # pyarrow / datasets raise several types for values that do not fit the features
            raise ValueError(
                f"Buffer rows do not fit the features of new_dataset ({err}). Make the months' columns agree in type, "
                f"or drop the offending columns from new_dataset. Features: {new_dataset.features}"
            ) from err
        tagged = new_dataset.add_column(source_column, ["new"] * n_new, feature=Value("string"))
        if with_reference_logps:
            for column, feature in stored_features.items():
                tagged = tagged.add_column(column, [None] * n_new, feature=feature)
        mixed = concatenate_datasets([tagged, rehearsal]).shuffle(seed=seed).flatten_indices()

        summary = {"new": n_new}
        for name in self._infos:
            summary[f"rehearsal:{name}"] = 0
        for row in drawn:
            summary[f"rehearsal:{row['month']}"] += 1
        logger.info(
            "Mixed %d new rows with %d rehearsal rows (%.1f%% of %d): %s",
            n_new,
            n_buffer,
            100 * n_buffer / len(mixed) if len(mixed) else 0.0,
            len(mixed),
            summary,
        )
        return (mixed, summary) if return_summary else mixed

    def _check_mix_format(self, new_dataset: Dataset, drawn: list[dict[str, Any]]) -> None:
        # Fail with a message rather than deep in Arrow (or, worse, in TRL's prompt extraction).
        if not drawn:
            return
        features = new_dataset.features
        new_fmt = ("prompt" in features, not (isinstance(features["chosen"], Value)))
        buffer_fmt = _row_format(drawn[0])
        if new_fmt != buffer_fmt:
            raise ValueError(
                f"new_dataset has {_describe_format(new_fmt)} but the buffer holds {_describe_format(buffer_fmt)}. "
                "TRL needs one format per dataset: convert one side (e.g. with `trl.data_utils.extract_prompt` or "
                "`maybe_apply_chat_template`) before mixing."
            )

    # ---------------------------------------------------------------------------------------------------------------
    # Changes
    # ---------------------------------------------------------------------------------------------------------------

    @_locked_change
    def add_month(
        self,
        name: str,
        dataset_or_rows: Union[Dataset, IterableDataset, Iterable[Mapping[str, Any]]],
        capacity_per_month: int,
        sampling: SamplingMethod = "reservoir",
        stratify_by: Optional[str] = None,
        seed: int = 0,
        overwrite: bool = False,
    ) -> MonthInfo:
        """
        Sample a month's preference rows into the buffer (call it once the month's data is final).

        Rows are read in a single pass, so any iterable works (a list of dicts, a `Dataset`, a streaming
        `IterableDataset`). Exact duplicates, i.e. rows with the same `(prompt, chosen, rejected)`, are dropped
        before sampling, both within the month and against the rows already in the buffer, so the sample is uniform
        over distinct new rows; the drops are logged and recorded in the manifest. Deduplication keeps a 16-byte
        digest per distinct row of the month in memory.

        If the buffer then exceeds `total_capacity`, every month is cut to a balanced share (water-filling: months
        smaller than the share keep all their rows, the others get the same number, the newest ones one more when it
        does not divide evenly); the new month is cut too when it is above the share. A month keeps the rows with
        the smallest hash of `(seed, row)`, so cuts are deterministic and nested (cutting to 300 then 200 keeps the
        same rows as cutting to 200 directly); stratified months are cut per stratum, proportionally.

        Rows that carry a valid `reference_logps` (e.g. rows exported from another buffer) keep it; reference
        log-probs of a month's rows are otherwise attached afterwards with [`~RehearsalBuffer.set_reference_logps`].

        Args:
            name (`str`):
                Name of the month (letters, digits, `.`, `_`, `-`; e.g. `"2025-06"`). Months are ordered by when they
                were added.
            dataset_or_rows (`datasets.Dataset`, `datasets.IterableDataset` or iterable of dicts):
                The month's preference rows, untokenized.
            capacity_per_month (`int`):
                Most rows kept for the month.
            sampling (`str`):
                `"reservoir"` (the default): a uniform random sample (Algorithm R). `"stratified"`: proportional
                allocation over the values of `stratify_by`, at least one row per value when `capacity_per_month`
                allows; it keeps up to `capacity_per_month` rows per value in memory while reading.
            stratify_by (`Optional[str]`):
                Column to stratify over, required with `sampling="stratified"`. Its values must be JSON-serializable.
            seed (`int`):
                Seed of the sampling: the same rows in the same order and the same seed give the same sample.
            overwrite (`bool`):
                Replace the month if the buffer already has it (it keeps its place in the month order). Otherwise
                adding an existing month raises.

        Returns:
            [`MonthInfo`]: the month's manifest entry.
        """
        self._check_month_name(name)
        if name in self._infos and not overwrite:
            raise ValueError(
                f"The rehearsal buffer already has month {name!r}. Pass overwrite=True to replace it, or remove it "
                "first with `buffer.remove_month(name)`."
            )
        if not isinstance(capacity_per_month, int) or isinstance(capacity_per_month, bool) or capacity_per_month < 1:
            raise ValueError(f"capacity_per_month must be a positive int, got {capacity_per_month!r}.")
        if sampling not in _SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {_SAMPLING_METHODS}, got {sampling!r}.")
        if sampling == "stratified" and not stratify_by:
            raise ValueError("sampling='stratified' needs the column to stratify over: pass stratify_by='<column>'.")
        if sampling == "reservoir" and stratify_by is not None:
            raise ValueError(
                f"stratify_by={stratify_by!r} is only used with sampling='stratified'; pass sampling='stratified' "
                "or drop stratify_by."
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        source = self._iter_source(dataset_or_rows)

        # Dedup against the other months only: an overwritten month is replaced, not added to.
        others = [month for month in self._infos if month != name]
        existing = {_row_key(row) for month in others for row in self._rows[month]}
        fmt = next((_row_format(self._rows[m][0]) for m in others if self._rows[m]), None)
        stats = {"seen": 0, "within": 0, "across": 0}

        def distinct_rows() -> Iterator[dict[str, Any]]:
            nonlocal fmt
            seen_keys: set[bytes] = set()
            overwritten_month = False
            for index, raw in enumerate(source):
                row = self._validate_row(raw, name, index, stratify_by)
                row_fmt = _row_format(row)
                if fmt is None:
                    fmt = row_fmt
                elif row_fmt != fmt:
                    raise PreferenceDataError(
                        f"Month {name!r}, row {index}: {_describe_format(row_fmt)}, but the buffer holds "
                        f"{_describe_format(fmt)}. All rows of a buffer must share one format (TRL needs it); convert "
                        "them first."
                    )
                stats["seen"] += 1
                key = _row_key(row)
                if key in existing:
                    stats["across"] += 1
                    continue
                if key in seen_keys:
                    stats["within"] += 1
                    continue
                seen_keys.add(key)
                if row.get("month", name) != name and not overwritten_month:
                    overwritten_month = True
                    logger.warning(
                        "Month %r: the rows have a 'month' column (e.g. %r); it is overwritten with %r.",
                        name,
                        row["month"],
                        name,
                    )
                row["month"] = name
                yield row

        rng = random.Random(seed)
        strata: Optional[dict[str, int]] = None
        if sampling == "reservoir":
            sampled = _reservoir_sample(distinct_rows(), capacity_per_month, rng)
        else:
            sampled, strata = _stratified_sample(distinct_rows(), capacity_per_month, stratify_by, rng)
        distinct = stats["seen"] - stats["within"] - stats["across"]
        logger.info(
            "Month %r: read %d rows, dropped %d duplicates within the month and %d already in the buffer; kept %d of "
            "%d distinct rows (%s sampling, seed %d).",
            name,
            stats["seen"],
            stats["within"],
            stats["across"],
            len(sampled),
            distinct,
            sampling,
            seed,
        )
        if strata is not None:
            logger.info("Month %r: rows kept per value of %r: %s", name, stratify_by, strata)
            if len(strata) > capacity_per_month:
                logger.warning(
                    "Month %r has %d values of %r but capacity_per_month=%d: some values get no row.",
                    name,
                    len(strata),
                    stratify_by,
                    capacity_per_month,
                )
        if not sampled:
            logger.warning("Month %r adds no row to the rehearsal buffer (empty, or only duplicates).", name)
        for index, row in enumerate(sampled):
            if _has_reference_logps(row):
                row[REFERENCE_LOGPS_KEY] = _reference_entry(row[REFERENCE_LOGPS_KEY], f"Month {name!r}, row {index}")
            else:
                row.pop(REFERENCE_LOGPS_KEY, None)

        pending = {
            "name": name,
            "sampling": sampling,
            "stratify_by": stratify_by,
            "seed": seed,
            "capacity": capacity_per_month,
            "sampled": len(sampled),
            "rows_seen": stats["seen"],
            "duplicates_within": stats["within"],
            "duplicates_across": stats["across"],
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "reference": None,
        }
        # New state: same month order, an overwritten month stays in place.
        state: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for month, info in self._infos.items():
            state[month] = (self._info_fields(info), self._rows[month])
        state[name] = (pending, sampled)
        self._enforce_total_capacity(state)
        self._commit(state)
        return self._infos[name]

    @_locked_change
    def set_reference_logps(
        self, month: str, values: Sequence[Optional[Mapping[str, Any]]], reference: Optional[str] = None
    ) -> MonthInfo:
        """
        Store reference log-probs with the rows of `month` (one atomic commit, like every change).

        [`ContinualDPOTrainer.finish_month`] calls it with the month's own DPO reference, so that later months score
        the rehearsed rows against it (`rehearsal_reference="own_month"`). It can also annotate a month of a
        version-1 buffer, given the model that was that month's reference.

        Args:
            month (`str`):
                A month of the buffer.
            values (sequence of `dict` or `None`):
                One per row, in the order of [`~RehearsalBuffer.rows`]`(month)`: `{"chosen": float, "rejected":
                float, "fingerprint": str}` (summed log-probs of the completions, as TRL's `ref_chosen_logps` /
                `ref_rejected_logps`, and a digest of the token ids they were computed on), or `None` to store none.
            reference (`str`, *optional*):
                Description of the model they come from, recorded in the manifest.

        Returns:
            [`MonthInfo`]: the month's manifest entry (`reference_logps` counts the rows that carry them).
        """
        self._check_known(month)
        rows = copy.deepcopy(self._rows[month])
        values = list(values)
        if len(values) != len(rows):
            raise ValueError(f"Month {month!r} holds {len(rows)} rows, got {len(values)} reference values.")
        for index, (row, value) in enumerate(zip(rows, values)):
            row.pop(REFERENCE_LOGPS_KEY, None)
            if value is not None:
                row[REFERENCE_LOGPS_KEY] = _reference_entry(value, f"Month {month!r}, row {index}")
        state = {name: (self._info_fields(info), self._rows[name]) for name, info in self._infos.items()}
        fields = state[month][0]
        fields["reference"] = reference if any(_has_reference_logps(row) for row in rows) else None
        state[month] = (fields, rows)
        self._commit(state)
        return self._infos[month]

    @_locked_change
    def remove_month(self, name: str) -> None:
        """Remove a month from the buffer (e.g. to honour a data deletion request)."""
        self._check_known(name)
        state = {
            month: (self._info_fields(info), self._rows[month]) for month, info in self._infos.items() if month != name
        }
        self._commit(state)
        logger.info("Removed month %r from the rehearsal buffer in %s.", name, self.buffer_dir)

    # ---------------------------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def _manifest_path(self) -> Path:
        return self.buffer_dir / MANIFEST_FILENAME

    def _check_known(self, month: str) -> None:
        if month not in self._infos:
            raise KeyError(f"Month {month!r} is not in the rehearsal buffer; it has {self.months}.")

    @staticmethod
    def _check_month_name(name: Any) -> None:
        if not isinstance(name, str) or not is_month_name(name):
            raise ValueError(
                f"Invalid month name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit (e.g. '2025-06'); the name is part of a file name."
            )

    @staticmethod
    def _iter_source(dataset_or_rows: Any) -> Iterable[Any]:
        if isinstance(dataset_or_rows, (DatasetDict, IterableDatasetDict)):
            raise TypeError("Got a DatasetDict; pass one split, e.g. `dataset['train']`.")
        if isinstance(dataset_or_rows, (Dataset, IterableDataset)):
            # Python objects, whatever format (torch, numpy...) the dataset was set to.
            return dataset_or_rows.with_format(None)
        if isinstance(dataset_or_rows, (str, bytes, Mapping)) or not isinstance(dataset_or_rows, Iterable):
            raise TypeError(
                "dataset_or_rows must be a datasets.Dataset, a datasets.IterableDataset or an iterable of row dicts, "
                f"got {type(dataset_or_rows).__name__}."
            )
        return dataset_or_rows

    @staticmethod
    def _validate_row(raw: Any, month: str, index: int, stratify_by: Optional[str]) -> dict[str, Any]:
        """A copy of `raw`, checked against the package's one preference-row schema
        ([`~peft_selective.continual.preference_data.check_preference_row`], which raises `PreferenceDataError`)."""
        where = f"Month {month!r}, row {index}"
        check_preference_row(raw, where)
        row = dict(raw)  # a copy: the `month` column is set on it, never on the caller's dict
        if stratify_by is not None and stratify_by not in row:
            raise ValueError(f"{where}: no {stratify_by!r} column to stratify by (the row has {list(row)}).")
        return row

    @staticmethod
    def _info_fields(info: MonthInfo) -> dict[str, Any]:
        fields = dataclasses.asdict(info)
        for computed in ("file", "count", "sha256", "reference_logps"):
            del fields[computed]
        return fields

    def _enforce_total_capacity(self, state: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
        if self.total_capacity is None:
            return
        names = list(state)
        counts = [len(state[month][1]) for month in names]
        if sum(counts) <= self.total_capacity:
            return
        targets = _balanced_allocation(self.total_capacity, counts)
        logger.info(
            "The rehearsal buffer would hold %d rows, more than total_capacity=%d: shrinking the months to %s.",
            sum(counts),
            self.total_capacity,
            dict(zip(names, targets)),
        )
        if self.total_capacity < len(names):
            logger.warning(
                "total_capacity=%d is smaller than the number of months (%d): the oldest months keep no row.",
                self.total_capacity,
                len(names),
            )
        for month, count, target in zip(names, counts, targets):
            if target < count:
                fields, rows = state[month]
                state[month] = (fields, self._shrink(rows, target, fields["seed"], fields["stratify_by"]))

    @staticmethod
    def _shrink(
        rows: list[dict[str, Any]], target: int, seed: int, stratify_by: Optional[str]
    ) -> list[dict[str, Any]]:
        # Keep the rows with the smallest hash of (seed, row): deterministic, independent of the order of earlier cuts,
        # and nested (a smaller cut is a subset of a larger one).
        salt = f"{seed}\0".encode()

        def priority(index: int) -> tuple[bytes, int]:
            digest = hashlib.blake2b(salt + _row_key(rows[index]), digest_size=8).digest()
            return digest, index

        if stratify_by is None:
            groups = [list(range(len(rows)))]
            alloc = [target]
        else:
            by_label: dict[str, list[int]] = {}
            for index, row in enumerate(rows):
                by_label.setdefault(_stratum_label(row.get(stratify_by)), []).append(index)
            groups = list(by_label.values())
            alloc = _proportional_allocation(target, [len(group) for group in groups])
        keep = sorted(index for group, k in zip(groups, alloc) for index in sorted(group, key=priority)[:k])
        return [rows[index] for index in keep]

    def _commit(self, state: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
        """Write `state` (month -> (manifest fields, rows)) to disk, then adopt it in memory.

        Month files are named after their content and never rewritten in place, so the files of the current manifest
        stay intact until the new manifest replaces it (the commit point). If anything fails, the directory and this
        object keep the previous state; stray temp / unreferenced files are ignored on load and cleaned up by the
        next successful commit."""
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        current_files = {info.file for info in self._infos.values()}
        infos: dict[str, MonthInfo] = {}
        rows_by_month: dict[str, list[dict[str, Any]]] = {}
        for name, (fields, rows) in state.items():
            data = _serialize_rows(rows, name)
            sha256 = hashlib.sha256(data).hexdigest()
            filename = _month_filename(name, sha256)
            # Same name means same bytes: a month whose content did not change is not rewritten.
            if filename not in current_files or not (self.buffer_dir / filename).exists():
                atomic_write(self.buffer_dir / filename, data)
            stored = sum(_has_reference_logps(row) for row in rows)
            infos[name] = MonthInfo(file=filename, count=len(rows), sha256=sha256, reference_logps=stored, **fields)
            # Parsed back from the bytes, so that memory holds exactly what a later load will see.
            rows_by_month[name] = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        fsync_dir(self.buffer_dir)  # the month files' renames must be durable before the manifest points at them
        manifest = {
            "format_version": FORMAT_VERSION,
            "total_capacity": self.total_capacity,
            "months": [dataclasses.asdict(info) for info in infos.values()],
        }
        atomic_write(self._manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        fsync_dir(self.buffer_dir)
        self._infos, self._rows = infos, rows_by_month
        self._cleanup()

    def _cleanup(self) -> None:
        # Best effort: what remains is ignored by loads and retried at the next commit.
        referenced = {info.file for info in self._infos.values()}
        for path in self.buffer_dir.iterdir():
            stale_month = _MONTH_FILE_RE.match(path.name) and path.name not in referenced
            stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            if stale_month or stale_tmp:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _load(self) -> None:
        manifest_path = self._manifest_path
        if self.buffer_dir.exists() and not self.buffer_dir.is_dir():
            raise NotADirectoryError(f"{self.buffer_dir} exists and is not a directory; pass a directory path.")
        if not manifest_path.exists():
            orphans = sorted(p.name for p in self.buffer_dir.glob("month=*.jsonl")) if self.buffer_dir.is_dir() else []
            if orphans:
                raise RehearsalBufferError(
                    f"{self.buffer_dir} has month files ({orphans[:3]}...) but no {MANIFEST_FILENAME}: the manifest was "
                    "deleted, or this is not a rehearsal buffer. Restore the manifest, or use an empty directory."
                )
            return
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RehearsalBufferError(
                f"{manifest_path} is not valid JSON ({err}): the manifest is corrupted. Restore the buffer directory "
                "from a backup (month files alone cannot be trusted without their manifest)."
            ) from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("months"), list):
            raise RehearsalBufferError(f"{manifest_path} is not a rehearsal buffer manifest (no 'months' list).")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise RehearsalBufferError(f"{manifest_path} has no valid 'format_version' (got {version!r}).")
        if version > FORMAT_VERSION:
            raise RehearsalBufferError(
                f"{manifest_path} has format version {version}, newer than the {FORMAT_VERSION} this version of "
                "peft-selective reads. Upgrade peft-selective."
            )
        infos: dict[str, MonthInfo] = {}
        rows_by_month: dict[str, list[dict[str, Any]]] = {}
        for entry in manifest["months"]:
            info = MonthInfo._from_manifest(entry, manifest_path)
            if info.name in infos:
                raise RehearsalBufferError(f"{manifest_path} lists month {info.name!r} twice.")
            infos[info.name] = info
            rows_by_month[info.name] = self._load_month(info, manifest_path)
        self._infos, self._rows = infos, rows_by_month
        logger.debug("Loaded the rehearsal buffer in %s: %s", self.buffer_dir, {m: i.count for m, i in infos.items()})

    def _load_month(self, info: MonthInfo, manifest_path: Path) -> list[dict[str, Any]]:
        path = self.buffer_dir / info.file
        hint = "Restore the buffer directory from a backup, or remove the month from the manifest."
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RehearsalBufferError(
                f"{path}, listed in {manifest_path} for month {info.name!r}, does not exist. {hint}"
            ) from None
        lines = data.decode("utf-8", errors="replace").splitlines()
        if len(lines) != info.count:
            raise RehearsalBufferError(
                f"{path} has {len(lines)} rows but {manifest_path} records {info.count} for month {info.name!r}: the "
                f"file was truncated or edited. {hint}"
            )
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != info.sha256:
            raise RehearsalBufferError(
                f"{path} does not match the SHA-256 recorded in {manifest_path} for month {info.name!r}: the file is "
                f"corrupted or was edited. {hint} If you edited it on purpose, open the buffer with "
                "verify_checksums=False."
            )
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RehearsalBufferError(f"{path}, line {number}: invalid JSON ({err}). {hint}") from err
            problem = preference_row_problem(row)  # the same schema the rows were checked against when added
            if problem is not None:
                raise RehearsalBufferError(f"{path}, line {number}: not a valid preference row: {problem}. {hint}")
            if _has_reference_logps(row):
                problem = _check_reference_logps(row[REFERENCE_LOGPS_KEY])
                if problem is not None:
                    raise RehearsalBufferError(f"{path}, line {number}: {REFERENCE_LOGPS_KEY!r} {problem}. {hint}")
            rows.append(row)
        return rows
