"""The month t−1 model as a view of the month t policy.

A monthly campaign stacks adapters: month t trains a new adapter on top of the frozen adapters of months 1..t−1, all
active together on one (possibly 4-bit) base. The model of month t−1 is then the same network with the new adapter
switched off. [`PreviousMonthReference`] is that view: it owns no weights, it runs the policy with only the earlier
adapters active, so the DPO reference, the retention KL and the evaluation all see the month t−1 model without a
second copy of the base in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn


@contextlib.contextmanager
def active_adapters(model: PeftModel, adapter_names: Sequence[str]) -> Iterator[None]:
    """Run `model` with exactly `adapter_names` active (all adapters disabled when it is empty), then restore.

    PEFT's `set_adapter` also flips `requires_grad` of the adapters it (de)activates; the flags are restored too, so a
    frozen earlier month stays frozen and the month being trained stays trainable.
    """
    names = list(adapter_names)
    missing = [name for name in names if name not in model.peft_config]
    if missing:
        raise ValueError(f"Adapter(s) {missing} are not in the model; it has {sorted(model.peft_config)}.")
    tuner = model.base_model
    previous = list(tuner.active_adapters)
    if previous == names:
        yield
        return
    # Both `set_adapter` and re-enabling after `disable_adapter` mark the active adapters trainable.
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        if names:
            tuner.set_adapter(names)
            yield
        else:
            with model.disable_adapter():
                yield
    finally:
        if names:
            tuner.set_adapter(previous)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


class _BackboneWithAdapters(nn.Module):
    """The policy's transformer backbone (no LM head), called with only `adapter_names` active."""

    def __init__(self, reference: PreviousMonthReference) -> None:
        super().__init__()
        self.__dict__["_reference"] = reference  # not a submodule: it owns no parameters

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        reference = self._reference
        with active_adapters(reference.policy, reference.adapter_names):
            return reference.policy.get_base_model().base_model(*args, **kwargs)


class PreviousMonthReference(nn.Module):
    """The policy with only the earlier months' adapters active: the month t−1 model, sharing the policy's weights.

    It is what [`ContinualDPOTrainer`] passes to TRL as `ref_model`. TRL patches its reference with a fused LM head
    (`trl.trainer.utils.add_fused_lm_head`), which looks up `config`, `base_model` (the backbone) and
    `get_output_embeddings()` on every call: the view answers with the policy's, the backbone run under
    [`active_adapters`]. Called plainly, it returns the policy's ordinary output (logits) under the same adapters.
    This imitation is a private TRL seam (`fused_lm_head_reference` in
    `peft_selective.continual.trainer.TRL_SEAMS`), checked against the installed TRL by
    `tests/continual/test_trl_seams.py`.

    Args:
        policy (`PeftModel`): the model being trained, holding the earlier months' adapters and the new one.
        adapter_names (`Sequence[str]`): the adapters that make up the month t−1 model (empty: the bare base).
    """

    def __init__(self, policy: PeftModel, adapter_names: Sequence[str]) -> None:
        super().__init__()
        # Held outside `_modules`: the policy's parameters belong to the trainer's model, and `.eval()` / `.to()` on
        # the reference must not reach it.
        self.__dict__["policy"] = policy
        self.adapter_names = list(adapter_names)
        self.__dict__["_backbone"] = _BackboneWithAdapters(self)

    @property
    def config(self):
        return self.policy.config

    @property
    def base_model(self) -> nn.Module:
        return self._backbone

    @property
    def generation_config(self):
        return self.policy.get_base_model().generation_config

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with active_adapters(self.policy, self.adapter_names):
            return self.policy(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Generate with the month t−1 model (in eval mode: no dropout, no gradient checkpointing)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with active_adapters(self.policy, self.adapter_names):
                return self.policy.generate(*args, **kwargs)
        finally:
            self.policy.train(was_training)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The base weights and the earlier adapters' weights (what defines this model; TRL hashes it to key its cache
        of precomputed reference log-probs)."""
        others = set(self.policy.peft_config) - set(self.adapter_names)
        return {
            name: tensor
            for name, tensor in self.policy.state_dict(*args, **kwargs).items()
            if not any(f".{adapter}." in name or name.endswith(f".{adapter}") for adapter in others)
        }

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names or '[] (bare base)'}"
