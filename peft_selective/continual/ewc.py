"""Elastic weight consolidation (Kirkpatrick et al., 2017) for stacked monthly adapters.

At the end of each month, [`estimate_fisher`] measures how much every weight of the adapted layers matters to that
month's data: the diagonal of the empirical Fisher information, the mean squared per-example gradient of the chosen
responses' log-likelihood with respect to the layer's *effective* weight (base plus all active adapters). The months'
estimates are summed in a [`FisherState`] and stored (safetensors). In month t, [`ewc_penalty`] charges the new adapter
for moving the weights the earlier months relied on:

    penalty = Σ_layers Σ_ij  F̃_ij · ΔW_ij²,        F̃ = F / mean(F)

where ΔW is the new adapter's update of the layer: with the earlier months' adapters frozen, that is exactly the
effective weight change since the month t−1 optimum, so the penalty is zero there and grows quadratically away from
it. The Fisher is normalised by its mean over all entries so that `ewc_coef` has the same scale whatever the model
and the data (`ewc_coef · penalty` is an importance-weighted squared norm of the update).

On disk (`FisherState.save`), a store is a folder with `fisher.<hash>.safetensors`, the summed tensors in a file
named after its SHA-256, and `fisher.json`, which names that file, records its SHA-256, the months it covers and the
layers' shapes. `fisher.json` is replaced last, atomically: it is the one commit point, so a month is counted in the
store exactly when `fisher.json` lists it, whatever moment a kill or a full disk interrupts a save. Version-1 stores
(a fixed `fisher.safetensors`, its metadata beside it) still load; the next save writes version 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..utils.io import atomic_write, atomic_write_json, fsync_dir, sha256_file
from ..utils.lock import DirectoryLock


logger = logging.getLogger(__name__)

FISHER_METADATA = "fisher.json"
#: The weights file of a version-1 store (version 2 names it after its content: `fisher.<hash>.safetensors`).
FISHER_WEIGHTS = "fisher.safetensors"
_WEIGHTS_RE = re.compile(r"^fisher\.[0-9a-f]{12}\.safetensors$")
#: 1: `fisher.safetensors` + `fisher.json`, written one after the other. 2: content-named weights, `fisher.json` last.
FORMAT_VERSION = 2


def adapted_layers(model: PeftModel, adapter_name: str) -> dict[str, BaseTunerLayer]:
    """The layers of `model` that carry `adapter_name` and can report a 2-D delta weight, keyed by their path inside
    the base model (`model.layers.0.mlp.up_proj`), the key the Fisher is stored under."""
    prefix = "base_model.model."
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        if adapter_name not in _adapter_keys(module):
            continue
        base = module.get_base_layer()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):  # e.g. 3-D MoE expert parameters
            continue
        layers[name[len(prefix) :] if name.startswith(prefix) else name] = module
    return layers


def _adapter_keys(module: BaseTunerLayer) -> set[str]:
    keys: set[str] = set()
    for attr in module.adapter_layer_names:
        keys.update(getattr(module, attr).keys())
    return keys


def _out_in(module: BaseTunerLayer) -> tuple[int, int]:
    base = module.get_base_layer()
    return base.out_features, base.in_features


@dataclass
class FisherState:
    """Summed diagonal Fisher of the adapted layers over the months seen so far.

    Attributes:
        fisher (`dict[str, torch.Tensor]`): per layer (path inside the base model), an `(out, in)` fp32 tensor.
        months (`list[str]`): the months whose data the estimate covers, in order.
        num_examples (`int`): the number of examples summed over.
        base_model (`str`, *optional*): the base model's name or path, checked when the state is applied.
    """

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    months: list[str] = field(default_factory=list)
    num_examples: int = 0
    base_model: Optional[str] = None

    def __len__(self) -> int:
        return len(self.fisher)

    @property
    def mean(self) -> float:
        total = sum(float(t.sum(dtype=torch.float32)) for t in self.fisher.values())  # bf16 sums lose digits
        count = sum(t.numel() for t in self.fisher.values())
        return total / count if count else 0.0

    def normalized(self, dtype: Optional[torch.dtype] = None, in_place: bool = False) -> FisherState:
        """`F / mean(F)` (mean 1 over all entries), optionally cast: the form [`ewc_penalty`] weighs the update with.

        Normalising once, instead of on every step, keeps a single copy of the Fisher in memory: a per-step
        `F / mean` would allocate a second one, and the checkpointed penalty would keep it until the backward pass.
        With `in_place=True` this state's tensors are divided where they are (a cast replaces them layer by layer) and
        this state is returned, so a second full copy never exists; use it when nothing else needs the raw Fisher.
        """
        scale = self.mean
        target = self if in_place else FisherState({}, list(self.months), self.num_examples, self.base_model)
        for name, tensor in self.fisher.items():
            if not in_place:
                tensor = tensor.clone()
            if scale > 0:
                tensor.div_(scale)
            target.fisher[name] = tensor.to(dtype or tensor.dtype)
        return target

    def merged(self, other: FisherState, decay: float = 1.0) -> FisherState:
        """`decay · self + other` (online EWC: `decay < 1` lets old months fade)."""
        if self.base_model and other.base_model and self.base_model != other.base_model:
            raise ValueError(f"Cannot merge Fisher of base {other.base_model!r} into one of {self.base_model!r}.")
        fisher = {name: tensor * decay for name, tensor in self.fisher.items()}
        for name, tensor in other.fisher.items():
            if name in fisher and fisher[name].shape != tensor.shape:
                raise ValueError(
                    f"Fisher of layer {name!r} has shape {tuple(tensor.shape)}, stored {tuple(fisher[name].shape)}."
                )
            fisher[name] = fisher[name] + tensor if name in fisher else tensor.clone()
        return FisherState(
            fisher=fisher,
            months=self.months + [m for m in other.months if m not in self.months],
            num_examples=self.num_examples + other.num_examples,
            base_model=self.base_model or other.base_model,
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Commit this state to `directory` in one step (see the module docstring): the tensors to a new
        `fisher.<hash>.safetensors`, then `fisher.json`, which names it, atomically; the files of earlier commits are
        deleted after it. Holds the store's lock (`peft_selective.utils.lock`): another process changing the store
        meanwhile is refused, not interleaved."""
        directory = Path(directory)
        with DirectoryLock(directory, what="Fisher store"):
            tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.fisher.items()}
            data = save(tensors)
            sha256 = hashlib.sha256(data).hexdigest()
            weights = f"fisher.{sha256[:12]}.safetensors"
            atomic_write(directory / weights, data)  # a new name: the committed weights stay intact until the commit
            fsync_dir(directory)
            metadata = {
                "format_version": FORMAT_VERSION,
                "weights": weights,
                "sha256": sha256,
                "months": self.months,
                "num_examples": self.num_examples,
                "base_model": self.base_model,
                "layers": {name: list(tensor.shape) for name, tensor in tensors.items()},
            }
            atomic_write_json(directory / FISHER_METADATA, metadata)  # the commit point
            fsync_dir(directory)
            for path in directory.iterdir():  # best effort: what an interrupted save left, the replaced weights
                stale_weights = (_WEIGHTS_RE.match(path.name) or path.name == FISHER_WEIGHTS) and path.name != weights
                if stale_weights or (path.name.startswith(".fisher.") and path.name.endswith(".tmp")):
                    with contextlib.suppress(OSError):
                        path.unlink()

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FisherState:
        """The state committed in `directory`; a clear error for a missing, corrupted or changed store."""
        directory = Path(directory)
        meta_path = directory / FISHER_METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"No Fisher state in {directory}: expected {FISHER_METADATA} (written by `FisherState.save` / "
                "`ContinualDPOTrainer.finish_month`)."
            )
        try:
            metadata = json.loads(meta_path.read_text())
            version = metadata["format_version"]
            weights = metadata["weights"] if version >= 2 else FISHER_WEIGHTS
        except Exception as error:  # noqa: BLE001 - any parse failure means a corrupted state
            raise ValueError(
                f"The Fisher state in {directory} is corrupted ({type(error).__name__}: {error})."
            ) from error
        if version > FORMAT_VERSION:
            raise ValueError(
                f"The Fisher state in {directory} has format {version}; this version reads up to {FORMAT_VERSION}."
            )
        if not isinstance(weights, str) or not (weights == FISHER_WEIGHTS or _WEIGHTS_RE.match(weights)):
            raise ValueError(f"The Fisher state in {directory} is corrupted: {meta_path} names no weights file.")
        weights_path = directory / weights
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"The Fisher state in {directory} is incomplete: {meta_path} names {weights}, which is missing. "
                "Restore the folder from a backup."
            )
        if version >= 2 and sha256_file(weights_path) != metadata.get("sha256"):
            raise ValueError(
                f"The Fisher state in {directory} is corrupted: {weights} does not match the SHA-256 recorded in "
                f"{FISHER_METADATA} (it was changed or replaced after its commit). Restore the folder from a backup."
            )
        try:
            fisher = load_file(str(weights_path))
        except Exception as error:  # noqa: BLE001 - any parse failure means a corrupted state
            raise ValueError(
                f"The Fisher state in {directory} is corrupted ({type(error).__name__}: {error})."
            ) from error
        expected = {name: tuple(shape) for name, shape in metadata.get("layers", {}).items()}
        found = {name: tuple(tensor.shape) for name, tensor in fisher.items()}
        if expected != found:
            raise ValueError(
                f"The Fisher state in {directory} is inconsistent: {FISHER_METADATA} lists other layers or shapes "
                f"than {weights}."
            )
        return cls(fisher, list(metadata["months"]), int(metadata["num_examples"]), metadata.get("base_model"))


