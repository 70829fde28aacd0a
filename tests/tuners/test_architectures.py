"""The selective presets on every supported architecture family (tiny random-init models, see testing_utils.py).

For each family, preset (SelectiveMLPConfig = Gate&Up, SAProjConfig = self-attention) and update kind (full-rank,
rank 4) we check: exactly the expected parameters are trainable, gradients reach only them, disabling the adapter
gives the base model bit for bit, merging is exact, save/load round-trips, and two adapters active at once add up.

The expected targets come from the hand-written table `EXPECTED` below (module suffixes inside a block), never from
`peft_selective.targets`, so the tests check the role resolution instead of restating it.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_selective import SAProjConfig, SelectiveMLPConfig
from peft_selective.tuners.selective import Linear as SelectiveLinear
from peft_selective.tuners.selective import ParamWrapper, SelectiveLayer


@dataclass(frozen=True)
class Expected:
    """What each preset must adapt in one family. Paths are inside a block (after `<blocks>.<i>.`)."""

    blocks: str  # regex of the path of the block container, e.g. r"model\.layers"
    mlp: frozenset[str]  # Gate&Up modules
    attn: frozenset[str]  # SA Proj modules
    mlp_params: frozenset[str] = frozenset()  # Gate&Up fused 3-D expert parameters
    down: frozenset[str] = frozenset()  # added by SelectiveMLPConfig(train_down_proj=True)
    down_params: frozenset[str] = frozenset()


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


_LLAMA_MLP = _set("mlp.gate_proj", "mlp.up_proj")
_LLAMA_ATTN = _set("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_DOWN = _set("mlp.down_proj")
_LLAMA_LIKE = Expected(r"model\.layers", _LLAMA_MLP, _LLAMA_ATTN, down=_LLAMA_DOWN)

EXPECTED: dict[str, Expected] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,  # q/k/v carry biases: selective_delta_bias expected there
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": Expected(
        r"model\.layers", _set("mlp.gate_up_proj"), _set("self_attn.qkv_proj", "self_attn.o_proj"), down=_LLAMA_DOWN
    ),
    "gpt2": Expected(r"transformer\.h", _set("mlp.c_fc"), _set("attn.c_attn", "attn.c_proj"), down=_set("mlp.c_proj")),
    "gpt_neox": Expected(
        r"gpt_neox\.layers",
        _set("mlp.dense_h_to_4h"),
        _set("attention.query_key_value", "attention.dense"),
        down=_set("mlp.dense_4h_to_h"),
    ),
    "opt": Expected(
        r"model\.decoder\.layers",
        _set("fc1"),
        _set("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        down=_set("fc2"),
    ),
    "falcon": Expected(
        r"transformer\.h",
        _set("mlp.dense_h_to_4h"),
        _set("self_attention.query_key_value", "self_attention.dense"),
        down=_set("mlp.dense_4h_to_h"),
    ),
    "mixtral": Expected(
        r"model\.layers",
        frozenset(),
        _LLAMA_ATTN,
        mlp_params=_set("mlp.experts.gate_up_proj"),
        down_params=_set("mlp.experts.down_proj"),
    ),
    "qwen2_moe": Expected(
        r"model\.layers",
        _set("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
        _LLAMA_ATTN,
        mlp_params=_set("mlp.experts.gate_up_proj"),
        down=_set("mlp.shared_expert.down_proj"),
        down_params=_set("mlp.experts.down_proj"),
    ),
    "bert": Expected(
        r"encoder\.layer",
        _set("intermediate.dense"),
        _set("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        down=_set("output.dense"),
    ),
    "bert_seq_cls": Expected(
        r"bert\.encoder\.layer",
        _set("intermediate.dense"),
        _set("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        down=_set("output.dense"),
    ),
    # VLMs: only the language model; the vision towers use the very same names (mlp.fc1, mlp.gate_proj, attn.qkv...)
    "llava": Expected(r"model\.language_model\.layers", _LLAMA_MLP, _LLAMA_ATTN, down=_LLAMA_DOWN),
    "qwen2_5_vl": Expected(r"model\.language_model\.layers", _LLAMA_MLP, _LLAMA_ATTN, down=_LLAMA_DOWN),
}
FAMILIES = list(EXPECTED)
PRESETS = {"mlp": SelectiveMLPConfig, "attn": SAProjConfig}
RANKS = [None, 4]

ALL_CASES = pytest.mark.parametrize(
    ("family", "preset", "rank"),
    [(f, p, r) for f in FAMILIES for p in PRESETS for r in RANKS],
    ids=lambda v: "full" if v is None else (f"r{v}" if isinstance(v, int) else v),
)


# ------------------------------------------------------------------------------------------------------- helpers
def _out_in(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like base module; GPT-2's Conv1D stores its weight as (in, out)."""
    weight = module.weight
    return tuple(weight.shape[::-1]) if type(module).__name__ == "Conv1D" else tuple(weight.shape)


def expected_adapter_params(
    base: nn.Module,
    expected: Expected,
    preset: str,
    rank: int | None,
    adapter: str = "default",
    layers: set[int] | None = None,
    with_down: bool = False,
    drop: frozenset[str] = frozenset(),
) -> dict[str, tuple[int, ...]]:
    """Names (as in the PeftModel) and shapes of the adapter parameters the preset must create on `base`."""
    if preset == "mlp":
        suffixes, param_suffixes = expected.mlp, expected.mlp_params
        if with_down:
            suffixes, param_suffixes = suffixes | expected.down, param_suffixes | expected.down_params
    else:
        suffixes, param_suffixes = expected.attn, frozenset()
    suffixes, param_suffixes = suffixes - drop, param_suffixes - drop
    block_re = re.compile(rf"^{expected.blocks}\.(\d+)\.(.+)$")
    found: dict[str, tuple[int, ...]] = {}
    matched: set[str] = set()

    def add(prefix: str, lead: tuple[int, ...], out_f: int, in_f: int, has_bias: bool) -> None:
        if rank is None:
            found[f"{prefix}.selective_delta_weight.{adapter}"] = (*lead, out_f, in_f)
        else:
            found[f"{prefix}.selective_delta_A.{adapter}"] = (*lead, rank, in_f)
            found[f"{prefix}.selective_delta_B.{adapter}"] = (*lead, out_f, rank)
        if has_bias:
            found[f"{prefix}.selective_delta_bias.{adapter}"] = (*lead, out_f)

    for name, module in base.named_modules():
        match = block_re.match(name)
        if not match or (layers is not None and int(match[1]) not in layers):
            continue
        inner = match[2]
        if inner in suffixes:
            matched.add(inner)
            add(f"base_model.model.{name}", (), *_out_in(module), getattr(module, "bias", None) is not None)
        params = [p for p in module.named_parameters(recurse=False) if f"{inner}.{p[0]}" in param_suffixes]
        for i, (pname, param) in enumerate(params):
            matched.add(f"{inner}.{pname}")
            # a second targeted parameter of the same experts module nests its wrapper under `base_layer`
            prefix = f"base_model.model.{name}" + ".base_layer" * (len(params) - 1 - i)
            add(prefix, tuple(param.shape[:1]), *param.shape[1:], False)
    # guard against a typo in the table silently expecting nothing
    assert matched == suffixes | param_suffixes, f"table entries not found in the model: {suffixes - matched}"
    return found


