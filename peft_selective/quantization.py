"""Keeping bitsandbytes 4-bit layers trainable on CPUs with AVX512-BF16.

bitsandbytes 0.50 (checked on 0.50.2) repacks a `bnb.nn.Linear4bit` weight into a CPU-specific layout the first time
the layer runs on the CPU in eval mode with an input that needs no gradient (`Linear4bit.forward`, when
`support_avx512bf16_for_cpu` is set; `__init__` sets it from `has_avx512bf16()`). The packed weight then goes through
the `bitsandbytes::gemv_4bit` kernel, which has no autograd formula, also in training mode: a backward pass gives the
layer's *input* no gradient, so every adapter below a packed layer (including the ones below a frozen 4-bit
`down_proj` that is not adapted at all) stops learning. An evaluation or a generation before training (a campaign's
month-0 evaluation, the trainer's anchor continuations) is enough to trigger it. The packing also needs
`out_features % 32 == 0` and an even `in_features` and fails otherwise.

[`keep_4bit_layers_trainable`] switches the repacking off on every `Linear4bit` of a model (adapted or not), and
un-packs the weights that were already packed with bitsandbytes' own inverse
(`_convert_weight_packed_for_cpu_inverse`, the one its `_save_to_state_dict` uses). Switching it off is exact;
un-packing is best-effort: the packing stored the absmax scales in bfloat16, and that rounding stays. So the library
calls it as early as it can: when a peft-selective adapter is injected, at `ContinualDPOTrainer` init (which also
covers PEFT LoRA models), and when the campaign loads its base (so that the month-0 evaluation and every later one
run the same kernels on every CPU).

`bnb.nn.Linear8bitLt` has no such CPU path in this version: its eval / train switch only chooses between two autograd
functions (`MatMul8bitLt` and `MatMul8bitFp`), both of which pass the gradient to the input, and its weight layout is
not changed; nothing is done for it.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn


logger = logging.getLogger(__name__)


def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU repacking on every `bnb.nn.Linear4bit` of `model` and un-pack the packed weights.

    Idempotent, and a no-op when bitsandbytes is not in use (it is not imported for a model that has no bitsandbytes
    layer). Returns the number of layers whose weight was un-packed (0 when the call came before any evaluation).
    """
    if "bitsandbytes" not in sys.modules:  # no bitsandbytes layer can exist without the module being imported
        return 0
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - a broken install; nothing of ours to fix
        return 0
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # pragma: no cover - versions before the CPU packing: nothing can be packed
        _convert_weight_packed_for_cpu_inverse = None

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue  # (always so before bitsandbytes had the packing, and with it the inverse)
        data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        if state.absmax.dim() == 2:
            # bitsandbytes 0.50.2 restores the absmax only for nested (double-quantized) states; a plain one stays in
            # the packed layout ([in / blocksize, out] bfloat16) and would dequantize a wrong weight.
            state.absmax = state.absmax.t().reshape(-1).to(torch.float32)
        module.weight.data = data
        module.weight.quant_state = state
        module.quant_state = state
        unpacked += 1
    if unpacked:
        logger.warning(
            "Un-packed %d bitsandbytes 4-bit layer(s) that an earlier CPU evaluation had repacked (their absmax keeps "
            "the bfloat16 rounding of the packing); call `keep_4bit_layers_trainable` before evaluating to avoid it.",
            unpacked,
        )
    return unpacked


__all__ = ["keep_4bit_layers_trainable"]
