"""The adapter methods the benchmarks compare, in one registry: every benchmark builds its PEFT configs here.

A method is a PEFT config family (PEFT LoRA, SelectiveMLP, SAProj, GeometryProjected, or full fine-tuning without
PEFT) on a fixed set of modules. `peft_config(key, rank, alpha)` builds it; a benchmark's own rows or arms (which
trainer, which penalties, which row is compared with which) stay in the benchmark and name a method of `METHODS`.

LoRA is matched to our adapters: the same rank, `lora_alpha` equal to our `alpha`, no dropout, no bias. Full-rank
methods take no rank and no alpha. Further config fields (`train_bias=False`, a GeometryProjected `tolerance`, ...)
are passed as keyword options and override the method's defaults, its target modules included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


MLP_MODULES = ("gate_proj", "up_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = ATTN_MODULES + MLP_MODULES + ("down_proj",)
#: GeometryProjected's default targets: attention and the MLP's input projections
ATTN_MLP_MODULES = ATTN_MODULES + MLP_MODULES

FAMILIES = ("lora", "selective_mlp", "saproj", "geometry", "full_ft")
_CONFIG_CLASSES = {
    "selective_mlp": "SelectiveMLPConfig",
    "saproj": "SAProjConfig",
    "geometry": "GeometryProjectedConfig",
}


@dataclass(frozen=True)
class AdapterMethod:
    key: str
    label: str
    family: str  # one of FAMILIES
    #: the modules it adapts; None: the config's own default targets (SelectiveMLP: gate/up, SAProj: q/k/v/o, ...)
    modules: tuple[str, ...] | None = None
    full_rank: bool = False  # a selective method at full rank: `rank=None`, no alpha

    @property
    def full_finetuning(self) -> bool:
        return self.family == "full_ft"

    def peft_config(self, rank: int | None = None, alpha: float | None = None, **options: Any) -> Any:
        """The method's PEFT config at `rank` / `alpha` (ignored at full rank); None for full fine-tuning."""
        if self.family == "full_ft":
            if options:
                raise ValueError(f"{self.key}: full fine-tuning takes no config options, got {sorted(options)}")
            return None
        fields: dict[str, Any] = {} if self.modules is None else {"target_modules": list(self.modules)}
        if self.family == "lora":
            from peft import LoraConfig

            fields.update(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            return LoraConfig(**{**fields, **options})
        import peft_selective

        if self.full_rank:
            fields["rank"] = None
        else:
            fields.update(rank=rank, alpha=alpha)
        return getattr(peft_selective, _CONFIG_CLASSES[self.family])(**{**fields, **options})


METHODS: dict[str, AdapterMethod] = {
    method.key: method
    for method in (
        AdapterMethod("lora_mlp", "LoRA gate/up", "lora", MLP_MODULES),
        AdapterMethod("lora_attn", "LoRA q/k/v/o", "lora", ATTN_MODULES),
        AdapterMethod("lora_attn_mlp", "LoRA q/k/v/o + gate/up", "lora", ATTN_MLP_MODULES),
        AdapterMethod("lora_all", "LoRA all-linear", "lora", ALL_LINEAR_MODULES),
        AdapterMethod("selective_mlp_lowrank", "SelectiveMLP low-rank", "selective_mlp"),
        AdapterMethod("selective_mlp_full", "SelectiveMLP full-rank", "selective_mlp", full_rank=True),
        AdapterMethod("saproj_lowrank", "SAProj low-rank", "saproj"),
        AdapterMethod("saproj_full", "SAProj full-rank", "saproj", full_rank=True),
        AdapterMethod("geometry", "GeometryProjected q/k/v/o + gate/up", "geometry"),
        AdapterMethod("geometry_mlp", "GeometryProjected gate/up", "geometry", MLP_MODULES),
        AdapterMethod("full_ft", "Full fine-tuning", "full_ft"),
    )
}


def method(key: str) -> AdapterMethod:
    try:
        return METHODS[key]
    except KeyError:
        raise KeyError(f"unknown adapter method {key!r}; the registry has {sorted(METHODS)}") from None


def peft_config(key: str, rank: int | None = None, alpha: float | None = None, **options: Any) -> Any:
    """`METHODS[key].peft_config(rank, alpha, **options)`."""
    return method(key).peft_config(rank, alpha, **options)


def selective_mlp_config(rank: int | None, alpha: float | None = None, **options: Any) -> Any:
    """SelectiveMLP at `rank` / `alpha`, or at full rank when `rank` is None (the benchmarks' `--rank` convention)."""
    return peft_config("selective_mlp_full" if rank is None else "selective_mlp_lowrank", rank, alpha, **options)