def trainable(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def assert_changed(new: torch.Tensor, old: torch.Tensor) -> None:
    """`new` differs from `old` by more than rounding: relative to the output's scale (a sequence classifier's logits
    are ~1e-2, a language model's ~1)."""
    assert (new - old).abs().max() > 1e-3 * old.abs().max(), "the update should change the output"


def make_config(preset: str, rank: int | None, **kwargs):
    return PRESETS[preset](rank=rank, **kwargs)


@pytest.fixture
def adapted(make_tiny_model, tiny_inputs, model_output):
    """`adapted(family, preset, rank, **config)` -> (peft model, base logits computed before wrapping, inputs)."""

    def build(family: str, preset: str, rank: int | None, **kwargs):
        model = make_tiny_model(family)
        inputs = tiny_inputs(family)
        with torch.no_grad():
            base_logits = model_output(model, inputs)
        kwargs.setdefault("init_weights", False)
        peft_model = get_peft_model(model, make_config(preset, rank, **kwargs))
        return peft_model, base_logits, inputs

    return build


def test_table_covers_every_tiny_family(tiny_families):
    assert set(tiny_families) == set(EXPECTED)


# --------------------------------------------------------------------------------------- 1. trainable parameters
@ALL_CASES
def test_exactly_the_role_modules_are_trainable(family, preset, rank, make_tiny_model):
    base = make_tiny_model(family)
    expected = expected_adapter_params(base, EXPECTED[family], preset, rank)
    peft_model = get_peft_model(base, make_config(preset, rank))

    assert trainable(peft_model) == expected
    # the concrete names are recorded in the config (and so in adapter_config.json)
    config = peft_model.peft_config["default"]
    expected_owners = {n.removeprefix("base_model.model.").rsplit(".", 2)[0] for n in expected}
    expected_owners = {re.sub(r"(\.base_layer)+$", "", n) for n in expected_owners}
    recorded = set(config.target_modules or ()) | {p.rpartition(".")[0] for p in config.target_parameters or ()}
    assert recorded == expected_owners
    # every adapter parameter lives in a selective layer, and no selective layer sits outside the language blocks
    block_re = re.compile(rf"^base_model\.model\.{EXPECTED[family].blocks}\.\d+\.")
    for name, module in peft_model.named_modules():
        if isinstance(module, SelectiveLayer):
            assert block_re.match(name), name


# ------------------------------------------------------------------------------------------------- 2. gradients
@ALL_CASES
def test_gradients_reach_only_the_adapter(family, preset, rank, adapted, model_output, make_tiny_model):
    peft_model, _, inputs = adapted(family, preset, rank)
    expected = expected_adapter_params(make_tiny_model(family), EXPECTED[family], preset, rank)
    peft_model.train()  # as in training (dropout on where the family has it), with a fixed dropout mask
    torch.manual_seed(0)
    logits = model_output(peft_model, inputs)
    logits.float().square().mean().backward()

    adapter_names = set()
    for name, param in peft_model.named_parameters():
        if name in expected:
            adapter_names.add(name)
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None or not param.grad.any(), f"gradient leaked into frozen {name}"
    assert adapter_names == set(expected) == set(trainable(peft_model))


# ----------------------------------------------------------------------------------------- 3. disable_adapter
@ALL_CASES
def test_disable_adapter_gives_the_base_model_exactly(family, preset, rank, adapted, model_output):
    peft_model, base_logits, inputs = adapted(family, preset, rank)
    with torch.no_grad():
        adapted_logits = model_output(peft_model, inputs)
        with peft_model.disable_adapter():
            disabled_logits = model_output(peft_model, inputs)
        again = model_output(peft_model, inputs)
    assert_changed(adapted_logits, base_logits)
    assert torch.equal(disabled_logits, base_logits)
    assert torch.equal(again, adapted_logits)


# ---------------------------------------------------------------------------------------- 4. merge_and_unload
@ALL_CASES
def test_merge_and_unload_matches_the_unmerged_adapter(family, preset, rank, adapted, model_output, make_tiny_model):
    peft_model, base_logits, inputs = adapted(family, preset, rank)
    with torch.no_grad():
        adapted_logits = model_output(peft_model, inputs)
        merged = peft_model.merge_and_unload()
        merged_logits = model_output(merged, inputs)
    assert not any(isinstance(m, SelectiveLayer) for m in merged.modules())
    assert merged.state_dict().keys() == make_tiny_model(family).state_dict().keys()
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=0)
    assert_changed(merged_logits, base_logits)


# ----------------------------------------------------------------------------------------------- 5. save / load
@ALL_CASES
def test_save_and_load_round_trip(family, preset, rank, adapted, model_output, make_tiny_model, tmp_path):
    peft_model, _, inputs = adapted(family, preset, rank)
    with torch.no_grad():
        adapted_logits = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_tiny_model(family), tmp_path)
    assert type(loaded.peft_config["default"]) is PRESETS[preset]
    assert set(loaded.state_dict()) == set(peft_model.state_dict())
    with torch.no_grad():
        loaded_logits = model_output(loaded, inputs)
    assert torch.equal(loaded_logits, adapted_logits)


# ------------------------------------------------------------------------------------------ 6. two adapters add
def _first(model: nn.Module, cls: type) -> nn.Module | None:
    return next((m for m in model.modules() if type(m) is cls), None)


def _check_linear_adds_up(peft_model: PeftModel, layer: SelectiveLinear) -> None:
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(7))
    outputs = {}
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        for active in ("one", "two", ("one", "two")):
            peft_model.base_model.set_adapter(list(active) if isinstance(active, tuple) else active)
            outputs[active] = layer(x)
    delta_a, delta_b = outputs["one"] - base, outputs["two"] - base
    assert delta_a.abs().max() > 1e-3 and delta_b.abs().max() > 1e-3
    assert not torch.allclose(delta_a, delta_b)
    torch.testing.assert_close(outputs[("one", "two")] - base, delta_a + delta_b, atol=1e-5, rtol=0)


