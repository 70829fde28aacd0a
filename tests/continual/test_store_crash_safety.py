"""The trainer's stores under crashes and concurrency: a kill inside a checkpoint write or a Fisher commit, a resume
from the final checkpoint, `finish_month` misused, and the rehearsal buffer / Fisher store locked against a second
process (`peft_selective.utils.lock`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import continual_config, preference_month, tiny_chat_llama, word_chat_tokenizer

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import ContinualDPOTrainer, FisherState, RehearsalBuffer
from peft_selective.continual.ewc import FISHER_METADATA
from peft_selective.utils.lock import LOCK_FILE, DirectoryLock, DirectoryLockedError


def month_trainer(tmp_path: Path, name: str = "m1", **kwargs) -> ContinualDPOTrainer:
    """Month `name` ("yes" over "no", 12 rows, batch 4: 3 steps an epoch) on a fresh tiny chat Llama."""
    return ContinualDPOTrainer(
        tiny_chat_llama(),
        args=continual_config(tmp_path, name, **kwargs),
        train_dataset=preference_month("yes", "no"),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
    )


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# A constant learning rate, so that one optimizer step more moves the weights (with the default linear decay the
# extra step after the last one has rate 0 and hides the bug). 4 steps of 3 per epoch: the last checkpoint is in the
# second epoch, where transformers' resume arithmetic runs one step past max_steps.
CHECKPOINTED = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")


# ------------------------------------------------------------------------------------------------ resume
def test_resuming_from_the_final_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    straight = month_trainer(tmp_path / "straight", **CHECKPOINTED)
    straight.train()
    final = tmp_path / "straight" / "m1" / "checkpoint-4"
    expected = adapter_weights(final / "m1")
    # a crash after the last checkpoint (e.g. in finish_month): the rerun resumes from it
    resumed = month_trainer(tmp_path / "resumed", **CHECKPOINTED)
    output = resumed.train(resume_from_checkpoint=str(final))
    assert output.global_step == 4 and resumed.state.global_step == 4
    resumed.save_model(str(tmp_path / "resumed-model"))
    assert_same_weights(adapter_weights(tmp_path / "resumed-model" / "m1"), expected)
    # the month's loss is the one it logged, not the 0 of a call that ran no step
    logged = [entry["loss"] for entry in straight.state.log_history if "loss" in entry]
    assert output.training_loss == pytest.approx(sum(logged) / len(logged))


def _fail_trainer_state_write(monkeypatch, step: int) -> None:
    """The disk fills up while checkpoint-`step` writes its trainer_state.json (written last, after the weights)."""
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def full_disk(self, json_path):
        if Path(json_path).parent.name == f"checkpoint-{step}":
            Path(json_path).write_text('{"global_st')  # a half-written file, then the error
            raise OSError(28, "No space left on device")
        return save(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", full_disk)


def test_an_incomplete_checkpoint_is_skipped_on_resume(tmp_path, monkeypatch, caplog):
    straight = month_trainer(tmp_path / "straight", **CHECKPOINTED)
    straight.train()
    expected = adapter_weights(tmp_path / "straight" / "m1" / "checkpoint-4" / "m1")
    crashed = month_trainer(tmp_path / "run", **CHECKPOINTED)
    _fail_trainer_state_write(monkeypatch, 4)
    with pytest.raises(OSError, match="No space left"):
        crashed.train()
    monkeypatch.undo()
    run_dir = tmp_path / "run" / "m1"
    assert (run_dir / "checkpoint-4" / "m1" / "adapter_model.safetensors").is_file()  # weights, no usable state
    rerun = month_trainer(tmp_path / "run", **CHECKPOINTED)
    with caplog.at_level(logging.WARNING, logger="peft_selective.continual.trainer"):
        output = rerun.train(resume_from_checkpoint=True)
    assert "checkpoint-4" in caplog.text and "incomplete" in caplog.text
    assert output.global_step == 4
    rerun.save_model(str(tmp_path / "rerun-model"))
    assert_same_weights(adapter_weights(tmp_path / "rerun-model" / "m1"), expected)


def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path):
    folder = tmp_path / "m1" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{")
    trainer = month_trainer(tmp_path, **CHECKPOINTED)
    with pytest.raises(ValueError, match=r"checkpoint-2 is incomplete .*trainer_state.json"):
        trainer.train(resume_from_checkpoint=str(folder))


# ------------------------------------------------------------------------------------------------ finish_month
def test_finish_month_before_train_is_refused(tmp_path):
    trainer = month_trainer(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    with pytest.raises(RuntimeError, match=r"before `train\(\)`"):
        trainer.finish_month("m1")
    assert not (tmp_path / "fisher").exists()


def test_finish_month_under_a_second_name_is_refused(tmp_path):
    trainer = month_trainer(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    trainer.train()
    trainer.finish_month("m1")
    with pytest.raises(ValueError, match=r"already finished month 'm1'"):
        trainer.finish_month("june")
    assert FisherState.load(tmp_path / "fisher").months == ["m1"]
    trainer.finish_month("m1", overwrite=True)  # the same month again (a rerun after a crash) stays allowed
    assert FisherState.load(tmp_path / "fisher").months == ["m1"]


# ------------------------------------------------------------------------------------------------ the Fisher commit
class Killed(BaseException):
    """The process dies here (not an Exception: nothing may catch it and carry on)."""


def test_a_kill_inside_the_fisher_commit_never_counts_a_month_twice(tmp_path, monkeypatch):
    trainer = month_trainer(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    trainer.train()
    first = FisherState({name: torch.rand(tuple(t.shape)) for name, t in _month_fisher(trainer).items()}, ["m0"], 8)
    clean_dir, crash_dir = tmp_path / "clean", tmp_path / "crash"
    first.save(clean_dir)
    trainer.args.fisher_dir = str(clean_dir)
    trainer.finish_month("m1")
    clean = FisherState.load(clean_dir)
    assert clean.months == ["m0", "m1"]

    renames = _renames_of_one_save(tmp_path, first, monkeypatch)
    assert renames >= 2  # the weights and the metadata at least
    for kill_at in range(1, renames + 1):  # a kill after each rename of the commit (and before the first)
        shutil.rmtree(crash_dir, ignore_errors=True)
        first.save(crash_dir)
        trainer.args.fisher_dir = str(crash_dir)
        _kill_at_rename(monkeypatch, crash_dir, kill_at)
        with pytest.raises(Killed):
            trainer.finish_month("m1", overwrite=True)
        monkeypatch.undo()
        before = FisherState.load(crash_dir)  # whatever the kill left is loadable: the old or the new state
        assert before.months in (["m0"], ["m0", "m1"])
        trainer.finish_month("m1", overwrite=True)  # the rerun after the crash
        after = FisherState.load(crash_dir)
        assert after.months == ["m0", "m1"] and after.num_examples == clean.num_examples, kill_at
        for name in clean.fisher:
            torch.testing.assert_close(after.fisher[name], clean.fisher[name], rtol=0, atol=0, msg=str(kill_at))


def _month_fisher(trainer) -> dict[str, torch.Tensor]:
    from peft_selective.continual.ewc import estimate_fisher

    return estimate_fisher(trainer.model, trainer._fisher_batches()[:1], "m1", "m1", show_progress=False).fisher


def _renames_of_one_save(tmp_path, state: FisherState, monkeypatch) -> int:
    calls = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(dst), replace(src, dst)))
    state.merged(state).save(tmp_path / "count")
    monkeypatch.undo()
    return len(calls)


def _kill_at_rename(monkeypatch, directory: Path, number: int) -> None:
    """The `number`-th rename into `directory` does not happen: the process is killed just before it."""
    replace, seen = os.replace, []

    def dying(src, dst):
        if Path(dst).parent == directory:
            seen.append(dst)
            if len(seen) == number:
                raise Killed(f"killed before renaming {dst}")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", dying)


def test_a_fisher_file_changed_after_its_commit_is_refused(tmp_path):
    state = FisherState({"model.layers.0.mlp.up_proj": torch.rand(4, 3)}, ["m1"], 8, "tiny")
    state.save(tmp_path / "fisher")
    weights = json.loads((tmp_path / "fisher" / FISHER_METADATA).read_text())["weights"]
    other = FisherState({"model.layers.0.mlp.up_proj": torch.rand(4, 3)}, ["m1"], 8, "tiny")
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / json.loads((tmp_path / "other" / FISHER_METADATA).read_text())["weights"],
                tmp_path / "fisher" / weights)  # fmt: skip
    with pytest.raises(ValueError, match="SHA-256"):
        FisherState.load(tmp_path / "fisher")


def test_a_version_1_fisher_still_loads(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "fisher"
    folder.mkdir()
    save_file({"layer": torch.ones(2, 3)}, str(folder / "fisher.safetensors"))
    meta = {"format_version": 1, "months": ["m1"], "num_examples": 4, "base_model": None, "layers": {"layer": [2, 3]}}
    (folder / FISHER_METADATA).write_text(json.dumps(meta))
    state = FisherState.load(folder)
    assert state.months == ["m1"] and state.fisher["layer"].shape == (2, 3)
    state.save(folder)  # rewritten in today's form; the old weights file goes once the new commit is in place
    assert not (folder / "fisher.safetensors").exists()
    assert FisherState.load(folder).months == ["m1"]


# ------------------------------------------------------------------------------------------------ locks
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from peft_selective.utils.lock import DirectoryLock
    with DirectoryLock(sys.argv[1], command="holder-test"):
        print("locked", flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
    """
)


