"""benchmarks/methods.py, the one registry of the adapter methods the benchmarks compare: every family builds, the
configs are those the benchmarks were measured with, and the scripts run both as files and as modules."""

import subprocess
import sys

import pytest
from peft import LoraConfig
from testing_utils import REPO_ROOT

import peft_selective


sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
from benchmarks import methods  # noqa: E402


def test_every_method_builds_its_family_config_on_its_modules():
    expected = {
        "lora": LoraConfig,
        "selective_mlp": peft_selective.SelectiveMLPConfig,
        "saproj": peft_selective.SAProjConfig,
        "geometry": peft_selective.GeometryProjectedConfig,
    }
    for key, method in methods.METHODS.items():
        config = method.peft_config(8, 16)
        if method.full_finetuning:
            assert config is None
            continue
        assert isinstance(config, expected[method.family]), key
        targets = None if config.target_modules is None else sorted(config.target_modules)
        assert targets == (None if method.modules is None else sorted(method.modules)), key
        if method.family == "lora":
            assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
        elif method.full_rank:
            assert config.rank is None and config.alpha is None
        else:
            assert (config.rank, config.alpha) == (8, 16)
    with pytest.raises(KeyError, match="unknown adapter method"):
        methods.peft_config("dora", 8, 16)


def test_configs_are_those_the_benchmarks_were_measured_with():
    """The definitions each benchmark had before the registry (forgetting's cached runs depend on them)."""

    def same(a, b):
        assert type(a) is type(b) and a.to_dict() == b.to_dict()

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # benchmarks/forgetting.py `peft_config_for`
    same(
        methods.peft_config("lora_all", 16, 32, task_type=None),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=all_linear),
    )
    same(methods.peft_config("geometry", 16), peft_selective.GeometryProjectedConfig(rank=16))
    same(methods.peft_config("selective_mlp_lowrank", 16, 32), peft_selective.SelectiveMLPConfig(rank=16, alpha=32))
    # benchmarks/overhead.py, geometry.py: LoRA matched to our adapters
    same(
        methods.peft_config("lora_mlp", 8, 16),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["gate_proj", "up_proj"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    same(methods.selective_mlp_config(None, 16), peft_selective.SelectiveMLPConfig(rank=None))
    same(methods.peft_config("saproj_full", 8, 16), peft_selective.SAProjConfig(rank=None))
    same(
        methods.peft_config("geometry_mlp", 8, 16),
        peft_selective.GeometryProjectedConfig(rank=8, alpha=16, target_modules=["gate_proj", "up_proj"]),
    )
    same(
        methods.peft_config("geometry", 8, 16, tolerance=0.1, norm_cap=2.0),
        peft_selective.GeometryProjectedConfig(rank=8, alpha=16, tolerance=0.1, norm_cap=2.0),
    )


@pytest.mark.parametrize("command", [["benchmarks/month_cost.py"], ["-m", "benchmarks.month_cost"]])
def test_a_benchmark_runs_as_a_file_and_as_a_module(command, tmp_path):
    # from another directory: a file finds its package itself; `python -m` needs the repository on the path
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if command[0].endswith(".py"):
        command = [str(REPO_ROOT / command[0])]
    else:
        env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout
