"""PEFT's load contract, held to LoRA's standard on the same tiny models.

Our adapter tensors are named under the registered tuner prefix (`selective_delta_A`, ...), which is what PEFT and
transformers use to tell adapter keys apart. These tests check what depends on it: a partial adapter reports its
missing keys as LoRA's does; transformers' loaders and `inject_adapter_in_model(state_dict=...)` load our adapters as
they load LoRA's; adapters saved by 0.1.0 (unprefixed names) still load; and PEFT's generic custom-model tests
(`tests/test_custom_models.py` upstream: training, only-adapter updates, save/load, merge, disable) pass for our
three configs as they do for LoRA.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file, save_file
from testing_utils import build_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from peft_selective import GeometryProjectedConfig, SAProjConfig, SelectiveMLPConfig, calibrate, report_from_model
from peft_selective.tuners.geometry.subspace import ProtectedSubspace
from peft_selective.tuners.selective import SelectiveLayer


WEIGHTS = "adapter_model.safetensors"
# One config per adapter layout, non-zero from the start so a tensor that fails to load changes the outputs.
CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=["gate_proj", "up_proj"], init_lora_weights=False),
    "selective_mlp_full": lambda: SelectiveMLPConfig(init_weights=False),
    "selective_mlp_lowrank": lambda: SelectiveMLPConfig(rank=4, init_weights=False),
    "saproj_lowrank": lambda: SAProjConfig(rank=4, init_weights=False),
    "geometry": lambda: GeometryProjectedConfig(rank=4, init_weights=False),
}
OURS = [name for name in CONFIGS if name != "lora"]
# transformers' loaders copy tensors in without `load_state_dict`, so the pre-hook that sizes a GeometryProjected
# adapter's protected-subspace buffers from the checkpoint (and sets the norm cap) never runs there: calibration
# records the sizes in the config (`protected_dims`) and the layer reads its norm cap from the loaded buffers.
TRANSFORMERS_LOADABLE = list(CONFIGS)


def _ids(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 120, (8, 16), generator=g)} for _ in range(n)]


INPUTS = _ids(99, 1)[0]


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**INPUTS).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama saved to disk, so that adapter configs can name it (transformers' loaders read it)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(path)
    return str(path)


def load_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def saved(base_dir, tmp_path_factory):
    """Every method's adapter on the tiny Llama, saved once: name -> (folder, its logits)."""
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        model = get_peft_model(load_base(base_dir), make())
        if name == "geometry":
            calibrate(model, _ids(1), show_progress=False)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, logits(model))
    return out


def copy_adapter(folder, target, edit=None):
    """Copy an adapter folder, passing its tensors through `edit(dict) -> dict`."""
    target.mkdir()
    (target / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / WEIGHTS)
    save_file(edit(tensors) if edit else tensors, target / WEIGHTS)
    return target


def without_peft_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved adapter's keys as a plain (not PeftModel-wrapped) model names them: what transformers passes to
    `inject_adapter_in_model(state_dict=...)`."""
    return {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}


def model_key(model, adapter: str, checkpoint_key: str) -> str:
    """The model's key of a checkpoint key, by PEFT's own mapping (e.g. `...lora_A.weight` -> `...lora_A.x.weight`)."""
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[model.peft_config[adapter].peft_type]
    (key,) = [k for k in model.state_dict() if tuner._remove_adapter_name_from_key(k, adapter) == checkpoint_key]
    return key


# ------------------------------------------------------------------------------------------------ the names
@pytest.mark.parametrize("name", OURS)
def test_saved_keys_carry_the_registered_prefix(saved, name):
    folder, _ = saved[name]
    config = PeftConfig.from_pretrained(folder)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    assert prefix == PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].prefix == "selective_"
    keys = load_file(folder / WEIGHTS).keys()
    assert keys and all(k.rpartition(".")[2].startswith(prefix) for k in keys), sorted(keys)[:4]
    if name == "geometry":
        assert any(k.endswith(".selective_protected_basis") for k in keys)


# ---------------------------------------------------------------------------------------- partial adapters
@pytest.mark.parametrize("name", CONFIGS)
def test_partial_adapter_reports_its_missing_key_as_lora_does(saved, base_dir, tmp_path, name):
    folder, _ = saved[name]
    deleted = sorted(load_file(folder / WEIGHTS))[0]
    partial = copy_adapter(folder, tmp_path / "partial", lambda t: {k: v for k, v in t.items() if k != deleted})

    with pytest.warns(UserWarning, match="Found missing adapter keys") as record:
        model = PeftModel.from_pretrained(load_base(base_dir), partial)
    (message,) = [str(w.message) for w in record if "Found missing adapter keys" in str(w.message)]
    expected = model_key(model, "default", deleted)
    assert f"['{expected}']" in message

    result = model.load_adapter(partial, adapter_name="other")
    assert result.missing_keys == [model_key(model, "other", deleted)]
    assert result.unexpected_keys == []


@pytest.mark.parametrize("name", CONFIGS)
def test_unexpected_and_mismatched_tensors_are_reported_as_lora_does(saved, base_dir, tmp_path, name):
    folder, _ = saved[name]
    first = sorted(load_file(folder / WEIGHTS))[0]
    extra = first.rpartition(".")[0] + (".lora_extra.weight" if name == "lora" else ".selective_extra")
    more = copy_adapter(folder, tmp_path / "more", lambda t: {**t, extra: torch.zeros(2)})
    model = PeftModel.from_pretrained(load_base(base_dir), folder)
    result = model.load_adapter(more, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == [extra]

    reshaped = copy_adapter(folder, tmp_path / "reshaped", lambda t: {**t, first: torch.zeros(1, 1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_adapter(reshaped, adapter_name="third")


# -------------------------------------------------------------------------------------------- other loaders
@pytest.mark.parametrize("name", TRANSFORMERS_LOADABLE)
def test_transformers_load_adapter(saved, base_dir, name):
    folder, expected = saved[name]
    model = load_base(base_dir)
    model.load_adapter(str(folder))
    assert torch.allclose(logits(model), expected, atol=1e-6)
    assert not torch.allclose(logits(load_base(base_dir)), expected, atol=1e-4)  # the adapter does change outputs


@pytest.mark.parametrize("name", TRANSFORMERS_LOADABLE)
def test_transformers_from_pretrained_of_an_adapter_folder(saved, base_dir, name):
    folder, expected = saved[name]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == base_dir
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert torch.allclose(logits(model), expected, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_inject_adapter_in_model_from_a_state_dict(saved, base_dir, name):
    folder, expected = saved[name]
    state_dict = without_peft_prefix(load_file(folder / WEIGHTS))
    model = inject_adapter_in_model(PeftConfig.from_pretrained(folder), load_base(base_dir), state_dict=state_dict)
    result = set_peft_model_state_dict(model, state_dict)
    assert not [k for k in result.missing_keys if "default" in k] and not result.unexpected_keys
    assert torch.allclose(logits(model), expected, atol=1e-6)


# ------------------------------------------------------------------ GeometryProjected without load_state_dict
def config_dims(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text()).get("protected_dims")


def test_geometry_config_records_the_calibrated_buffer_shapes(saved):
    folder, _ = saved["geometry"]
    dims = config_dims(folder)
    bases = {
        k.removeprefix("base_model.model.").removesuffix(".selective_protected_basis"): v
        for k, v in load_file(folder / WEIGHTS).items()
        if k.endswith(".selective_protected_basis")
    }
    assert dims == {name: basis.shape[1] for name, basis in bases.items()}
    assert any(d > 0 for d in dims.values())  # real subspaces, not only empty placeholders


def _strip_names(report) -> dict:
    return {name.removeprefix("base_model.model."): g for name, g in report.layers.items()}


def test_transformers_load_adapter_applies_the_geometry_norm_cap(base_dir, tmp_path):
    """transformers copies the buffers in without the pre-hook that sets the layer's norm cap: the layer reads it
    from the loaded buffers. A cap small enough to bind shows it is applied."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), GeometryProjectedConfig(rank=4, init_weights=False, norm_cap=0.01))
    calibrate(model, _ids(1), show_progress=False)
    model.save_pretrained(tmp_path)
    expected = logits(model)

    loaded = load_base(base_dir)
    loaded.load_adapter(str(tmp_path))
    assert torch.equal(logits(loaded), expected)
    layers = [m for m in loaded.modules() if isinstance(m, SelectiveLayer)]
    assert layers and all(m.is_calibrated("default") for m in layers)
    assert _strip_names(report_from_model(loaded)) == _strip_names(report_from_model(model))
    for layer in layers:
        layer.norm_cap["default"] = None
    assert not torch.allclose(logits(loaded), expected, atol=1e-3)  # the cap binds: without it outputs move


