"""Tests of the rehearsal buffer of continual DPO (`peft_selective.continual.rehearsal`): pure Python + datasets, no model."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter

import pytest
import torch
from datasets import Dataset

from peft_selective.continual.rehearsal import (
    FORMAT_VERSION,
    MANIFEST_FILENAME,
    RehearsalBuffer,
    RehearsalBufferError,
    _balanced_allocation,
    _proportional_allocation,
    _reservoir_sample,
)


def make_rows(n, tag="m", start=0, **extra):
    return [
        {"prompt": f"{tag} prompt {i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}", **extra}
        for i in range(start, start + n)
    ]


def make_conversational(n, tag="c"):
    return [
        {
            "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": f"{tag} q {i}"}],
            "chosen": [{"role": "assistant", "content": f"{tag} good {i}"}],
            "rejected": [{"role": "assistant", "content": f"{tag} bad {i}"}],
        }
        for i in range(n)
    ]


def month_files(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("month="))


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_reservoir_size_and_stream_order():
    sample = _reservoir_sample(range(1000), 50, random.Random(0))
    assert len(sample) == 50 and len(set(sample)) == 50
    assert sample == sorted(sample)  # kept in stream order
    assert _reservoir_sample(range(7), 50, random.Random(0)) == list(range(7))  # fewer rows than capacity: all


def test_reservoir_uniform_over_blocks():
    # 100 items in 10 blocks of 10, samples of 10 over 400 seeds: each block expects 400 picks (std ~18).
    hits = Counter()
    for seed in range(400):
        for item in _reservoir_sample(range(100), 10, random.Random(seed)):
            hits[item // 10] += 1
    assert sorted(hits) == list(range(10))
    assert all(320 <= hits[block] <= 480 for block in range(10)), hits
    # Items at the very start and end of the stream are not favoured either.
    first = sum(0 in _reservoir_sample(range(100), 10, random.Random(s)) for s in range(400))
    last = sum(99 in _reservoir_sample(range(100), 10, random.Random(s)) for s in range(400))
    assert 15 <= first <= 70 and 15 <= last <= 70  # expected 40 each


def test_add_month_reservoir_size_and_determinism(tmp_path):
    rows = make_rows(200)
    a, b, c = (RehearsalBuffer(tmp_path / name) for name in "abc")
    info = a.add_month("2025-01", rows, capacity_per_month=30, seed=7)
    b.add_month("2025-01", iter(rows), capacity_per_month=30, seed=7)  # a one-pass iterator works too
    c.add_month("2025-01", rows, capacity_per_month=30, seed=8)
    assert len(a) == 30 and info.count == info.sampled == 30 and info.rows_seen == 200
    assert a.rows() == b.rows()
    assert a.rows() != c.rows()
    assert all(row["month"] == "2025-01" for row in a.rows())
    assert "month" not in rows[0]  # the caller's dicts are not modified


def test_add_month_from_datasets(tmp_path):
    rows = make_rows(40)
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", Dataset.from_list(rows).with_format("numpy"), capacity_per_month=10)
    buffer.add_month("m2", Dataset.from_list(make_rows(40, tag="x")).to_iterable_dataset(), capacity_per_month=10)
    assert len(buffer) == 20
    assert all(isinstance(row["chosen"], str) for row in buffer.rows())


def test_proportional_allocation():
    assert _proportional_allocation(10, [50, 30, 20]) == [5, 3, 2]
    assert _proportional_allocation(100, [5, 7]) == [5, 7]  # room for everything
    assert _proportional_allocation(4, [10, 10, 10]) == [2, 1, 1]  # largest remainder, ties to the earlier stratum
    # One per stratum even for tiny strata, taken back from the large one.
    assert _proportional_allocation(10, [991] + [1] * 9) == [1] * 10
    assert _proportional_allocation(10, [60, 30, 9, 1]) == [5, 3, 1, 1]
    # Less room than strata: the largest strata get one each.
    assert _proportional_allocation(2, [1, 5, 3]) == [0, 1, 1]
    for total in range(1, 60):
        alloc = _proportional_allocation(total, [40, 11, 5, 2, 1])
        assert sum(alloc) == total and all(0 <= a <= s for a, s in zip(alloc, [40, 11, 5, 2, 1]))


def test_balanced_allocation():
    assert _balanced_allocation(30, [100, 100, 100]) == [10, 10, 10]
    assert _balanced_allocation(31, [100, 100, 100]) == [10, 10, 11]  # leftover to the newest
    assert _balanced_allocation(30, [4, 100, 100]) == [4, 13, 13]  # a small month gives all, others fill in
    assert _balanced_allocation(2, [5, 5, 5]) == [0, 1, 1]
    assert _balanced_allocation(50, [4, 5]) == [4, 5]


def test_stratified_allocation(tmp_path):
    rows = []
    for category, n in [("code", 60), ("math", 30), ("chat", 9), ("safety", 1)]:
        rows += make_rows(n, tag=category, category=category)
    random.Random(0).shuffle(rows)
    buffer = RehearsalBuffer(tmp_path)
    info = buffer.add_month("m", rows, capacity_per_month=10, sampling="stratified", stratify_by="category", seed=3)
    assert (info.sampling, info.stratify_by, info.count) == ("stratified", "category", 10)
    assert Counter(row["category"] for row in buffer.rows()) == {"code": 5, "math": 3, "chat": 1, "safety": 1}
    again = RehearsalBuffer(tmp_path / "again")
    again.add_month("m", rows, capacity_per_month=10, sampling="stratified", stratify_by="category", seed=3)
    assert again.rows() == buffer.rows()


def test_sampling_argument_errors(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    with pytest.raises(ValueError, match="stratify_by='<column>'"):
        buffer.add_month("m", make_rows(5), capacity_per_month=2, sampling="stratified")
    with pytest.raises(ValueError, match="only used with sampling='stratified'"):
        buffer.add_month("m", make_rows(5), capacity_per_month=2, stratify_by="category")
    with pytest.raises(ValueError, match="no 'category' column"):
        buffer.add_month("m", make_rows(5), capacity_per_month=2, sampling="stratified", stratify_by="category")
    with pytest.raises(ValueError, match="capacity_per_month"):
        buffer.add_month("m", make_rows(5), capacity_per_month=0)
    with pytest.raises(ValueError, match="Invalid month name"):
        buffer.add_month("../evil", make_rows(5), capacity_per_month=2)
    with pytest.raises(ValueError, match=r"missing the DPO columns \['rejected'\]"):
        buffer.add_month("m", [{"prompt": "p", "chosen": "c"}], capacity_per_month=2)
    with pytest.raises(TypeError, match="one split"):
        from datasets import DatasetDict

        buffer.add_month("m", DatasetDict({"train": Dataset.from_list(make_rows(2))}), capacity_per_month=2)
    assert len(buffer) == 0 and not (tmp_path / MANIFEST_FILENAME).exists()  # nothing written on errors


# ---------------------------------------------------------------------------------------------------------------------
# Dedup
# ---------------------------------------------------------------------------------------------------------------------


def test_dedup_within_and_across_months(tmp_path, caplog):
    buffer = RehearsalBuffer(tmp_path)
    rows = make_rows(10)
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.rehearsal"):
        info = buffer.add_month("m1", rows + rows[:4] + [dict(rows[0], score=1.0)], capacity_per_month=100)
    assert info.count == 10 and info.duplicates_within == 5 and info.duplicates_across == 0
    assert "dropped 5 duplicates within the month" in caplog.text
    # Month 2 repeats three of month 1's rows: dropped as already in the buffer.
    info = buffer.add_month("m2", rows[:3] + make_rows(5, tag="new"), capacity_per_month=100)
    assert info.count == 5 and info.duplicates_across == 3 and info.duplicates_within == 0
    assert {row["prompt"] for row in buffer.rows("m2")} == {f"new prompt {i}" for i in range(5)}


def test_dedup_conversational_normalises_key_order(tmp_path):
    rows = make_conversational(3)
    reordered = [{k: [dict(reversed(list(m.items()))) for m in v] for k, v in row.items()} for row in rows]
    assert json.dumps(reordered[0]) != json.dumps(rows[0])
    buffer = RehearsalBuffer(tmp_path)
    info = buffer.add_month("m1", rows + reordered, capacity_per_month=10)
    assert info.count == 3 and info.duplicates_within == 3
    assert buffer.add_month("m2", reordered, capacity_per_month=10).duplicates_across == 3


def test_existing_month_needs_overwrite(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_rows(5, tag="a"), capacity_per_month=10)
    buffer.add_month("m2", make_rows(5, tag="b"), capacity_per_month=10)
    with pytest.raises(ValueError, match="overwrite=True"):
        buffer.add_month("m1", make_rows(5, tag="c"), capacity_per_month=10)
    # Overwrite replaces the month in place and dedups against the other months only.
    info = buffer.add_month("m1", make_rows(5, tag="a") + make_rows(2, tag="c"), capacity_per_month=10, overwrite=True)
    assert buffer.months == ["m1", "m2"] and info.count == 7 and info.duplicates_across == 0
    assert len(month_files(tmp_path)) == 2  # the replaced file was cleaned up
    buffer.remove_month("m1")
    assert buffer.months == ["m2"] and RehearsalBuffer(tmp_path).months == ["m2"]


# ---------------------------------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------------------------------


def test_persistence_round_trip(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("2025-01", make_rows(50, tag="a", score=0.5), capacity_per_month=20, seed=1)
    buffer.add_month("2025-02", make_rows(8, tag="b"), capacity_per_month=20, seed=2)
    loaded = RehearsalBuffer(tmp_path)
    assert loaded.months == ["2025-01", "2025-02"] and len(loaded) == 28
    assert loaded.rows() == buffer.rows()
    assert loaded.month_info("2025-01") == buffer.month_info("2025-01")
    assert loaded.rows("2025-01")[0]["score"] == 0.5  # extra columns are kept
    manifest = json.loads((tmp_path / MANIFEST_FILENAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert [(m["name"], m["count"], m["sampling"], m["seed"]) for m in manifest["months"]] == [
        ("2025-01", 20, "reservoir", 1),
        ("2025-02", 8, "reservoir", 2),
    ]
    dataset = loaded.to_dataset()
    assert len(dataset) == 28 and dataset.column_names == ["prompt", "chosen", "rejected", "score", "month"]
    assert dataset["score"][-1] is None  # the month without `score`
    assert RehearsalBuffer(tmp_path / "does-not-exist").months == []


def test_conversational_round_trip(tmp_path):
    rows = make_conversational(6)
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m", Dataset.from_list(rows), capacity_per_month=10)
    loaded = RehearsalBuffer(tmp_path)
    assert [{k: v for k, v in row.items() if k != "month"} for row in loaded.rows()] == rows
    assert loaded.to_dataset()[0]["prompt"] == rows[0]["prompt"]
    with pytest.raises(ValueError, match="share one format"):
        buffer.add_month("plain", make_rows(2), capacity_per_month=10)


def test_crash_mid_write_keeps_previous_state(tmp_path, monkeypatch):
    buffer = RehearsalBuffer(tmp_path, total_capacity=20)
    buffer.add_month("m1", make_rows(30, tag="a"), capacity_per_month=10)
    buffer.add_month("m2", make_rows(30, tag="b"), capacity_per_month=10)
    before = buffer.rows()
    files_before = month_files(tmp_path)
    real_replace = os.replace

    # Adding m3 shrinks m1 and m2 (3 month files) then writes the manifest: crash at each of those 4 renames.
    for crash_at in range(1, 5):
        calls = []

        def failing_replace(src, dst, crash_at=crash_at, calls=calls):
            calls.append(dst)
            if len(calls) == crash_at:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="simulated crash"):
            buffer.add_month("m3", make_rows(30, tag="c"), capacity_per_month=10)
        monkeypatch.setattr(os, "replace", real_replace)
        assert buffer.months == ["m1", "m2"] and buffer.rows() == before  # memory unchanged
        reloaded = RehearsalBuffer(tmp_path, total_capacity=20)
        assert reloaded.months == ["m1", "m2"] and reloaded.rows() == before
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # The next successful write commits and removes the files the crashes left behind.
    buffer.add_month("m3", make_rows(30, tag="c"), capacity_per_month=10)
    assert RehearsalBuffer(tmp_path).months == ["m1", "m2", "m3"]
    assert len(month_files(tmp_path)) == 3 and not set(month_files(tmp_path)) & set(files_before)


def test_stray_files_are_ignored(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_rows(5), capacity_per_month=10)
    (tmp_path / "month=m1.0123456789ab.jsonl").write_text("garbage\n")  # orphan of a crashed write
    (tmp_path / ".manifest.json.xyz.tmp").write_text("{")
    assert RehearsalBuffer(tmp_path).rows() == buffer.rows()
    buffer.add_month("m2", make_rows(5, tag="b"), capacity_per_month=10)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("month=")) == [MANIFEST_FILENAME]
    assert len(month_files(tmp_path)) == 2


def test_corrupted_manifest_gives_clear_error(tmp_path):
    RehearsalBuffer(tmp_path).add_month("m1", make_rows(5), capacity_per_month=10)
    manifest_path = tmp_path / MANIFEST_FILENAME
    good = manifest_path.read_text()

    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(RehearsalBufferError, match=r"manifest\.json is not valid JSON"):
        RehearsalBuffer(tmp_path)

    manifest = json.loads(good)
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RehearsalBufferError, match="Upgrade peft-selective"):
        RehearsalBuffer(tmp_path)

    manifest = json.loads(good)
    manifest["months"][0]["file"] = "../../etc/passwd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RehearsalBufferError, match="invalid file name"):
        RehearsalBuffer(tmp_path)

    manifest_path.unlink()
    with pytest.raises(RehearsalBufferError, match="no manifest.json"):
        RehearsalBuffer(tmp_path)


def test_mismatched_month_file_gives_clear_error(tmp_path):
    RehearsalBuffer(tmp_path).add_month("m1", make_rows(5), capacity_per_month=10)
    (path,) = (tmp_path / name for name in month_files(tmp_path))
    good = path.read_text()

    path.write_text("".join(good.splitlines(keepends=True)[:-1]))  # truncated
    with pytest.raises(RehearsalBufferError, match=rf"{path.name} has 4 rows but .* records 5"):
        RehearsalBuffer(tmp_path)

    path.write_text(good.replace("good 0", "edited"))  # same count, different content
    with pytest.raises(RehearsalBufferError, match=rf"{path.name} does not match the SHA-256.*verify_checksums=False"):
        RehearsalBuffer(tmp_path)
    assert RehearsalBuffer(tmp_path, verify_checksums=False).rows()[0]["chosen"] == "m edited"

    path.write_text(good.replace('{"prompt"', "{prompt", 1))
    with pytest.raises(RehearsalBufferError, match=rf"{path.name}, line 1: invalid JSON"):
        RehearsalBuffer(tmp_path, verify_checksums=False)

    path.unlink()
    with pytest.raises(RehearsalBufferError, match=rf"{path.name}, listed in .* does not exist"):
        RehearsalBuffer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Total capacity
# ---------------------------------------------------------------------------------------------------------------------


def test_total_capacity_shrinks_months_evenly(tmp_path):
    buffer = RehearsalBuffer(tmp_path, total_capacity=25)
    buffer.add_month("m1", make_rows(40, tag="a"), capacity_per_month=10)
    buffer.add_month("m2", make_rows(40, tag="b"), capacity_per_month=10)
    m1_before = buffer.rows("m1")
    info = buffer.add_month("m3", make_rows(40, tag="c"), capacity_per_month=10)
    assert [buffer.month_info(m).count for m in buffer.months] == [8, 8, 9]  # leftover row to the newest
    assert info.sampled == 10 and info.count == 9
    m1_after = buffer.rows("m1")
    assert all(row in m1_before for row in m1_after)  # a subset, in the same order
    assert [row for row in m1_before if row in m1_after] == m1_after
    buffer.add_month("m4", make_rows(3, tag="d"), capacity_per_month=10)  # small month keeps all its rows
    assert [buffer.month_info(m).count for m in buffer.months] == [7, 7, 8, 3]
    # Cuts are deterministic and nested: the same as cutting m1 straight to 7.
    direct = RehearsalBuffer(tmp_path / "direct", total_capacity=7)
    direct.add_month("m1", make_rows(40, tag="a"), capacity_per_month=10)
    assert direct.rows("m1") == buffer.rows("m1")
    assert RehearsalBuffer(tmp_path, total_capacity=25).rows() == buffer.rows()


def test_total_capacity_keeps_strata(tmp_path):
    rows = make_rows(90, tag="big", category="big") + make_rows(10, tag="rare", category="rare")
    buffer = RehearsalBuffer(tmp_path, total_capacity=12)
    buffer.add_month("m1", rows, capacity_per_month=20, sampling="stratified", stratify_by="category")
    assert Counter(row["category"] for row in buffer.rows()) == {"big": 11, "rare": 1}
    buffer.add_month("m2", make_rows(20, tag="x"), capacity_per_month=10)
    assert Counter(row["category"] for row in buffer.rows("m1")) == {"big": 5, "rare": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Sampling from the buffer and mixing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_month_buffer(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("2025-01", make_rows(200, tag="jan", score=1.0), capacity_per_month=80)
    buffer.add_month("2025-02", make_rows(200, tag="feb", score=2.0), capacity_per_month=80)
    return buffer


def test_sample_is_balanced_and_deterministic(two_month_buffer):
    rows = two_month_buffer.sample(50, seed=3)
    assert Counter(row["month"] for row in rows) == {"2025-01": 25, "2025-02": 25}
    assert len({row["prompt"] for row in rows}) == 50
    assert two_month_buffer.sample(50, seed=3) == rows and two_month_buffer.sample(50, seed=4) != rows
    with pytest.raises(ValueError, match="at most len"):
        two_month_buffer.sample(161)


def test_mix_into_holds_the_ratio(two_month_buffer, caplog):
    new = Dataset.from_list(make_rows(300, tag="new", score=3.0))
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.rehearsal"):
        mixed, summary = two_month_buffer.mix_into(new, rehearsal_ratio=0.25, seed=0, return_summary=True)
    assert len(mixed) == 400 and mixed.column_names == new.column_names + ["source"]
    assert mixed.features["prompt"] == new.features["prompt"]
    sources = Counter(mixed["source"])
    assert sources == {"new": 300, "rehearsal:2025-01": 50, "rehearsal:2025-02": 50} == summary
    assert sum(n for s, n in sources.items() if s.startswith("rehearsal:")) / len(mixed) == 0.25
    assert "Mixed 300 new rows with 100 rehearsal rows" in caplog.text
    # Rows keep their content and the mix is shuffled, deterministically.
    for row in mixed:
        month = row["source"].removeprefix("rehearsal:")
        assert row["score"] == {"new": 3.0, "2025-01": 1.0, "2025-02": 2.0}[month]
    assert mixed["source"][:300] != ["new"] * 300
    assert two_month_buffer.mix_into(new, 0.25, seed=0)["prompt"] == mixed["prompt"]
    assert two_month_buffer.mix_into(new, 0.25, seed=1)["prompt"] != mixed["prompt"]


def test_mix_into_edge_cases(two_month_buffer, tmp_path, caplog):
    new = Dataset.from_list(make_rows(300, tag="new", score=3.0))
    assert two_month_buffer.mix_into(new, 0.0) is new
    assert two_month_buffer.mix_into(new, 0, return_summary=True) == (
        new,
        {"new": 300, "rehearsal:2025-01": 0, "rehearsal:2025-02": 0},
    )
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            two_month_buffer.mix_into(new, ratio)
    # More than the buffer holds: capped, with a warning.
    with caplog.at_level(logging.WARNING, logger="peft_selective.continual.rehearsal"):
        mixed = two_month_buffer.mix_into(new, 0.5)
    assert len(mixed) == 460 and "holds only 160" in caplog.text
    # A `month` column in the new data is kept, with the buffer rows' months.
    dated = Dataset.from_list(make_rows(30, tag="new", month="2025-03"))
    mixed = two_month_buffer.mix_into(dated, 0.5)
    assert mixed.column_names == ["prompt", "chosen", "rejected", "month", "source"]
    assert Counter(mixed["month"]) == {"2025-03": 30, "2025-01": 15, "2025-02": 15}
    # An empty buffer still tags the rows, so the columns do not depend on the buffer's size.
    assert RehearsalBuffer(tmp_path / "empty").mix_into(new, 0.2).column_names == new.column_names + ["source"]
    with pytest.raises(ValueError, match="before tokenization"):
        two_month_buffer.mix_into(new.add_column("prompt_ids", [[1]] * 300), 0.25)
    with pytest.raises(ValueError, match="already has a 'source' column"):
        two_month_buffer.mix_into(new.add_column("source", ["x"] * 300), 0.25)
    with pytest.raises(ValueError, match="conversational rows with an explicit prompt but the buffer holds plain"):
        two_month_buffer.mix_into(Dataset.from_list(make_conversational(30)), 0.25)
    implicit = Dataset.from_list([{"chosen": f"p{i} c", "rejected": f"p{i} r"} for i in range(30)])
    with pytest.raises(ValueError, match="implicit prompt"):
        two_month_buffer.mix_into(implicit, 0.25)


def test_mix_into_conversational(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_conversational(20, tag="old"), capacity_per_month=20)
    new = Dataset.from_list(make_conversational(60, tag="new"))
    mixed = buffer.mix_into(new, rehearsal_ratio=0.25, seed=0)
    assert len(mixed) == 80 and Counter(mixed["source"]) == {"new": 60, "rehearsal:m1": 20}
    old = [row for row in mixed if row["source"] == "rehearsal:m1"]
    assert {row["prompt"][1]["content"] for row in old} == {f"old q {i}" for i in range(20)}
    assert old[0]["chosen"][0]["role"] == "assistant"


# ---------------------------------------------------------------------------------------------------------------------
# Stored reference log-probs (format version 2)
# ---------------------------------------------------------------------------------------------------------------------


def _reference(i, month="a"):
    # float32 values, as TRL computes them: stored as Python floats, they come back exactly
    value = float(torch.tensor(-1.0 / (i + 3), dtype=torch.float32))
    return {"chosen": value, "rejected": value - 1.5, "fingerprint": f"{month}{i}"}


def test_reference_logps_round_trip_exactly(tmp_path):
    buffer = RehearsalBuffer(tmp_path, total_capacity=12)
    buffer.add_month("m1", make_rows(10, tag="a"), capacity_per_month=10)
    assert buffer.month_info("m1").reference_logps == 0 and "reference_logps" not in buffer.rows("m1")[0]
    values = [_reference(i) if i != 3 else None for i in range(10)]
    info = buffer.set_reference_logps("m1", values, reference="base")
    assert info.reference_logps == 9 and info.reference == "base"
    loaded = RehearsalBuffer(tmp_path, total_capacity=12)
    assert loaded.month_info("m1") == info
    rows = loaded.rows("m1")
    assert [row.get("reference_logps") for row in rows] == values
    assert torch.equal(
        torch.tensor([row["reference_logps"]["chosen"] for row in rows if row.get("reference_logps")]),
        torch.tensor([value["chosen"] for value in values if value], dtype=torch.float32),
    )
    # a later month shrinks m1: the kept rows keep their values (and the count follows)
    buffer.add_month("m2", make_rows(10, tag="b"), capacity_per_month=10)
    kept = buffer.rows("m1")
    assert len(kept) == 6 and buffer.month_info("m1").reference_logps == sum("reference_logps" in r for r in kept)
    assert all(
        row["reference_logps"] == values[int(row["prompt"].split()[-1])] for row in kept if "reference_logps" in row
    )
    # edited values are caught by the checksum, malformed ones by the row check
    path = tmp_path / buffer.month_info("m1").file
    text = path.read_text()
    path.write_text(text.replace('"fingerprint": "a', '"fingerprint": "x', 1))
    with pytest.raises(RehearsalBufferError, match="SHA-256"):
        RehearsalBuffer(tmp_path)
    path.write_text(re.sub(r'"fingerprint": "a\d+"', '"fingerprint": 7', text, count=1))
    with pytest.raises(RehearsalBufferError, match="'fingerprint' must be a non-empty string"):
        RehearsalBuffer(tmp_path, verify_checksums=False)


def test_reference_logps_argument_errors(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_rows(3), capacity_per_month=10)
    with pytest.raises(ValueError, match="holds 3 rows, got 2"):
        buffer.set_reference_logps("m1", [None, None])
    with pytest.raises(ValueError, match="row 1: 'reference_logps' 'chosen' must be a finite number"):
        buffer.set_reference_logps("m1", [None, {"chosen": float("nan"), "rejected": 0.0, "fingerprint": "f"}, None])
    with pytest.raises(ValueError, match="exactly the keys"):
        buffer.set_reference_logps("m1", [{"chosen": 0.0}, None, None])
    with pytest.raises(KeyError, match="not in the rehearsal buffer"):
        buffer.set_reference_logps("m9", [])
    assert buffer.month_info("m1").reference_logps == 0  # nothing was written


def test_format_version_1_buffer_loads_and_is_migrated_by_the_next_change(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_rows(5), capacity_per_month=10)
    manifest_path = tmp_path / MANIFEST_FILENAME
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1  # what peft-selective wrote before stored reference log-probs
    for entry in manifest["months"]:
        del entry["reference_logps"], entry["reference"]
    manifest_path.write_text(json.dumps(manifest))
    old = RehearsalBuffer(tmp_path)
    assert old.rows() == buffer.rows() and old.month_info("m1").reference_logps == 0
    assert old.month_info("m1").reference is None
    old.set_reference_logps("m1", [_reference(i) for i in range(5)], reference="base")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["months"][0]["reference_logps"] == 5


def test_mix_into_carries_the_stored_reference_logps(tmp_path):
    buffer = RehearsalBuffer(tmp_path)
    buffer.add_month("m1", make_rows(10, tag="a"), capacity_per_month=10)
    buffer.set_reference_logps("m1", [_reference(i) if i % 2 else None for i in range(10)])
    new = Dataset.from_list(make_rows(10, tag="n"))
    plain = buffer.mix_into(new, 0.5, seed=0)
    assert "rehearsal_ref_chosen_logps" not in plain.column_names
    mixed = buffer.mix_into(new, 0.5, seed=0, with_reference_logps=True)
    assert mixed.column_names == plain.column_names + [
        "rehearsal_ref_chosen_logps",
        "rehearsal_ref_rejected_logps",
        "rehearsal_ref_fingerprint",
    ]
    assert mixed["prompt"] == plain["prompt"]  # the same draw and order
    for row in mixed:
        if row["source"] == "new":
            assert row["rehearsal_ref_chosen_logps"] is None and row["rehearsal_ref_fingerprint"] is None
            continue
        i = int(row["prompt"].split()[-1])
        expected = _reference(i) if i % 2 else {"chosen": None, "rejected": None, "fingerprint": None}
        assert row["rehearsal_ref_chosen_logps"] == expected["chosen"]
        assert row["rehearsal_ref_rejected_logps"] == expected["rejected"]
        assert row["rehearsal_ref_fingerprint"] == expected["fingerprint"]
    with pytest.raises(ValueError, match="already has the columns"):
        buffer.mix_into(mixed.remove_columns("source"), 0.5, with_reference_logps=True)