def _check_experts_add_up(peft_model: PeftModel, layer: ParamWrapper) -> None:
    """Fused experts are not linear in their weights (act(gate) * up), so 'adding up' is checked in weight space:
    both adapters active must behave as one experts module whose parameter is W + ΔW_a + ΔW_b."""
    experts = layer.get_base_layer()
    num_experts = layer.leading_shape[0]
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, experts.hidden_dim, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:2] for _ in range(6)])
    top_k_weights = torch.softmax(torch.randn(6, 2, generator=generator), dim=-1)
    reference = copy.deepcopy(experts)
    with torch.no_grad():
        getattr(reference, layer.parameter_name).add_(layer.get_delta_weight("one") + layer.get_delta_weight("two"))
        peft_model.base_model.set_adapter(["one", "two"])
        both = layer(hidden, top_k_index, top_k_weights)
        base = experts(hidden, top_k_index, top_k_weights)
        expect = reference(hidden, top_k_index, top_k_weights)
    assert_changed(both, base)
    torch.testing.assert_close(both, expect, atol=1e-5, rtol=0)


@ALL_CASES
def test_two_active_adapters_add_up(family, preset, rank, make_tiny_model, tiny_inputs, model_output):
    inputs = tiny_inputs(family)
    torch.manual_seed(10)
    peft_model = get_peft_model(make_tiny_model(family), make_config(preset, rank, init_weights=False), "one")
    torch.manual_seed(11)
    peft_model.add_adapter("two", make_config(preset, rank, init_weights=False))

    linear, experts = _first(peft_model, SelectiveLinear), _first(peft_model, ParamWrapper)
    assert linear is not None or experts is not None
    if linear is not None:
        _check_linear_adds_up(peft_model, linear)
    if experts is not None:
        _check_experts_add_up(peft_model, experts)

    logits = {}
    with torch.no_grad():
        for active in ("one", "two", ("one", "two")):
            peft_model.base_model.set_adapter(list(active) if isinstance(active, tuple) else active)
            logits[active] = model_output(peft_model, inputs)
    assert_changed(logits[("one", "two")], logits["one"])
    assert_changed(logits[("one", "two")], logits["two"])
    # both adapters active are both trainable
    expected = expected_adapter_params(make_tiny_model(family), EXPECTED[family], preset, rank, adapter="one")
    expected |= expected_adapter_params(make_tiny_model(family), EXPECTED[family], preset, rank, adapter="two")
    assert trainable(peft_model) == expected


# ---------------------------------------------------------------------------------------------------- options
class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix_in = nn.Linear(8, 16)
        self.squash = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.squash(torch.relu(self.mix_in(x)))


class _OddModel(nn.Module):
    """An architecture peft-selective has never heard of: no recognisable role names."""

    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([_OddBlock(), _OddBlock()])
        self.readout = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return self.readout(x)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_unknown_architecture_lists_linear_modules_and_asks_for_target_modules(preset):
    with pytest.raises(ValueError) as info:
        get_peft_model(_OddModel(), make_config(preset, None))
    message = str(info.value)
    assert "target_modules" in message
    for name in ("mix_in", "squash", "readout"):
        assert name in message

    # and the advice works
    torch.manual_seed(0)
    model = get_peft_model(_OddModel(), make_config(preset, None, target_modules=["mix_in"]))
    assert set(trainable(model)) == {
        f"base_model.model.stack.{i}.mix_in.{p}.default"
        for i in range(2)
        for p in ("selective_delta_weight", "selective_delta_bias")
    }


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_layers_to_transform_adapts_only_that_block(family, preset, make_tiny_model):
    base = make_tiny_model(family)
    expected = expected_adapter_params(base, EXPECTED[family], preset, None, layers={1})
    assert expected
    peft_model = get_peft_model(base, make_config(preset, None, layers_to_transform=[1]))
    assert trainable(peft_model) == expected


