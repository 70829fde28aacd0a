"""The adapter under DDP: `accelerate launch` with two CPU processes, both ranks end with the same weights."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import SCRIPTS_DIR


SCRIPT = SCRIPTS_DIR / "ddp_train.py"


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
    reason="accelerate CLI not installed",
)
def test_two_process_ddp_training_keeps_ranks_in_sync(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    # `accelerate launch --cpu` starts a single process unless MPI is set up; the torchrun-based launcher gives two.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",  # torchrun launcher; the script's use_cpu=True then selects gloo on CPU
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(SCRIPT),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    assert all(".selective_delta_" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # and training moved the adapter (B starts at zero)
    assert any(k.endswith("selective_delta_B.default") and rank0[k].abs().sum() > 0 for k in rank0)
