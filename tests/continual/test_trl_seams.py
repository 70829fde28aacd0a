"""Every private TRL / transformers seam of `ContinualDPOTrainer` (`TRL_SEAMS`) still exists with the shape we use.

A TRL or transformers release that renames or reshapes one of them would make the trainer fail silently (long prompts
dropped, rehearsal flags removed, the rehearsal NLL off, the wrong adapter resumed): these checks fail instead, naming
the seam and the installed versions.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
import trl
from peft import LoraConfig, get_peft_model
from testing_utils import tiny_chat_llama
from transformers import Trainer
from trl import DPOTrainer
from trl.trainer import utils as trl_utils

from peft_selective.continual.reference import PreviousMonthReference
from peft_selective.continual.trainer import TRL_SEAMS, ContinualDPOTrainer


SEAMS = {seam.name: seam for seam in TRL_SEAMS}


def _fail(name: str, detail: str) -> None:
    seam = SEAMS[name]
    pytest.fail(
        f"TRL seam {name!r} ({seam.owner}) moved under trl {trl.__version__} / transformers "
        f"{transformers.__version__}: {detail}. ContinualDPOTrainer relies on: {seam.relies_on}."
    )


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _source(function) -> str:
    return inspect.getsource(function)


def _require(name: str, condition: bool, detail: str) -> None:
    if not condition:
        _fail(name, detail)


def check_prepare_dataset() -> None:
    method = getattr(DPOTrainer, "_prepare_dataset", None)
    _require("prepare_dataset", method is not None, "DPOTrainer._prepare_dataset is gone")
    _require(
        "prepare_dataset",
        _params(method) == ["self", "dataset", "processing_class", "args", "dataset_name"],
        f"its signature is {_params(method)}",
    )
    _require(
        "prepare_dataset",
        "ContinualDPOTrainer" in ContinualDPOTrainer._prepare_dataset.__qualname__,
        "the override is not ours",
    )


def check_signature_columns() -> None:
    method = getattr(Trainer, "_set_signature_columns_if_needed", None)
    _require("signature_columns", method is not None, "Trainer._set_signature_columns_if_needed is gone")
    _require("signature_columns", _params(method) == ["self"], f"its signature is {_params(method)}")
    remover = getattr(Trainer, "_remove_unused_columns", None)
    _require("signature_columns", remover is not None, "Trainer._remove_unused_columns is gone")
    source = _source(remover)
    _require(
        "signature_columns",
        "self._set_signature_columns_if_needed()" in source and "self._signature_columns" in source,
        "Trainer._remove_unused_columns no longer reads `_signature_columns` after `_set_signature_columns_if_needed`",
    )


def check_fused_lm_head_forward() -> None:
    source = _source(DPOTrainer._compute_loss)
    _require(
        "fused_lm_head_forward",
        "outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)" in source,
        "DPOTrainer._compute_loss no longer calls the policy with `fused_lm_head=True`",
    )
    _require(
        "fused_lm_head_forward",
        "log_probs" in getattr(trl_utils, "FusedCausalLMOutput", object).__dataclass_fields__
        if hasattr(trl_utils, "FusedCausalLMOutput")
        else False,
        "trl.trainer.utils.FusedCausalLMOutput has no `log_probs`",
    )


def check_fused_lm_head_reference() -> None:
    add = getattr(trl_utils, "add_fused_lm_head", None)
    _require("fused_lm_head_reference", add is not None, "trl.trainer.utils.add_fused_lm_head is gone")
    # Functional: TRL's patch of the month t-1 view gives the log-probs of its ordinary forward.
    policy = get_peft_model(tiny_chat_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="m1")
    reference = PreviousMonthReference(policy, [])
    try:
        add(reference)
    except Exception as error:  # noqa: BLE001 - any failure is the seam's
        _fail("fused_lm_head_reference", f"add_fused_lm_head(PreviousMonthReference) raised {error!r}")
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    labels = input_ids.clone()
    with torch.no_grad():
        fused = reference(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
        logits = reference(input_ids=input_ids).logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    _require(
        "fused_lm_head_reference",
        fused.shape == expected.shape and torch.allclose(fused.float(), expected, atol=1e-4),
        "the patched reference's `fused_lm_head=True` log-probs differ from its forward's",
    )


def check_precompute_ref_logps() -> None:
    _require(
        "precompute_ref_logps",
        "self.precompute_ref_logps =" in _source(DPOTrainer.__init__),
        "DPOTrainer no longer sets `precompute_ref_logps`",
    )
    source = _source(DPOTrainer._compute_loss)
    _require(
        "precompute_ref_logps",
        "if self.precompute_ref_logps:" in source and 'inputs["ref_chosen_logps"]' in source,
        "DPOTrainer._compute_loss no longer reads the batch's reference columns under `precompute_ref_logps`",
    )


def check_compute_ref_log_probs() -> None:
    method = getattr(DPOTrainer, "compute_ref_log_probs", None)
    _require("compute_ref_log_probs", method is not None, "DPOTrainer.compute_ref_log_probs is gone")
    _require("compute_ref_log_probs", _params(method) == ["self", "model", "inputs"], f"signature {_params(method)}")


def check_load_from_checkpoint() -> None:
    method = getattr(Trainer, "_load_from_checkpoint", None)
    _require("load_from_checkpoint", method is not None, "Trainer._load_from_checkpoint is gone")
    params = inspect.signature(method).parameters
    _require(
        "load_from_checkpoint",
        list(params) == ["self", "resume_from_checkpoint", "model"] and params["model"].default is None,
        f"its signature is {list(params)}",
    )
    _require(
        "load_from_checkpoint",
        any(
            "self._load_from_checkpoint(" in _source(getattr(Trainer, method))
            for method in ("train", "_inner_training_loop")
            if hasattr(Trainer, method)
        ),
        "Trainer.train no longer resumes through `_load_from_checkpoint`",
    )


def check_init_training_state() -> None:
    method = getattr(Trainer, "_init_training_state", None)
    _require("init_training_state", method is not None, "Trainer._init_training_state is gone")
    expected = ["self", "max_steps", "num_update_steps_per_epoch", "num_train_epochs", "resume_from_checkpoint"]
    expected.append("trial")
    _require("init_training_state", _params(method) == expected, f"its signature is {_params(method)}")
    loop = _source(Trainer._inner_training_loop)
    _require(
        "init_training_state",
        "= self._init_training_state(" in loop and "for epoch in range(epochs_trained, num_train_epochs)" in loop,
        "the training loop no longer runs `range(epochs_trained, num_train_epochs)` after `_init_training_state`",
    )


def check_checkpoint_state_last() -> None:
    source = _source(Trainer._save_checkpoint)
    state = source.find("TRAINER_STATE_NAME")
    _require("checkpoint_state_last", state >= 0, "_save_checkpoint no longer writes TRAINER_STATE_NAME")
    _require(
        "checkpoint_state_last",
        all(0 <= source.find(call) < state for call in ("self.save_model(", "self._save_optimizer_and_scheduler(")),
        "_save_checkpoint writes the trainer state before the weights or the optimizer",
    )
    from transformers.trainer import TRAINER_STATE_NAME

    from peft_selective.continual.trainer import TRAINER_STATE

    _require("checkpoint_state_last", TRAINER_STATE_NAME == TRAINER_STATE, f"the file is now {TRAINER_STATE_NAME}")


def check_loss_types() -> None:
    _require(
        "loss_types", "self.loss_types =" in _source(DPOTrainer.__init__), "DPOTrainer no longer sets `loss_types`"
    )


def check_loss_in_parts() -> None:
    source = _source(DPOTrainer._compute_loss)
    for needle in (
        "loss += per_sequence_loss.mean() * loss_weight",
        "batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()",
        'self._metrics[mode]["entropy"].append(',
    ):
        _require("loss_in_parts", needle in source, f"`_compute_loss` no longer has `{needle}`")
    init = _source(DPOTrainer.__init__)
    for attribute in ("self.loss_weights =", "self.use_weighting =", "self.aux_loss_enabled ="):
        _require("loss_in_parts", attribute in init, f"DPOTrainer no longer sets `{attribute[5:-2]}`")


def check_model_card_tags() -> None:
    _require(
        "model_card_tags",
        isinstance(getattr(DPOTrainer, "_tag_names", None), list)
        and isinstance(getattr(DPOTrainer, "_name", None), str),
        "DPOTrainer has no `_tag_names` list / `_name` string",
    )


def check_trainer_utils() -> None:
    create = getattr(trl_utils, "create_model_from_path", None)
    get_id = getattr(trl_utils, "get_config_model_id", None)
    _require("trainer_utils", create is not None and get_id is not None, "a function of trl.trainer.utils is gone")
    _require("trainer_utils", _params(create)[0] == "model_id", f"create_model_from_path{inspect.signature(create)}")
    _require("trainer_utils", _params(get_id) == ["config"], f"get_config_model_id{inspect.signature(get_id)}")


CHECKS = {
    "prepare_dataset": check_prepare_dataset,
    "signature_columns": check_signature_columns,
    "fused_lm_head_forward": check_fused_lm_head_forward,
    "fused_lm_head_reference": check_fused_lm_head_reference,
    "precompute_ref_logps": check_precompute_ref_logps,
    "compute_ref_log_probs": check_compute_ref_log_probs,
    "load_from_checkpoint": check_load_from_checkpoint,
    "init_training_state": check_init_training_state,
    "checkpoint_state_last": check_checkpoint_state_last,
    "loss_types": check_loss_types,
    "loss_in_parts": check_loss_in_parts,
    "model_card_tags": check_model_card_tags,
    "trainer_utils": check_trainer_utils,
}


def test_every_seam_has_a_check():
    assert sorted(SEAMS) == sorted(CHECKS), "TRL_SEAMS and the checks of this file must list the same seams"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_seam(name):
    CHECKS[name]()


def test_failure_names_the_seam_and_the_version():
    with pytest.raises(pytest.fail.Exception, match=rf"'loss_types'.*trl {trl.__version__}"):
        _fail("loss_types", "simulated")