def estimate_fisher(
    model: PeftModel,
    batches: Sequence[dict[str, torch.Tensor]],
    adapter_name: str,
    month: str,
    show_progress: bool = True,
) -> FisherState:
    """Diagonal empirical Fisher of the layers that carry `adapter_name`, w.r.t. their effective weight.

    Args:
        model (`PeftModel`): the model at the end of the month (all its adapters active as trained).
        batches: padded batches with `input_ids`, `attention_mask` and `completion_mask` (1 on the response tokens
            whose log-likelihood is differentiated), e.g. the chosen halves of TRL's preference collator.
        adapter_name (`str`): the month's adapter; its layers are the ones measured.
        month (`str`): recorded in the returned state.

    Per example i and layer, the gradient of `log p(response_i)` w.r.t. the weight is `Σ_t δ_it x_itᵀ` (output
    gradient times input, summed over the example's tokens), read from hooks in one backward per batch; its square is
    accumulated. Nothing is updated: gradients of the parameters are left untouched.
    """
    layers = adapted_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No adapted layer carries adapter {adapter_name!r}: nothing to estimate a Fisher for.")
    sums = {name: torch.zeros(_out_in(layer), dtype=torch.float32) for name, layer in layers.items()}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def forward_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: _accumulate(name, grad))

        return hook

    def _accumulate(name: str, grad: torch.Tensor) -> None:
        x = inputs[name].float()
        per_example = torch.einsum("bto,bti->boi", grad.float(), x)
        sums[name] += per_example.pow(2).sum(0).cpu()

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(forward_hook(name)))
    was_training = model.training
    model.eval()
    grads_before = {param: param.grad for param in model.parameters()}
    num_examples = 0
    embeddings = model.get_input_embeddings()
    # The output gradients must exist even where no parameter upstream requires grad (e.g. a frozen first layer).
    embed_handle = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    try:
        for batch in tqdm(batches, desc=f"Fisher ({month})", disable=not show_progress):
            device = next(model.parameters()).device
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            completion = batch["completion_mask"].to(device)
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
                logps = torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                # One scalar whose gradient w.r.t. each example's activations is that example's own gradient.
                (logps * completion[:, 1:]).sum().backward()
            num_examples += int(input_ids.shape[0])
            inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
        embed_handle.remove()
        for param, grad in grads_before.items():
            param.grad = grad
        model.train(was_training)
    fisher = {name: total / max(num_examples, 1) for name, total in sums.items()}
    base = getattr(model.get_base_model().config, "_name_or_path", None)
    return FisherState(fisher, [month], num_examples, base)


