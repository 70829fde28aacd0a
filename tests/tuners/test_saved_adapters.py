"""Adapters saved by an earlier version load to the same outputs (the on-disk format is a contract).

`tests/fixtures/adapters_v0_2/` holds adapters written by peft-selective 0.2 before GeometryProjected became a
variant of the shared selective layer: a calibrated low-rank GeometryProjected adapter (hard and soft projectors), a
calibrated full-rank one (soft projectors, binding norm cap) and a full-rank SelectiveMLP adapter, with the base
they were trained on and the logits they gave (unmerged and merged). See `generate.py` there.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from testing_utils import FIXTURES_DIR

import peft_selective
from peft_selective.tuners.selective import SelectiveLayer


FIXTURES = FIXTURES_DIR / "adapters_v0_2"
ADAPTERS = ("geometry_lowrank", "geometry_full", "selective_mlp_full")
PROTECTED_KEYS = ("selective_protected_basis", "selective_protected_weights", "selective_protected_values")


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapters_v0_2_generate", FIXTURES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
EXPECTED = load_file(FIXTURES / "expected_logits.safetensors")


def load(name: str) -> PeftModel:
    return PeftModel.from_pretrained(GEN.base_model(), FIXTURES / name).eval()


@pytest.mark.parametrize("name", ADAPTERS)
def test_saved_adapter_gives_the_saved_outputs(name):
    model = load(name)
    with torch.no_grad():
        torch.testing.assert_close(model(GEN.inputs()).logits, EXPECTED[name], rtol=0, atol=1e-6)
        model.merge_adapter()
        torch.testing.assert_close(model(GEN.inputs()).logits, EXPECTED[f"{name}.merged"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ADAPTERS)
def test_saving_again_writes_the_same_keys_and_layout(name, tmp_path):
    load(name).save_pretrained(tmp_path)
    old = load_file(FIXTURES / name / "adapter_model.safetensors")
    new = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(new) == sorted(old)
    for key, tensor in old.items():
        assert new[key].dtype == tensor.dtype and torch.equal(new[key], tensor), key


@pytest.mark.parametrize("name", ["geometry_lowrank", "geometry_full"])
def test_saved_geometry_adapter_keeps_its_calibration_and_bounds(name):
    model = load(name)
    layers = [m for m in model.modules() if isinstance(m, SelectiveLayer)]
    assert layers and all(m.is_calibrated("default") for m in layers)
    saved = load_file(FIXTURES / name / "adapter_model.safetensors")
    assert all(any(k.endswith(f".{p}") for k in saved) for p in (*PROTECTED_KEYS, "selective_protected_stats"))
    assert all(v.shape == (5,) for k, v in saved.items() if k.endswith(".selective_protected_stats"))
    expected = json.loads((FIXTURES / name / "expected_report.json").read_text())
    # saved before `calibration_weighting` existed: calibrated on the inputs, as the rebuilt report says
    assert peft_selective.report_from_model(model).to_dict() == {**expected, "weighting": "inputs"}


def test_saved_full_rank_geometry_adapter_is_capped():
    """The full-rank fixture's norm cap binds: without it the outputs move (so the test above tests the cap)."""
    model = load("geometry_full")
    for layer in (m for m in model.modules() if isinstance(m, SelectiveLayer)):
        layer.norm_cap["default"] = None
    with torch.no_grad():
        assert not torch.allclose(model(GEN.inputs()).logits, EXPECTED["geometry_full"], atol=1e-4)