@pytest.mark.parametrize(
    ("family", "preset", "exclude", "dropped"),
    [
        ("llama", "attn", ["k_proj"], _set("self_attn.k_proj")),
        ("gpt2", "attn", ["attn.c_proj"], _set("attn.c_proj")),
        ("qwen2_moe", "mlp", ["shared_expert.up_proj"], _set("mlp.shared_expert.up_proj")),
        ("llava", "mlp", ["gate_proj"], _set("mlp.gate_proj")),
    ],
)
def test_exclude_modules_suffix_list(family, preset, exclude, dropped, make_tiny_model):
    base = make_tiny_model(family)
    expected = expected_adapter_params(base, EXPECTED[family], preset, None, drop=dropped)
    peft_model = get_peft_model(base, make_config(preset, None, exclude_modules=exclude))
    assert trainable(peft_model) == expected


def test_exclude_modules_regex(make_tiny_model):
    base = make_tiny_model("llama")
    expected = expected_adapter_params(base, EXPECTED["llama"], "attn", None, layers={1})
    peft_model = get_peft_model(base, SAProjConfig(exclude_modules=r".*layers\.0\..*"))
    assert trainable(peft_model) == expected


def test_exclude_modules_drops_fused_experts(make_tiny_model):
    base = make_tiny_model("mixtral")
    expected = expected_adapter_params(base, EXPECTED["mixtral"], "mlp", None, layers={1})
    peft_model = get_peft_model(base, SelectiveMLPConfig(exclude_modules=["layers.0.mlp.experts"]))
    assert trainable(peft_model) == expected


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt", "bert", "mixtral", "qwen2_moe", "qwen2_5_vl"])
def test_train_down_proj_warns_and_adds_the_down_projection(family, make_tiny_model, tiny_inputs, model_output):
    base = make_tiny_model(family)
    expected = expected_adapter_params(base, EXPECTED[family], "mlp", None, with_down=True)
    with pytest.warns(UserWarning, match="down projection"):
        config = SelectiveMLPConfig(train_down_proj=True, init_weights=False)
    peft_model = get_peft_model(base, config)
    assert trainable(peft_model) == expected

    # and the extra targets are live: gradients reach every one of them (MoE: two nested wrappers on one experts
    # module, one per fused parameter)
    inputs = tiny_inputs(family)
    base_logits = model_output(make_tiny_model(family), inputs).detach()
    adapted_logits = model_output(peft_model, inputs)
    adapted_logits.float().square().mean().backward()
    for name, param in peft_model.named_parameters():
        assert (param.grad is not None and param.grad.abs().sum() > 0) == (name in expected), name
    # disabling and merging account for every level of nesting
    with torch.no_grad():
        with peft_model.disable_adapter():
            assert torch.equal(model_output(peft_model, inputs), base_logits)
        merged = peft_model.merge_and_unload()
        assert not any(isinstance(m, SelectiveLayer) for m in merged.modules())
        torch.testing.assert_close(model_output(merged, inputs), adapted_logits.detach(), atol=1e-5, rtol=0)


def test_default_mlp_config_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SelectiveMLPConfig()
        SAProjConfig(rank=4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("rank", RANKS, ids=["full", "r4"])
def test_delete_adapter(family, rank, make_tiny_model, tiny_inputs, model_output):
    inputs = tiny_inputs(family)
    torch.manual_seed(10)
    peft_model = get_peft_model(make_tiny_model(family), SelectiveMLPConfig(rank=rank, init_weights=False), "one")
    with torch.no_grad():
        only_a = model_output(peft_model, inputs)
    torch.manual_seed(11)
    peft_model.add_adapter("two", SelectiveMLPConfig(rank=rank, init_weights=False))
    peft_model.base_model.set_adapter(["one", "two"])

    peft_model.delete_adapter("two")
    assert "two" not in peft_model.peft_config
    assert not any(n.endswith(".two") for n, _ in peft_model.named_parameters())
    for module in peft_model.modules():
        if isinstance(module, SelectiveLayer):
            assert "two" not in module.rank and module.active_adapters == ["one"]
    expected = expected_adapter_params(make_tiny_model(family), EXPECTED[family], "mlp", rank, adapter="one")
    assert trainable(peft_model) == expected
    with torch.no_grad():
        assert torch.equal(model_output(peft_model, inputs), only_a)

    # deleting the last adapter leaves the base model (PeftModel itself then has no active adapter to forward with,
    # as with LoRA: run the wrapped model)
    peft_model.delete_adapter("one")
    assert not trainable(peft_model)
    assert not any("selective_delta_" in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        base_logits = model_output(make_tiny_model(family), inputs)
        assert torch.equal(model_output(peft_model.base_model.model, inputs), base_logits)
