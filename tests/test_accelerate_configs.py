"""The launch configs of examples/accelerate/ parse and say what their README says (they are not run on GPUs in CI)."""

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from testing_utils import EXAMPLES_DIR


CONFIG_DIR = EXAMPLES_DIR / "accelerate"
CONFIGS = ("ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml")


def _load(name: str) -> dict:
    with open(CONFIG_DIR / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _launch_options() -> set[str]:
    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_accelerate_and_targets_two_gpus(name):
    config = _load(name)
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["num_processes"] == 2 and config["num_machines"] == 1
    assert config["use_cpu"] is False
    assert config["mixed_precision"] == "bf16"
    # accelerate's own loader rejects unknown top-level keys and bad enum values
    cluster = ClusterConfig.from_yaml_file(str(CONFIG_DIR / name))
    assert cluster.num_processes == 2


def test_ddp_config():
    config = _load("ddp.yaml")
    assert config["distributed_type"] == "MULTI_GPU"
    assert ClusterConfig.from_yaml_file(str(CONFIG_DIR / "ddp.yaml")).distributed_type == DistributedType.MULTI_GPU
    assert "fsdp_config" not in config and "deepspeed_config" not in config


def test_fsdp_config_is_fsdp2_with_a_loadable_adapter_on_save():
    config = _load("fsdp.yaml")
    assert config["distributed_type"] == "FSDP"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # FSDP1-only keys are ignored or rejected by FSDP2
    assert not {"fsdp_sharding_strategy", "fsdp_use_orig_params", "fsdp_backward_prefetch"} & set(fsdp)
    # `accelerate launch` copies fsdp_config keys onto its own options: a misspelled key would be silently unused
    assert set(fsdp) <= _launch_options(), set(fsdp) - _launch_options()
    assert "deepspeed_config" not in config


def test_deepspeed_config_is_zero3():
    config = _load("deepspeed_zero3.yaml")
    assert config["distributed_type"] == "DEEPSPEED"
    ds = config["deepspeed_config"]
    assert ds["zero_stage"] == 3
    assert ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True
    assert ds["offload_optimizer_device"] == "none" and ds["offload_param_device"] == "none"
    # left to the training config ("auto"): a fixed value that differs from the script's is a transformers error
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    assert set(ds) <= _launch_options(), set(ds) - _launch_options()
    assert "fsdp_config" not in config
