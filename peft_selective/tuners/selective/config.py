"""Configs of the selective methods: one dataclass of shared options, one small subclass per preset.

The presets differ only in *where* the update goes (which block roles): every preset uses the same delta layer
(`layer.py`) and tuner (`model.py`). A preset that changes *how* the update is applied names a layer variant
(`layer_variant`, as GeometryProjected does in `..geometry`); the presets here use the plain update.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from ...targets import Role


@dataclass
class SelectiveConfig(PeftConfig):
    """
    Options shared by the selective PEFT methods. Use a preset ([`SelectiveMLPConfig`], [`SAProjConfig`]) rather than
    this class.

    Each targeted layer `y = W x + b` gets an additive update `y = (W + ΔW) x + (b + Δb)` that lives in the adapter;
    the base weights are never modified (unless you merge). `ΔW` is either a full matrix (`rank=None`, the paper's
    recipe) or a low-rank product `scale · B A` (`rank=r`, for large or quantized bases).

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Modules to adapt. `None` (the default) resolves the preset's roles from the model's architecture (Llama,
            Mistral, Qwen2/3, Gemma/2, Phi-3, GPT-2, GPT-NeoX, OPT, Falcon, Mixtral, Qwen2-MoE, BERT-style encoders,
            the language model of LLaVA / Qwen2.5-VL) and records the resolved full names here. A list matches module
            name suffixes and a string is a full-match regex, as in PEFT.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Modules never to adapt, same matching rules as `target_modules`.
        target_parameters (`Optional[list[str]]`):
            3-D expert parameters of fused MoE blocks (e.g. `model.layers.0.mlp.experts.gate_up_proj`). Resolved
            automatically with `target_modules=None`.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Only adapt the blocks with these indices.
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the block container (`"layers"`, `"h"`) used with `layers_to_transform` when it cannot be inferred.
        rank (`Optional[int]`):
            `None`: full-rank update `ΔW` (same shape as the weight). An integer `r`: low-rank update `B A` with
            `A: r x in`, `B: out x r`, `B = 0` at init (as LoRA).
        alpha (`Optional[float]`):
            Low-rank only: the update is scaled by `alpha / rank` (like `lora_alpha`). `None` means `alpha = rank`.
        init_weights (`bool`):
            `True`: the update starts at zero, so the adapted model equals the base. `False`: random non-zero init,
            only useful for tests.
        train_bias (`bool`):
            Also learn an additive bias update `Δb` on targeted layers that have a bias (the paper trains biases).
        modules_to_save (`Optional[list[str]]`):
            Extra modules to train fully and save with the adapter (e.g. a classification head).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to adapt; None resolves the preset's roles from the architecture."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to adapt (suffix list or full-match regex)."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "3-D fused MoE expert parameters to adapt; resolved automatically."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the block container, e.g. 'layers' or 'h'."}
    )
    rank: int | None = field(
        default=None, metadata={"help": "None: full-rank update (the paper). An int: low-rank update B A."}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "Low-rank only: scale the update by alpha / rank. None means alpha = rank."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start from a zero update (False: random, tests)."})
    train_bias: bool = field(default=True, metadata={"help": "Learn a bias update where the base layer has a bias."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter."}
    )

    #: The block roles a preset targets when `target_modules` is None.
    target_roles: ClassVar[frozenset[Role]] = frozenset()
    #: PeftType member name of the preset (set by subclasses). The member exists by the time a config is built:
    #: importing this module imports its tuner package first, whose `__init__.py` registers the method.
    peft_type_name: ClassVar[str] = ""
    #: Name of the layer variant (`layer.SelectiveVariant`, registered with `layer.register_variant`) that gives the
    #: preset's adapters extra behaviour on the shared layer; None: the plain additive update.
    layer_variant: ClassVar[Optional[str]] = None
    #: Whether the adapter must be calibrated before training (GeometryProjected).
    requires_calibration: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[self.peft_type_name]
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"`rank` must be None (full-rank update) or a positive integer, got {self.rank!r}.")
        if self.rank is None and self.alpha is not None:
            raise ValueError("`alpha` only applies to low-rank updates: set `rank` as well, or leave `alpha=None`.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only applies together with `layers_to_transform`.")

    @property
    def scaling(self) -> float:
        """Multiplier of the low-rank product; 1 for full-rank updates."""
        if self.rank is None:
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def roles(self) -> set[Role]:
        """Roles resolved from the architecture when `target_modules` is None."""
        return set(self.target_roles)


@dataclass
class SelectiveMLPConfig(SelectiveConfig):
    """
    "Gate&Up" (Zhu, Hoiem et al. 2025, arXiv 2510.08564): train only the MLP input projections of every block
    (`gate_proj` and `up_proj`, or `c_fc` / `fc1` / `dense_h_to_4h` / `intermediate.dense` in MLPs without a gate,
    per-expert gate/up in MoE blocks), with the down projection, attention, embeddings, norms and `lm_head` frozen.
    The paper reports learning close to full fine-tuning with a small fraction of its forgetting.

    Args:
        train_down_proj (`bool`):
            Also adapt the MLP output (down) projection. Off by default: freezing it is what limits the output
            distribution shift the paper identifies as the cause of forgetting. Turning it on warns.
        (all other options: see [`SelectiveConfig`])

    Example:

        ```py
        >>> import peft_selective
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_selective.SelectiveMLPConfig())
        ```
    """

    train_down_proj: bool = field(
        default=False,
        metadata={"help": "Also adapt the MLP down projection (not recommended: it drives forgetting)."},
    )

    target_roles: ClassVar[frozenset[Role]] = frozenset({Role.MLP_INPUT})
    peft_type_name: ClassVar[str] = "SELECTIVE_MLP"

    def __post_init__(self):
        super().__post_init__()
        if self.train_down_proj and not self.inference_mode:
            warnings.warn(
                "SelectiveMLPConfig(train_down_proj=True): the MLP down projection will be trained too. The Gate&Up "
                "recipe keeps it frozen because updating it shifts the output distribution, which is what makes "
                "models forget; expect more forgetting.",
                UserWarning,
                stacklevel=3,
            )

    def roles(self) -> set[Role]:
        return {Role.MLP_INPUT, Role.MLP_OUTPUT} if self.train_down_proj else {Role.MLP_INPUT}


@dataclass
class SAProjConfig(SelectiveConfig):
    """
    "SA Proj" (same paper): train only the self-attention projections (q/k/v/o, or fused `qkv_proj` / `c_attn` /
    `query_key_value`), weights and biases, of every block; MLPs, embeddings, norms and `lm_head` frozen. Learns a
    little less than Gate&Up and forgets the least in the paper.

    Example:

        ```py
        >>> model = get_peft_model(base_model, peft_selective.SAProjConfig(rank=16))
        ```
    """

    target_roles: ClassVar[frozenset[Role]] = frozenset({Role.ATTENTION})
    peft_type_name: ClassVar[str] = "SAPROJ"
