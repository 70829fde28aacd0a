"""One preference-row schema: the trainer's dataset check, the rehearsal buffer's row checks (when adding and when
loading) and the campaign's run-month all go through `peft_selective.continual.preference_data`, once."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from testing_utils import continual_config, preference_month, tiny_chat_llama, word_chat_tokenizer

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import trainer as trainer_module
from peft_selective.continual.preference_data import (
    PreferenceDataError,
    check_preference_row,
    preference_row_problem,
    validate_preference_dataset,
)
from peft_selective.continual.rehearsal import RehearsalBuffer, RehearsalBufferError


TOOL_ROW = {
    "prompt": [{"role": "user", "content": "weather"}],
    "chosen": [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {}}}]}
    ],
    "rejected": [{"role": "assistant", "content": "no idea"}],
}


def test_row_problems_name_the_field():
    assert preference_row_problem({"prompt": "q", "chosen": "a", "rejected": "b"}) is None
    assert preference_row_problem(TOOL_ROW) is None  # TRL's tool-calling format: no `content` on a tool call
    assert "missing the DPO columns ['rejected']" in preference_row_problem({"prompt": "q", "chosen": "a"})
    assert "'chosen' is an empty string" in preference_row_problem({"prompt": "q", "chosen": " ", "rejected": "b"})
    assert "identical" in preference_row_problem({"prompt": "q", "chosen": "a", "rejected": "a"})
    mixed = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
    assert "the row's 'chosen' is conversational" in preference_row_problem(mixed)
    assert "not a row dict" in preference_row_problem(["q", "a", "b"])
    with pytest.raises(PreferenceDataError, match=r"^row 3: 'rejected' is missing \(None\)\.$"):
        check_preference_row({"prompt": "q", "chosen": "a", "rejected": None}, "row 3")


def test_buffer_rows_go_through_the_schema(tmp_path):
    buffer = RehearsalBuffer(tmp_path / "buffer")
    buffer.add_month("tools", [TOOL_ROW, {**TOOL_ROW, "rejected": [{"role": "assistant", "content": "maybe"}]}], 10)
    assert len(buffer) == 2  # accepted by the buffer exactly as by the trainer
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}]
    with pytest.raises(PreferenceDataError, match=r"Month 'plain', row 1: 'chosen' is an empty string"):
        RehearsalBuffer(tmp_path / "other").add_month("plain", rows, 10)
    # a stored row that fails the schema is a corrupted file: the buffer error names the file and line
    buffer = RehearsalBuffer(tmp_path / "edited", verify_checksums=False)
    buffer.add_month(
        "m", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}], 10
    )
    path = tmp_path / "edited" / buffer.month_info("m").file
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "r", "chosen": "c", "rejected": "c"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RehearsalBufferError, match=rf"{path.name}, line 2: not a valid preference row: 'chosen' and"):
        RehearsalBuffer(tmp_path / "edited", verify_checksums=False)


def test_trainer_validates_once(tmp_path, monkeypatch):
    calls = []

    def counting(dataset, name="train"):
        calls.append(name)
        return validate_preference_dataset(dataset, name)

    monkeypatch.setattr(trainer_module, "validate_preference_dataset", counting)
    month = preference_month("yes", "no")

    def build(**kwargs):
        return trainer_module.ContinualDPOTrainer(
            tiny_chat_llama(),
            args=continual_config(tmp_path, "m1"),
            train_dataset=month,
            processing_class=word_chat_tokenizer(),
            peft_config=SelectiveMLPConfig(rank=4),
            **kwargs,
        )

    build()
    assert calls == ["train"]
    calls.clear()
    validate_preference_dataset(month)  # what the campaign's `_split` does when it registers the month
    build(train_dataset_validated=True)
    assert calls == []
    bad = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(PreferenceDataError, match="row 0: 'chosen' and 'rejected' are identical"):
        trainer_module.ContinualDPOTrainer(
            tiny_chat_llama(), args=continual_config(tmp_path, "m2"), train_dataset=bad,
            processing_class=word_chat_tokenizer(), peft_config=SelectiveMLPConfig(rank=4),
        )  # fmt: skip