@pytest.fixture
def holder(tmp_path):
    """`holder(directory)`: a second process holding the lock of `directory` until the test ends (or `.stop()`)."""
    processes = []

    class Holder:
        def __init__(self, directory: Path) -> None:
            self.release = tmp_path / f"release-{len(processes)}"
            self.process = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(directory), str(self.release)], stdout=subprocess.PIPE, text=True
            )
            processes.append(self)
            assert self.process.stdout.readline().strip() == "locked"

        def stop(self) -> None:
            self.release.touch()
            assert self.process.wait(timeout=60) == 0

        def kill(self) -> None:
            self.process.kill()
            self.process.wait(timeout=60)

    yield Holder
    for process in processes:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(timeout=60)


def test_a_held_lock_names_its_holder_and_a_dead_holder_frees_it(tmp_path, holder, caplog):
    other = holder(tmp_path)
    with pytest.raises(DirectoryLockedError) as error:
        with DirectoryLock(tmp_path, command="second"):
            pass
    message = str(error.value)
    assert f"pid {other.process.pid}" in message and "holder-test" in message and os.uname().nodename in message
    assert "continual-dpo unlock" in message and LOCK_FILE in message
    other.kill()  # SIGKILL: the file stays, the kernel releases the flock
    assert (tmp_path / LOCK_FILE).is_file()
    with caplog.at_level(logging.WARNING, logger="peft_selective.utils.lock"):
        with DirectoryLock(tmp_path, command="third"):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {other.process.pid}" in caplog.text and "stale" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_not_broken_silently(tmp_path):
    record = {"pid": 1, "host": "elsewhere", "started_at": "2025-01-01T00:00:00+00:00", "command": "run-month m2"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(DirectoryLockedError, match=r"pid 1 on host elsewhere.*run-month m2"):
        with DirectoryLock(tmp_path):
            pass
    DirectoryLock.break_lock(tmp_path)
    with DirectoryLock(tmp_path):
        pass


def test_a_lock_is_reentrant_in_its_process(tmp_path):
    with DirectoryLock(tmp_path, command="outer"):
        with DirectoryLock(tmp_path, command="inner"):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "outer"
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_directory_without_write_access_gets_a_clear_error(tmp_path, monkeypatch):
    # root writes anywhere, so the refusal a read-only directory gives other users is simulated at its source
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(DirectoryLock, "_try_acquire", refused)
    with pytest.raises(DirectoryLockedError, match=r"Permission denied.*needs write access to the directory"):
        with DirectoryLock(tmp_path, what="campaign directory"):
            pass


ROWS = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]