def test_geometry_adapter_without_protected_dims_still_loads_through_peft(saved, base_dir, tmp_path):
    """Adapters saved before `protected_dims` existed: PEFT's loaders size the buffers by the pre-hook."""
    folder, expected = saved["geometry"]
    old = copy_adapter(folder, tmp_path / "old")
    config = json.loads((old / "adapter_config.json").read_text())
    del config["protected_dims"]
    (old / "adapter_config.json").write_text(json.dumps(config))

    # transformers' loaders need the record: they refuse such a file with a shape error, not a silent base model
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_base(base_dir).load_adapter(str(old))

    model = PeftModel.from_pretrained(load_base(base_dir), old)
    assert torch.allclose(logits(model), expected, atol=1e-6)
    result = model.load_adapter(old, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("again")
    assert torch.allclose(logits(model), expected, atol=1e-6)

    # loading through PEFT fills the record from the checkpoint, so re-saving once makes it loadable everywhere
    assert model.peft_config["default"].protected_dims == config_dims(folder)
    model.save_pretrained(tmp_path / "resaved")
    assert config_dims(tmp_path / "resaved") == config_dims(folder)
    loaded = load_base(base_dir)
    loaded.load_adapter(str(tmp_path / "resaved"))
    assert torch.allclose(logits(loaded), expected, atol=1e-6)


# ----------------------------------------------------------------------------------- adapters saved by 0.1.0
def to_legacy_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What peft-selective 0.1.0 wrote: the same tensors without the `selective_` prefix (`gate_proj.delta_A`)."""
    out = {}
    for key, value in tensors.items():
        module, _, tensor = key.rpartition(".")
        out[f"{module}.{tensor.removeprefix('selective_')}"] = value
    return out


@pytest.mark.parametrize("name", OURS)
def test_adapter_saved_by_0_1_0_loads_to_identical_outputs(saved, base_dir, tmp_path, name):
    folder, expected = saved[name]
    old = copy_adapter(folder, tmp_path / "old", to_legacy_names)
    keys = load_file(old / WEIGHTS).keys()
    assert any(k.endswith((".delta_A", ".delta_weight")) for k in keys) and not any("selective_" in k for k in keys)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing keys
        model = PeftModel.from_pretrained(load_base(base_dir), old)
    assert torch.equal(logits(model), expected)

    result = model.load_adapter(old, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("again")
    assert torch.equal(logits(model), expected)

    state_dict = without_peft_prefix(load_file(old / WEIGHTS))
    injected = inject_adapter_in_model(PeftConfig.from_pretrained(old), load_base(base_dir), state_dict=state_dict)
    assert not set_peft_model_state_dict(injected, state_dict).unexpected_keys
    assert torch.equal(logits(injected), expected)

    # saving again writes today's names
    model.save_pretrained(tmp_path / "resaved", selected_adapters=["again"])
    assert set(load_file(tmp_path / "resaved" / "again" / WEIGHTS)) == set(load_file(folder / WEIGHTS))


# ------------------------------------------------------------------------ PEFT's generic custom-model tests
# Ported from PEFT's tests/test_custom_models.py (`TestPeftCustomModel`) for our configs, on its vanilla MLP, with
# LoRA cases as the reference every check must also pass.
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


MLP_INPUTS = {"X": torch.arange(90).view(9, 10)}
CUSTOM_CASES = [
    (config_cls.__name__, config_cls, kwargs)
    for config_cls in (LoraConfig, SelectiveMLPConfig, SAProjConfig, GeometryProjectedConfig)
    for kwargs in (
        {"target_modules": ["lin0"]},
        {"target_modules": ["lin1"]},
        {"target_modules": ["lin0", "lin1"]},
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        {"target_modules": ["lin0", "lin1"], "rank": 2},
        {"target_modules": ["lin0", "lin1"], "rank": None},
    )
    if not (config_cls is LoraConfig and "rank" in kwargs)
]
CASE_IDS = [f"{name}-{'-'.join(kw['target_modules'])}-{kw}" for name, _, kw in CUSTOM_CASES]


def protect_by_hand(model, adapter: str = "default") -> None:
    """GeometryProjected refuses to train uncalibrated: give each layer a 2-D protected subspace (a wide norm cap)."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, SelectiveLayer) and module.requires_calibration.get(adapter):
            basis, _ = torch.linalg.qr(torch.randn(module.in_features, 2, generator=g))
            subspace = ProtectedSubspace(basis, torch.ones(2), torch.ones(2), 0.1, torch.ones(module.in_features))
            module.set_protected_subspace(adapter, subspace, output_energy=1.0, norm_cap=1e3, num_tokens=100)


def peft_mlp(config_cls, kwargs, init_weights: bool = True):
    if config_cls is not LoraConfig:
        kwargs = {"init_weights": init_weights, **kwargs}
    elif not init_weights:
        kwargs = {"init_lora_weights": False, **kwargs}
    model = get_peft_model(make_mlp(), config_cls(**kwargs))
    protect_by_hand(model)
    return model


def is_adapter_param(model, name: str) -> bool:
    # as upstream: the tuner prefix (or modules_to_save) is what tells adapter parameters apart
    return model.prefix in name or "modules_to_save" in name


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
def test_training_custom_models(test_name, config_cls, kwargs):
    model = peft_mlp(config_cls, kwargs)
    model(**MLP_INPUTS)[0].sum().backward()
    for name, param in model.named_parameters():
        if is_adapter_param(model, name):
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
def test_only_params_are_updated(test_name, config_cls, kwargs):
    model = peft_mlp(config_cls, kwargs)
    before = copy.deepcopy(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # upstream: at least 3 steps, so both factors of a low-rank update move
        optimizer.zero_grad()
        model(**MLP_INPUTS).sum().backward()
        optimizer.step()
    params_before, params_after = dict(before.named_parameters()), dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    for name, param in params_before.items():
        moved = not torch.allclose(param, params_after[name], atol=1e-4, rtol=1e-4)
        assert moved == is_adapter_param(model, name), name


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
def test_save_load_roundtrip(test_name, config_cls, kwargs, tmp_path):
    base_out = make_mlp().eval()(**MLP_INPUTS)
    model = peft_mlp(config_cls, kwargs, init_weights=False).eval()
    out = model(**MLP_INPUTS)
    assert not torch.allclose(base_out, out, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path).eval()
    assert torch.allclose(out, loaded(**MLP_INPUTS), atol=1e-5, rtol=1e-5)
    # and through inject_adapter_in_model + set_peft_model_state_dict, from the saved keys alone
    state_dict = without_peft_prefix(load_file(tmp_path / WEIGHTS))
    injected = inject_adapter_in_model(config_cls.from_pretrained(tmp_path), make_mlp(), state_dict=state_dict)
    assert not set_peft_model_state_dict(injected, state_dict).unexpected_keys
    assert torch.allclose(out, injected.eval()(**MLP_INPUTS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
def test_parameters_after_loading_model(test_name, config_cls, kwargs, tmp_path):
    model = peft_mlp(config_cls, kwargs)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**MLP_INPUTS).sum().backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.allclose(value, after[name], atol=1e-4, rtol=1e-4), name
    # the saved adapter is exactly what PEFT calls the adapter's state
    assert load_file(tmp_path / WEIGHTS).keys() == get_peft_model_state_dict(model).keys()


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_layers(test_name, config_cls, kwargs, safe_merge):
    model = peft_mlp(config_cls, kwargs, init_weights=False).eval()
    out = model(**MLP_INPUTS)
    with torch.no_grad():
        merged = model.merge_and_unload(safe_merge=safe_merge)
    assert not any(isinstance(m, SelectiveLayer) for m in merged.modules())
    assert torch.allclose(out, merged(**MLP_INPUTS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("test_name, config_cls, kwargs", CUSTOM_CASES, ids=CASE_IDS)
def test_disable_adapters(test_name, config_cls, kwargs):
    base_out = make_mlp().eval()(**MLP_INPUTS)
    model = peft_mlp(config_cls, kwargs, init_weights=False).eval()
    assert not torch.allclose(model(**MLP_INPUTS), base_out, atol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(model(**MLP_INPUTS), base_out, atol=1e-6)
    model.merge_adapter()
    with model.disable_adapter():  # unmerges
        assert torch.allclose(model(**MLP_INPUTS), base_out, atol=1e-5)
