"""The test suite's fixtures, built from `testing_utils` (where the tiny models, tokenizers and helpers live: import
them from there, never from here), and its order (`pytest_collection_modifyitems`: modules with slow tests first).

Fixtures:
    make_tiny_model(family) -> a fresh eval-mode copy of the family's tiny base model (built once per session, so a
                               test may wrap / mutate its model freely and models of the same family are bit-identical)
    tiny_inputs(family)     -> a fixed batch of model inputs (text, plus an image for the VLM families)
    model_output            -> `model_output(model, inputs)`: the logits (or last hidden state for bare encoders)
    tiny_families           -> the names of all families, in a stable order
    tiny_chat_base          -> a folder with the tiny chat Llama and its word tokenizer (the campaigns' base model)
    one_month_campaign      -> a tiny-model campaign (`CAMPAIGN_INIT`) with month "m1" done from the requesting
                               module's `month_files` fixture (copy it with `copy_of` before changing it)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from testing_utils import (
    CAMPAIGN_INIT,
    FAMILIES,
    build_tiny_model,
    cli,
    make_inputs,
    tiny_chat_llama,
    word_chat_tokenizer,
)
from testing_utils import model_output as _model_output


# The models are tiny: intra-op threads only add OpenMP spin/hand-off overhead, which on a loaded 2-core CI box made
# a 32x32 matmul take ~25 ms instead of ~0.1 ms (50x slower test suite). One thread unless the user asked otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

_PRISTINE: dict[str, torch.nn.Module] = {}


def _mark_names(marks) -> set[str]:
    return {mark.name for mark in (marks if isinstance(marks, list) else [marks])}


def pytest_collection_modifyitems(config, items):
    """Modules marked slow as a whole first, then modules with some slow (real-model) test, each module kept whole
    (its module fixtures are built once): with `make test`'s two workers the longest tests start at once and the short
    ones fill the other worker, instead of a 14-minute test starting last. Deterministic, as pytest-xdist requires."""
    some_slow = {item.module for item in items if item.get_closest_marker("slow")}
    all_slow = {module for module in some_slow if "slow" in _mark_names(getattr(module, "pytestmark", []))}
    items.sort(key=lambda item: 0 if item.module in all_slow else 1 if item.module in some_slow else 2)


def _make_tiny_model(family: str) -> torch.nn.Module:
    if family not in _PRISTINE:
        _PRISTINE[family] = build_tiny_model(family)
    return copy.deepcopy(_PRISTINE[family])


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory) -> str:
    """A folder with a tiny random chat Llama and its word tokenizer: the campaign tests' `--base_model`."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_chat_llama(seed=0).save_pretrained(path)
    word_chat_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_month_campaign(tmp_path_factory, tiny_chat_base, month_files):
    """A campaign with month m1 done (copied by the tests that change it); `month_files` is the module's fixture."""
    directory = tmp_path_factory.mktemp("campaign") / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", month_files["m1"]) == 0
    return directory


@pytest.fixture(scope="session")
def tiny_families() -> list[str]:
    return list(FAMILIES)


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[[str], torch.nn.Module]:
    return _make_tiny_model


@pytest.fixture(scope="session")
def tiny_inputs() -> Callable[[str], dict[str, torch.Tensor]]:
    return make_inputs


@pytest.fixture(scope="session")
def model_output() -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    return _model_output
