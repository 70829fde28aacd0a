"""Find, from a model's structure alone, which modules play which role in its decoder (or encoder) blocks.

The selective methods name *roles* ("the MLP's input projections", "the self-attention projections"), not module
names, because every architecture spells them differently: Llama's `gate_proj`/`up_proj`, Phi-3's fused
`gate_up_proj`, GPT-2's `Conv1D` `c_fc`, GPT-NeoX's `dense_h_to_4h`, OPT's `fc1`, BERT's `intermediate.dense`, and
Mixtral's fused per-expert `experts.gate_up_proj` parameter. A role is matched on the path of a module *inside its
block* (the part after `layers.3.`), which is what keeps a vision tower's `mlp.fc1` (same names, other tower) out:
modules under a vision tower or multimodal projector are never candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from torch import nn


class Role(str, Enum):
    """The parts of a transformer block the selective methods can target."""

    MLP_INPUT = "mlp_input"  # gate/up (or the single input projection of gate-less MLPs)
    MLP_OUTPUT = "mlp_output"  # down projection
    ATTENTION = "attention"  # q/k/v/o, fused or not


# Patterns on the module path inside its block. Order does not matter: each pattern belongs to exactly one role.
_ROLE_PATTERNS: dict[Role, tuple[str, ...]] = {
    Role.MLP_INPUT: (
        r"(.*\.)?(gate_proj|up_proj|gate_up_proj|w1|w3|c_fc|dense_h_to_4h|fc1|fc_in|wi|wi_0|wi_1)",
        r"intermediate\.dense",
    ),
    Role.MLP_OUTPUT: (
        r"(.*\.)?(down_proj|w2|dense_4h_to_h|fc2|fc_out|wo)",
        r"(mlp|feed_forward|ffn)\.c_proj",
        r"output\.dense",
    ),
    Role.ATTENTION: (
        r"(.*\.)?(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|query_key_value|Wqkv|out_proj|query|key|value)",
        r"(attn|attention|self_attn|self_attention)\.(c_proj|dense|o|q|k|v)",
        r"attention\.output\.dense",
    ),
}
_COMPILED = {role: [re.compile(p) for p in patterns] for role, patterns in _ROLE_PATTERNS.items()}

# Parameters (not modules) that hold the experts of fused MoE blocks (transformers >= 5: Mixtral, Qwen2-MoE, ...).
_EXPERT_PARAM_ROLES = {"gate_up_proj": Role.MLP_INPUT, "down_proj": Role.MLP_OUTPUT}

# A block is the numbered child of one of these containers: `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`.
_BLOCK_RE = re.compile(r"(?:^|.*?\.)(?:layers|layer|h|blocks|block)\.(?P<idx>\d+)\.(?P<inner>.+)$")
# Sub-models that share module names with the language model but must never be adapted.
_NON_LANGUAGE_PARTS = frozenset(
    {
        "vision_tower",
        "vision_model",
        "visual",
        "vision_encoder",
        "image_encoder",
        "multi_modal_projector",
        "mm_projector",
        "audio_tower",
        "audio_encoder",
        "vision",
    }
)


@dataclass(frozen=True)
class TargetSet:
    """What a role resolved to: full module names for `target_modules`, full parameter names for
    `target_parameters` (fused MoE experts)."""

    modules: list[str]
    parameters: list[str]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes 4/8-bit, Falcon's `FalconLinear`) and GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_language_model(name: str) -> bool:
    return not any(part in _NON_LANGUAGE_PARTS for part in name.split("."))


def split_block_path(name: str, layers_pattern: str | list[str] | None = None) -> tuple[int, str] | None:
    """`"model.layers.3.mlp.up_proj"` -> `(3, "mlp.up_proj")`; None if the module is not inside a numbered block."""
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.(?P<inner>.+)$", name)
            if match:
                return int(match["idx"]), match["inner"]
        return None
    match = _BLOCK_RE.match(name)
    return (int(match["idx"]), match["inner"]) if match else None


def role_of(inner_path: str) -> Role | None:
    """The role of a module given its path inside the block, or None."""
    for role, patterns in _COMPILED.items():
        if any(p.fullmatch(inner_path) for p in patterns):
            return role
    return None


def _strip_peft_wrappers(name: str) -> str:
    # When a model already carries adapters, its modules sit under `.base_layer`; roles are about the original path.
    return name.replace(".base_layer", "")


def resolve_targets(
    model: nn.Module,
    roles: set[Role],
    layers_to_transform: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
) -> TargetSet:
    """Resolve roles to the concrete module and parameter names of `model`'s language-model blocks.

    Raises:
        ValueError: if nothing in the model plays any of the roles; the message lists the linear modules found and
            how to pass `target_modules` explicitly.
    """
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    # dicts as ordered sets: with adapters already attached, a module shows up as wrapper and as `base_layer`
    modules: dict[str, None] = {}
    parameters: dict[str, None] = {}
    for raw_name, module in model.named_modules():
        name = _strip_peft_wrappers(raw_name)
        if not _in_language_model(name):
            continue
        located = split_block_path(name, layers_pattern)
        if located is None:
            continue
        layer_idx, inner = located
        if layers_to_transform is not None and layer_idx not in layers_to_transform:
            continue
        if is_linear_like(module) and role_of(inner) in roles:
            modules[name] = None
        elif type(module).__name__.endswith("Experts"):
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3 and _EXPERT_PARAM_ROLES.get(param_name) in roles:
                    parameters[f"{name}.{param_name}"] = None
    if not modules and not parameters:
        raise ValueError(unresolved_message(model, roles))
    return TargetSet(modules=list(modules), parameters=list(parameters))


def unresolved_message(model: nn.Module, roles: set[Role]) -> str:
    linear_suffixes = sorted(
        {
            _strip_peft_wrappers(n).rpartition(".")[2] if split_block_path(n) is None else split_block_path(n)[1]
            for n, m in model.named_modules()
            if is_linear_like(m) and n and _in_language_model(n)
        }
    )
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    wanted = ", ".join(sorted(r.value for r in roles))
    return (
        f"Could not find the modules for role(s) [{wanted}] in this {model_type!r} model: its architecture is not "
        f"one peft-selective recognises. Linear modules found (path inside a block): {linear_suffixes or 'none'}. "
        "Pass them explicitly, e.g. `SelectiveMLPConfig(target_modules=['mlp.fc_in'])` (names are matched as "
        "suffixes of the full module name, as in PEFT), and please open an issue so the architecture can be added."
    )
