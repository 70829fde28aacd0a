"""Batched generation of answers to prompts, as users would see them: the completions only, decoded."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from tqdm.auto import tqdm

from ..utils.chat import format_prompt


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["format_prompt", "generate_answers"]


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _forward_parameters(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _continues_from_cache(model: Any) -> bool:
    """Whether the model's forward continues a KV cache at explicit positions (not prompt-learning PEFT adapters,
    whose virtual tokens are a cache of their own)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return False
    return {"past_key_values", "position_ids", "use_cache"} <= _forward_parameters(model)


def forward_after_cached_prefixes(
    model: Any, cache: Any, prefix_mask: torch.Tensor, source: torch.Tensor, completions: list, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read `completions` after prefixes already in the KV `cache`: completion k continues row `source[k]` of the
    cache and of its (left-padded) `prefix_mask`. Each completion's tokens but its last are the inputs (its last is
    only predicted), right-padded with `pad_id`; the cache is narrowed to `source` in place. Returns `(logits, targets,
    mask)`: `targets[k, p]` is the token predicted at position p (token p + 1 of completion k), `mask` marks the real
    positions. Shared by the multiple-choice and the preference scoring (a prefix is read once for all its
    completions)."""
    device = _model_device(model)
    length = max(len(ids) for ids in completions) - 1
    cache.batch_select_indices(source.to(device))
    inputs = torch.full((len(completions), length), pad_id, dtype=torch.long)
    targets = torch.full((len(completions), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), length), dtype=torch.long)
    for row, ids in enumerate(completions):  # right padding, after the prefix
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:], dtype=torch.long)
        mask[row, : len(ids) - 1] = 1
    logits = model(
        input_ids=inputs.to(device),
        attention_mask=torch.cat([prefix_mask[source], mask], dim=1).to(device),
        position_ids=(prefix_mask.sum(-1)[source].unsqueeze(-1) + torch.arange(length)).to(device),
        past_key_values=cache,
        use_cache=True,
    ).logits
    return logits, targets, mask


def eos_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a generation: the model's generation config's and the tokenizer's EOS."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Union[str, list]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    use_chat_template: Optional[bool] = None,
    disable_tqdm: bool = False,
    desc: str = "Generating",
    **generate_kwargs: Any,
) -> list[str]:
    """Answer every prompt; greedy by default, in left-padded batches.

    Prompts are sorted by length before batching (less padding) and the answers are returned in the prompts' order.
    Each answer is the generated text up to the first EOS token, decoded without special tokens and stripped. Works
    with plain transformers models and `PeftModel`s; runs under `torch.no_grad()` in eval mode and restores the
    train/eval state of every module afterwards; a tokenizer without a pad token borrows its EOS token meanwhile.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompts (`Sequence[str | list[dict]]`): strings (one user message each when the chat template is used) or
            conversations (TRL's conversational `prompt` values).
        max_new_tokens (`int`, defaults to 64): generation length.
        batch_size (`int`, defaults to 16): prompts generated together.
        do_sample (`bool`, defaults to `False`): sample instead of greedy decoding (seed torch yourself for
            reproducible samples; pass `temperature` / `top_p` in `generate_kwargs`).
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.
        disable_tqdm (`bool`, defaults to `False`): hide the progress bar.
        desc (`str`, defaults to `"Generating"`): the progress bar's label.
        generate_kwargs: passed to `model.generate`.

    Returns:
        `list[str]`: one completion per prompt.
    """
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of prompts, not a single string.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    prompts = list(prompts)
    if not prompts:
        return []

    encoded = []
    for prompt in prompts:
        text, templated = format_prompt(tokenizer, prompt, use_chat_template)
        encoded.append(list(tokenizer(text, add_special_tokens=not templated)["input_ids"]))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))

    eos = eos_token_ids(model, tokenizer)
    device = _model_device(model)
    modes = {module: module.training for module in model.modules()}
    set_pad_token = tokenizer.pad_token is None
    if set_pad_token:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    answers: list[Optional[str]] = [None] * len(prompts)
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(prompts), desc=desc, disable=disable_tqdm) as progress:
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                length = max(len(encoded[i]) for i in indices)
                input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
                for row, i in enumerate(indices):
                    # Left padding: with right padding, shorter prompts would be continued after their pad tokens.
                    input_ids[row, length - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                    attention_mask[row, length - len(encoded[i]) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=pad_id,
                    **generate_kwargs,
                )
                for row, i in enumerate(indices):
                    ids = output[row, length:].tolist()
                    cut = next((position for position, token in enumerate(ids) if token in eos), len(ids))
                    answers[i] = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
                progress.update(len(indices))
    finally:
        for module, training in modes.items():
            module.training = training
        if set_pad_token:
            tokenizer.pad_token = None
    return answers