def _delta_weight(layer: BaseTunerLayer, adapter_name: str) -> torch.Tensor:
    delta = layer.get_delta_weight(adapter_name)
    base = layer.get_base_layer()
    if delta.shape != (base.out_features, base.in_features):  # Conv1D-style layouts store (in, out)
        delta = delta.T
    return delta.float()


def _layer_penalty(layer: BaseTunerLayer, adapter_name: str, fisher: torch.Tensor) -> torch.Tensor:
    return (fisher * _delta_weight(layer, adapter_name).square()).sum(dtype=torch.float32)


def ewc_penalty(
    model: nn.Module, adapter_name: str, state: FisherState, fisher_mean: Optional[float] = None
) -> torch.Tensor:
    """`Σ F̃ · ΔW²` over the layers that carry `adapter_name` and have a stored Fisher (see the module docstring).

    Each layer's term is checkpointed, so a low-rank update's full `(out, in)` matrix is rebuilt in the backward pass
    instead of being kept alive between forward and backward. Pass `fisher_mean` (`state.mean`) to skip recomputing
    it on every call; for repeated calls (training), pass `state.normalized()` and `fisher_mean=1.0`: the Fisher is
    then used as it is, with no per-call copy.
    """
    unwrapped = model.module if hasattr(model, "module") else model
    layers = adapted_layers(unwrapped, adapter_name)
    scale = fisher_mean if fisher_mean is not None else state.mean
    total = None
    for name, layer in layers.items():
        fisher = state.fisher.get(name)
        if fisher is None:
            continue
        weight = fisher / scale if scale not in (0.0, 1.0) else fisher
        device = next(p.device for p in layer.parameters())
        if weight.device != device:
            weight = weight.to(device)
            state.fisher[name] = fisher.to(device)  # keep it there for the next step
        term = checkpoint(_layer_penalty, layer, adapter_name, weight, use_reentrant=False)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(unwrapped.parameters()).device)
    return total


def check_fisher_matches(model: nn.Module, adapter_name: str, state: FisherState) -> dict[str, Any]:
    """Which adapted layers have a stored Fisher; raise when none does or when shapes disagree (another base model)."""
    unwrapped = model.module if hasattr(model, "module") else model
    layers = adapted_layers(unwrapped, adapter_name)
    covered, mismatched = [], []
    for name, layer in layers.items():
        if name in state.fisher:
            (covered if tuple(state.fisher[name].shape) == _out_in(layer) else mismatched).append(name)
    if mismatched:
        raise ValueError(
            f"The stored Fisher does not fit this model: layer {mismatched[0]!r} has shape "
            f"{tuple(state.fisher[mismatched[0]].shape)}, the model's is {_out_in(layers[mismatched[0]])}. Was it "
            f"estimated on another base model (stored: {state.base_model!r})?"
        )
    if not covered:
        raise ValueError(
            f"None of the {len(layers)} layers adapted by {adapter_name!r} has a stored Fisher (it covers "
            f"{sorted(state.fisher)[:3]}...). EWC needs the new adapter to target layers the earlier months adapted."
        )
    return {"covered": len(covered), "uncovered": len(layers) - len(covered)}