def test_two_buffer_handles_never_lose_a_month(tmp_path):
    first, second = RehearsalBuffer(tmp_path / "buffer"), RehearsalBuffer(tmp_path / "buffer")
    first.add_month("a", ROWS[:3], capacity_per_month=3)
    second.add_month("b", ROWS[3:], capacity_per_month=3)  # opened before "a" was added
    assert RehearsalBuffer(tmp_path / "buffer").months == ["a", "b"]


def test_a_buffer_change_waits_for_no_one_it_is_refused(tmp_path, holder):
    buffer = RehearsalBuffer(tmp_path / "buffer")
    buffer.add_month("a", ROWS[:3], capacity_per_month=3)
    other = holder(tmp_path / "buffer")
    with pytest.raises(DirectoryLockedError, match=f"pid {other.process.pid}"):
        buffer.add_month("b", ROWS[3:], capacity_per_month=3)
    other.stop()
    buffer.add_month("b", ROWS[3:], capacity_per_month=3)
    assert RehearsalBuffer(tmp_path / "buffer").months == ["a", "b"]


def test_a_fisher_commit_is_refused_while_another_process_holds_the_store(tmp_path, holder):
    trainer = month_trainer(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    trainer.train()
    (tmp_path / "fisher").mkdir()
    other = holder(tmp_path / "fisher")
    with pytest.raises(DirectoryLockedError, match=f"pid {other.process.pid}"):
        trainer.finish_month("m1")
    assert not (tmp_path / "fisher" / FISHER_METADATA).exists()
    other.stop()
    assert trainer.finish_month("m1")["fisher_months"] == ["m1"]
