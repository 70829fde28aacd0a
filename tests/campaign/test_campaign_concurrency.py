"""Two commands on one campaign: the second is refused while the first holds the campaign directory's lock, naming
its holder; a lock whose holder cannot be proven gone is broken with `continual-dpo unlock`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from testing_utils import SCRIPTS_DIR, cli, copy_of, write_month

from peft_selective.campaign.campaign import Campaign
from peft_selective.utils.lock import LOCK_FILE


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def month_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {
        name: write_month(folder / f"{name}.jsonl", chosen, rejected)
        for name, chosen, rejected in (("m1", "yes", "no"), ("m2", "good", "bad"), ("m3", "red", "blue"))
    }


def test_commands_are_refused_while_a_month_trains_in_another_process(
    one_month_campaign, month_files, tmp_path, capsys
):
    directory = copy_of(one_month_campaign, tmp_path)
    release = tmp_path / "release"
    script = SCRIPTS_DIR / "campaign_pause.py"
    command = [sys.executable, str(script), str(directory), "m2", month_files["m2"], "2", str(release)]
    log = tmp_path / "month_2.log"  # a file, not a pipe: the month's log would fill a pipe no one reads meanwhile
    with open(log, "w") as stderr:
        month_2 = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = iter(month_2.stdout.readline, "")  # the Trainer prints its logs there too
        assert any(line.strip() == "paused" for line in lines), log.read_text()[-3000:]
        # another month, the same month again, and the commands that write evaluations and cards
        for argv in (("run-month", "m3", "--data", month_files["m3"]), ("run-month", "m2"), ("eval",), ("report",)):
            assert cli(*argv, "--campaign_dir", directory) == 2, argv
            message = capsys.readouterr().err
            assert f"is in use by pid {month_2.pid} on host" in message and "`run_month m2`" in message, message
            assert "continual-dpo unlock --campaign_dir" in message
    finally:
        release.touch()
    month_2.communicate(timeout=600)
    assert month_2.returncode == 0, log.read_text()[-3000:]
    campaign = Campaign(directory)
    assert campaign.done_months == ["m1", "m2"] and campaign.month("m3") is None
    assert [m["name"] for m in json.loads((directory / "buffer" / "manifest.json").read_text())["months"]] == [
        "m1",
        "m2",
    ]
    assert json.loads((directory / "fisher" / "fisher.json").read_text())["months"] == ["m1", "m2"]
    assert campaign.month("m2")["training"]["steps"] == 4
    assert not (directory / LOCK_FILE).exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from peft_selective.utils.lock import DirectoryLock
    with DirectoryLock(sys.argv[1], command="run-month m9"):
        print("locked", flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
    """
)


def test_unlock_breaks_a_stale_lock_and_refuses_a_live_one(one_month_campaign, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    # a lock left by a job on another host: nothing here can prove it gone
    record = {"pid": 4242, "host": "node-17", "started_at": "2025-06-01T10:00:00+00:00", "command": "run_month m2"}
    (directory / LOCK_FILE).write_text(json.dumps(record))
    assert cli("report", "--campaign_dir", directory) == 2
    message = capsys.readouterr().err
    assert "pid 4242 on host node-17" in message and "another host" in message and "unlock" in message
    assert cli("unlock", "--campaign_dir", directory) == 0
    assert "pid 4242 on host node-17" in capsys.readouterr().out
    assert not (directory / LOCK_FILE).exists()
    assert cli("report", "--campaign_dir", directory) == 0
    capsys.readouterr()
    # a live holder on this host: unlock refuses
    release = tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(release)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli("unlock", "--campaign_dir", directory) == 2
        assert f"held by a live process: pid {holder.pid}" in capsys.readouterr().err
        assert (directory / LOCK_FILE).is_file()
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert cli("unlock", "--campaign_dir", directory) == 0
    assert "No lock" in capsys.readouterr().out
