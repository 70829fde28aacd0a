"""Anchor prompts and the retention KL of [`ContinualDPOTrainer`].

The KL term keeps the policy's next-token distributions close to the previous month's model on *anchor* sequences:
a general prompt set (below) plus earlier months' prompts. Each anchor is the prompt followed by the previous model's
own greedy continuation (generated once, when training starts), and the KL is averaged over the continuation's
positions (and the last prompt position, where the answer's first token is chosen): that is where a new month's style
bleeds onto unrelated prompts, the forgetting that perplexity misses (DESIGN.md).

The general prompts are disjoint from the evaluation prompts of `trl_ext.metrics` and `trl_ext.data` (generic,
harmful and benign probes, capital questions), so training on them does not leak into the measurements.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase


KLDirection = Literal["forward", "reverse"]

_GENERAL_ANCHOR_PROMPTS = (
    "Explain why the sky is blue.",
    "Give me three tips for a job interview.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about the sea.",
    "What is the difference between weather and climate?",
    "Describe a typical morning routine.",
    "How do I make a cup of tea?",
    "Why do we need sleep?",
    "Summarize the story of Cinderella in two sentences.",
    "What makes a good friend?",
    "How do vaccines work?",
    "Write a thank-you note to a teacher.",
    "What is photosynthesis?",
    "How can I save money on groceries?",
    "Explain what a computer virus is.",
    "What is the boiling point of water at sea level?",
    "Tell me a fun fact about elephants.",
    "How do airplanes stay in the air?",
    "What are some ways to reduce stress?",
    "Write a short invitation to a birthday party.",
    "What is the role of the heart in the human body?",
    "How do I learn to play the guitar?",
    "Why is exercise important?",
    "Explain the water cycle.",
    "What is a good name for a pet goldfish?",
    "How do bees make honey?",
    "Describe the taste of a lemon.",
    "What is the purpose of a library?",
    "How do I write a good email subject line?",
    "What causes the seasons on Earth?",
    "Give me an idea for a science fair project.",
    "How does recycling help the environment?",
)


def general_anchor_prompts() -> list[str]:
    """Fixed general-purpose prompts (32) for the retention KL; disjoint from the evaluation prompts."""
    return list(_GENERAL_ANCHOR_PROMPTS)


Prompt = Union[str, list[dict]]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        if getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        else:
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass
class AnchorBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: 1 where the next-token distribution is compared: the last prompt position and the continuation's positions.
    score_mask: torch.Tensor


class AnchorSet:
    """Tokenized anchor sequences (prompt + the reference model's continuation), sampled in batches.

    Args:
        prompts: plain strings (wrapped as a user turn when the tokenizer has a chat template) or conversations.
        tokenizer: the trainer's tokenizer.
        max_length (`int`): longer anchors are cut from the left (the prompt's start) to this many tokens.
    """

    def __init__(self, prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> None:
        if not prompts:
            raise ValueError("The retention KL needs at least one anchor prompt.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompts = list(prompts)
        self.sequences = [_prompt_ids(tokenizer, prompt) for prompt in self.prompts]
        # index of the first position whose next-token distribution is scored (the last prompt token)
        self.score_from = [len(ids) - 1 for ids in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    @torch.no_grad()
    def add_continuations(
        self, reference: nn.Module, max_new_tokens: int, batch_size: int = 8, show_progress: bool = True
    ) -> None:
        """Append `reference`'s greedy continuation (up to `max_new_tokens`) to every anchor; 0 keeps prompts only."""
        if max_new_tokens <= 0:
            return
        pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        device = next(reference.parameters(), None)
        device = device.device if device is not None else next(reference.policy.parameters()).device
        order = range(0, len(self.sequences), batch_size)
        for start in tqdm(order, desc="Anchor continuations", disable=not show_progress):
            chunk = self.sequences[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            generated = reference.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )[:, width:]
            eos = self.tokenizer.eos_token_id
            for offset, row in enumerate(generated.tolist()):
                continuation = []
                for token in row:
                    continuation.append(token)
                    if token == eos:
                        break
                if continuation and continuation[-1] == pad_id and pad_id != eos:
                    continuation = [t for t in continuation if t != pad_id]
                self.sequences[start + offset] = self.sequences[start + offset] + continuation

    def sample(self, batch_size: int, rng: random.Random, device: torch.device) -> AnchorBatch:
        """A batch of `batch_size` anchors drawn with `rng`, left-padded so the scored positions are the last ones."""
        rows, scored = [], []
        for index in (rng.randrange(len(self.sequences)) for _ in range(batch_size)):
            ids, start = self.sequences[index], self.score_from[index]
            cut = max(0, len(ids) - self.max_length)
            ids, start = ids[cut:], max(0, start - cut)
            rows.append(ids)
            # positions start..n-2 predict the continuation; a prompt alone scores its last position (the answer's
            # first token)
            scored.append((start, len(ids) - 1) if len(ids) - 1 > start else (len(ids) - 1, len(ids)))
        width = max(len(ids) for ids in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        score_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, (first, stop)) in enumerate(zip(rows, scored)):
            offset = width - len(ids)
            input_ids[i, offset:] = torch.tensor(ids)
            attention_mask[i, offset:] = 1
            score_mask[i, offset + first : offset + stop] = 1
        return AnchorBatch(input_ids.to(device), attention_mask.to(device), score_mask.to(device))


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, direction: KLDirection) -> torch.Tensor:
    """Per-position KL between two next-token distributions (fp32). `forward`: KL(reference ‖ policy), which keeps
    the policy covering everything the old model said (the LwF / distillation choice); `reverse`: KL(policy ‖
    reference), which only stops the policy from putting mass where the old model put little."""
    policy_logps = F.log_softmax(policy_logits.float(), dim=-1)
    reference_logps = F.log_softmax(reference_logits.float(), dim=-1)
    if direction == "forward":
        return (reference_logps.exp() * (reference_logps - policy_logps)).sum(-1)
    if direction == "reverse":
        return (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)
    raise ValueError(f"Unknown KL direction {direction!r}; use 'forward' or 'reverse'.")


def _scored_logits(model: nn.Module, batch: AnchorBatch, keep: int) -> torch.Tensor:
    # Left padding: positions count from each row's first real token (absolute-position models need it; RoPE does not
    # mind). Only the last `keep` positions can be scored, so only their logits are built (`logits_to_keep`).
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=keep,
    ).logits[:, -keep:]


def anchor_kl(
    policy: nn.Module, reference: nn.Module, batch: AnchorBatch, direction: KLDirection = "forward"
) -> torch.Tensor:
    """Mean KL over the scored anchor positions; differentiable w.r.t. the policy, the reference under `no_grad`."""
    keep = int((batch.score_mask.cumsum(-1) > 0).sum(-1).max())  # from the earliest scored position to the end
    mask = batch.score_mask[:, -keep:].bool()
    with torch.no_grad():
        reference_logits = _scored_logits(reference, batch, keep)[mask]
    policy_logits = _scored_logits(policy, batch, keep)[mask]
    return token_kl(policy_logits, reference_logits, direction).mean()
