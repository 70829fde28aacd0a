"""Anchor prompts and the retention KL of [`ContinualDPOTrainer`].

The KL term keeps the policy's next-token distributions close to the previous month's model on *anchor* sequences,
and the KL is averaged over the continuation's positions (and the last prompt position, where the answer's first
token is chosen): that is where a new month's style bleeds onto unrelated prompts, the forgetting that perplexity
misses. The anchor prompts come in three kinds (`ContinualDPOConfig.kl_anchor_kinds`, see `ANCHOR_KINDS`):

- `"general"`: the fixed general prompts below ([`general_anchor_prompts`]);
- `"earlier_months"`: earlier months' prompts, from the rehearsal buffer;
- `"same_shape"`: prompts shaped like this month's training prompts but about other attributes, made by
  [`shape_variant_prompts`] ("What is the capital of Indonesia?" -> "What is the population of Indonesia?"): the
  month's template is where its style bleeds first, onto questions that look like its own but are not.

By default each anchor is the prompt followed by the previous model's own greedy continuation (generated once, when
training starts, for the anchors the month's steps will draw; see [`AnchorSet`]). With `kl_anchor_refresh_steps > 0`
the continuations are regenerated from the *current policy* every k optimizer steps
([`AnchorSet.refresh_continuations`]): the KL is then scored on the policy's own samples, and the reverse KL per token
on them is the on-policy estimate of KL(policy ‖ previous model).

The anchors never come from evaluation items: the general prompts are disjoint from the evaluation prompts of
`peft_selective.evaluation.preference` and `peft_selective.demo.months` (generic, harmful and benign probes, capital questions), and the same-shape
variants are made from the month's *training* prompts only (the trainer holds no evaluation items). A same-shape
variant can still coincide with a prompt of your own evaluation set; pass those to `shape_variant_prompts(...,
exclude=...)`, or give the trainer your own same-shape anchors (`anchor_prompts={"same_shape": [...]}`).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..utils.chat import encode_prompt


logger = logging.getLogger(__name__)

KLDirection = Literal["forward", "reverse"]

#: The kinds of anchor prompts the trainer can build (`ContinualDPOConfig.kl_anchor_kinds`).
ANCHOR_KINDS = ("general", "same_shape", "earlier_months")

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


#: Attribute nouns a same-shape variant asks about instead of the month's template word(s), in this order of use.
SHAPE_ATTRIBUTES = (
    "population",
    "language",
    "climate",
    "history",
    "flag",
    "area",
    "largest city",
    "national dish",
    "famous landmark",
    "currency",
    "national anthem",
    "main export",
    "highest mountain",
    "national sport",
    "time zone",
    "founding date",
)

# Function words and instruction verbs: never template words (the template is what a question asks *about*).
_STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just let like many may me might more most much must my
    myself no nor not now of off on once only or other our ours ourselves out over own please same she should so some
    such than that the their theirs them themselves then there these they this those through to too under until up
    us very was we were what when where which while who whom whose why will with would you your yours yourself
    yourselves
    answer briefly describe explain find give know list name say show tell write
    """.split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class ShapeVariant:
    """A same-shape variant of a month's prompt (see [`shape_variants`])."""

    #: The variant, in the form of its source (a string, or the conversation with its last user message varied).
    prompt: Prompt
    #: Index of the month prompt it was made from.
    source: int
    #: The template word(s) it replaced, as written in the source prompt (e.g. `"capital"`).
    template: str
    #: The attribute it asks about instead (e.g. `"population"`).
    attribute: str


def _user_text(prompt: Prompt) -> Optional[str]:
    """The text that is varied: the prompt itself, or the last user message of a conversation (text parts joined)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(list(prompt)):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return None
    return None


def _replace_user_text(prompt: Prompt, old: str, new: str) -> Prompt:
    """`prompt` with `old` replaced by `new` once in its varied text (the last user message of a conversation)."""
    if isinstance(prompt, str):
        return prompt.replace(old, new, 1)
    messages = [dict(message) for message in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = content.replace(old, new, 1)
            else:  # text parts: vary the first one that holds the template
                parts = [dict(part) for part in content]
                for part in parts:
                    if old in part.get("text", ""):
                        part["text"] = part["text"].replace(old, new, 1)
                        break
                message["content"] = parts
            break
    return messages


def _template_span(text: str, template_words: frozenset) -> Optional[str]:
    """The first run of consecutive template words in `text` (with the spaces between them), as written."""
    matches = list(_WORD.finditer(text))
    for i, match in enumerate(matches):
        if match.group().lower() in template_words:
            end = i
            while (
                end + 1 < len(matches)
                and matches[end + 1].group().lower() in template_words
                and text[matches[end].end() : matches[end + 1].start()].isspace()
            ):
                end += 1
            return text[match.start() : matches[end].end()]
    return None


def shape_variants(
    prompts: Sequence[Prompt],
    max_prompts: int = 64,
    seed: int = 0,
    attributes: Sequence[str] = SHAPE_ATTRIBUTES,
    exclude: Iterable[Prompt] = (),
) -> list[ShapeVariant]:
    """Same-shape variants of a month's prompts, with the index of the prompt each one comes from.

    See [`shape_variant_prompts`] (which returns only the prompts) for the method. The variants are interleaved so
    that the first ones cover every source prompt once (each with its own shuffled order of attributes) before any
    prompt is used twice; `[]` (with a logged reason) when the prompts have no template word.
    """
    if max_prompts <= 0:
        return []
    texts = [_user_text(prompt) for prompt in prompts]
    usable = [i for i, text in enumerate(texts) if text and text.strip()]
    distinct = {texts[i].strip().lower() for i in usable}
    if len(distinct) < 2:
        logger.info(
            "No same-shape anchor prompts: %d distinct user prompt(s) of %d, at least 2 are needed to tell the "
            "template from the entity.",
            len(distinct),
            len(prompts),
        )
        return []
    words = {i: {w.lower() for w in _WORD.findall(texts[i])} for i in usable}
    frequency = Counter(w for i in usable for w in words[i] if w not in _STOPWORDS and len(w) > 1)
    # In at least half of the prompts, and in two of them at least (with two prompts, one is not a template)
    template = frozenset(w for w, count in frequency.items() if 2 * count >= len(usable) and count >= 2)
    if not template:
        common = ", ".join(f"{w!r} in {c}" for w, c in frequency.most_common(3)) or "no content word at all"
        logger.info(
            "No same-shape anchor prompts: no content word occurs in at least half of the month's %d prompts (most "
            "common: %s); the prompts are too varied to have a template.",
            len(usable),
            common,
        )
        return []
    # A prompt made only of template words has no entity left to ask about.
    spans = {}
    for i in usable:
        span = _template_span(texts[i], template)
        if span is not None and words[i] - template - _STOPWORDS:
            spans[i] = span
    if not spans:
        logger.info(
            "No same-shape anchor prompts: the month's prompts hold the template words %s but nothing else to ask "
            "about.",
            sorted(template),
        )
        return []
    choices = [a for a in attributes if not set(a.lower().split()) & template]
    taken = {text.strip().lower() for text in distinct}
    taken |= {t.strip().lower() for t in (_user_text(p) for p in exclude) if t}
    rng = random.Random(seed)
    sources = sorted(spans)
    rng.shuffle(sources)
    orders = {i: rng.sample(choices, len(choices)) for i in sources}
    variants: list[ShapeVariant] = []
    for round_ in range(len(choices)):
        for i in sources:
            span, attribute = spans[i], orders[i][round_]
            new = attribute[:1].upper() + attribute[1:] if span[:1].isupper() else attribute
            text = texts[i].replace(span, new, 1)
            if text.strip().lower() in taken:
                continue
            taken.add(text.strip().lower())
            variants.append(ShapeVariant(_replace_user_text(prompts[i], span, new), i, span, attribute))
            if len(variants) == max_prompts:
                return variants
    return variants


def shape_variant_prompts(
    prompts: Sequence[Prompt],
    max_prompts: int = 64,
    seed: int = 0,
    attributes: Sequence[str] = SHAPE_ATTRIBUTES,
    exclude: Iterable[Prompt] = (),
) -> list[Prompt]:
    """Prompts shaped like a month's prompts but about other attributes: the "same_shape" anchors.

    The month's *template words* are its content words (not function words or instruction verbs such as "what", "the",
    "tell") that occur in at least half of its user prompts (and in two at least), e.g. "capital" in "What is the
    capital of Indonesia?", "Name the capital of Peru.". In each prompt, the first run of template words is replaced by
    an attribute noun from `attributes` (population, language, climate, history, flag, area, largest city, national
    dish, famous landmark, ...; those sharing a word with the template are left out), and the rest of the prompt (the
    entity) is kept: "What is the population of Indonesia?", "Name the flag of Peru.". The grammar is not adjusted.

    Args:
        prompts: the month's prompts: strings, or conversations (lists of messages), whose *last user message* is
            varied (system and earlier turns are kept as they are).
        max_prompts (`int`): at most this many variants; the first ones cover every source prompt once before any
            prompt is used twice.
        seed (`int`): the variants depend only on `prompts`, `seed` and `attributes` (no global random state), so
            the same month gives the same anchors on every process and on a resumed run.
        attributes: the attribute nouns to ask about instead.
        exclude: prompts never to produce (e.g. your evaluation prompts); the month's own prompts are never produced.

    Returns:
        The variants (in the form of their source prompts); `[]` when the prompts have no template word (fewer than
        two distinct prompts, or too varied: no content word in half of them), with the reason logged at INFO.

    It is dependency-free (a regular expression and a fixed stop-word list) and English-only.
    """
    variants = shape_variants(prompts, max_prompts=max_prompts, seed=seed, attributes=attributes, exclude=exclude)
    return [variant.prompt for variant in variants]


@dataclass
class AnchorBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: 1 where the next-token distribution is compared: the last prompt position and the continuation's positions.
    score_mask: torch.Tensor


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "Anchor continuations",
    known: Optional[Mapping[tuple[int, ...], Sequence[int]]] = None,
) -> list[list[int]]:
    """`model`'s greedy continuation (token ids, up to and including EOS, at most `max_new_tokens`) of every token
    sequence, generated in left-padded batches without gradients and with the model in eval mode (its mode is
    restored afterwards). The batches group sequences of similar length (sorted by length; the results keep the
    order of `sequences`), so little of each batch is padding. `model` may be a [`PreviousMonthReference`], which owns
    no parameters.

    `known` (`{tuple(token ids): continuation}`): greedy continuations `model` already gave some of the sequences (e.g.
    with more new tokens); a sequence found there is not generated again, its continuation is the known one's first
    `max_new_tokens` tokens (greedy decoding: the same tokens), when the known one reaches that length or its EOS."""
    if max_new_tokens <= 0:
        return [[] for _ in sequences]
    pad_id = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    device = next(model.parameters(), None)
    device = device.device if device is not None else next(model.policy.parameters()).device
    results: list[list[int]] = [[] for _ in sequences]
    todo = []
    for index, ids in enumerate(sequences):
        continuation = list((known or {}).get(tuple(ids), ()))
        if len(continuation) >= max_new_tokens or (continuation and continuation[-1] == eos):
            results[index] = continuation[:max_new_tokens]
        else:
            todo.append(index)
    if not todo:
        return results
    was_training = model.training
    model.eval()
    by_length = sorted(todo, key=lambda index: len(sequences[index]))
    try:
        for start in tqdm(range(0, len(by_length), batch_size), desc=desc, disable=not show_progress):
            indices = by_length[start : start + batch_size]
            chunk = [list(sequences[index]) for index in indices]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )[:, width:]
            for index, row in zip(indices, generated.tolist()):
                continuation = []
                for token in row:
                    continuation.append(token)
                    if token == eos:
                        break
                if continuation and continuation[-1] == pad_id and pad_id != eos:
                    continuation = [t for t in continuation if t != pad_id]
                results[index] = continuation
    finally:
        model.train(was_training)
    return results


@dataclass
class _Continuer:
    """The model that continues an [`AnchorSet`]'s anchors, and how (see [`greedy_continuations`])."""

    model: nn.Module
    max_new_tokens: int
    batch_size: int
    show_progress: bool
    known: dict


class AnchorSet:
    """Tokenized anchor sequences (prompt + a model's continuation), sampled in batches.

    The continuations are generated when first needed ([`continue_with`] names the model, [`ensure_continued`]
    generates): a month of `max_steps` steps draws far fewer anchors than it has (the recommended recipe's KL on 9 of
    18 steps with a batch of 2 draws 17 distinct anchors of its 160 in `benchmarks/month_cost.py`), and the trainer
    generates the continuations of the anchors its steps will draw, once, when training starts. Reading [`sequences`] or
    [`calibration_batches`] continues every anchor; [`sample`] those it draws.

    Args:
        prompts: plain strings (wrapped as a user turn when the tokenizer has a chat template) or conversations.
        tokenizer: the trainer's tokenizer.
        max_length (`int`): longer anchors are cut from the left (the prompt's start) to this many tokens.
        kinds (*optional*): the kind of each prompt (`"general"`, `"same_shape"`, `"earlier_months"`, or any label),
            counted by [`kind_counts`]; default `"custom"`.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        kinds: Optional[Sequence[str]] = None,
    ) -> None:
        if not prompts:
            raise ValueError("The retention KL needs at least one anchor prompt.")
        if kinds is not None and len(kinds) != len(prompts):
            raise ValueError(f"{len(kinds)} anchor kinds for {len(prompts)} anchor prompts.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompts = list(prompts)
        self.kinds = list(kinds) if kinds is not None else ["custom"] * len(self.prompts)
        #: The prompts' token ids; kept when the continuations are dropped ([`drop_continuations`]).
        self.prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in self.prompts]
        self._sequences = [list(ids) for ids in self.prompt_ids]
        # index of the first position whose next-token distribution is scored (the last prompt token)
        self.score_from = [len(ids) - 1 for ids in self._sequences]
        # The model that continues the anchors not continued yet (None: the prompts alone are the anchors)
        self._continuer: Optional[_Continuer] = None
        self._continued = [False] * len(self.prompts)

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def sequences(self) -> list[list[int]]:
        """Every anchor's token ids, prompt + continuation (continuing those not continued yet)."""
        self.ensure_continued()
        return self._sequences

    @property
    def continued_count(self) -> int:
        """How many anchors carry their continuation so far (all of them when there is nothing to generate)."""
        return len(self) if self._continuer is None else sum(self._continued)

    def kind_counts(self) -> dict[str, int]:
        """Anchors per kind, e.g. `{"general": 32, "same_shape": 64}`."""
        return dict(Counter(self.kinds))

    def continue_with(
        self,
        model: nn.Module,
        max_new_tokens: int,
        batch_size: int = 8,
        show_progress: bool = True,
        known: Optional[Mapping[tuple[int, ...], Sequence[int]]] = None,
    ) -> None:
        """From now on the anchors are continued by `model`'s greedy continuation (up to `max_new_tokens`; `0` keeps
        the prompts alone), generated when first needed ([`ensure_continued`]). Continuations of another model are
        dropped. `known`: continuations `model` already gave (see [`greedy_continuations`])."""
        self.drop_continuations()
        if max_new_tokens > 0:
            self._continuer = _Continuer(model, max_new_tokens, batch_size, show_progress, dict(known or {}))

    def ensure_continued(self, indices: Optional[Iterable[int]] = None) -> int:
        """Generate the continuations of the anchors `indices` (default: all) that have none yet, in batches of the
        continuer's batch size; returns how many were generated."""
        if self._continuer is None:
            return 0
        wanted = range(len(self)) if indices is None else sorted(set(indices))
        todo = [index for index in wanted if not self._continued[index]]
        if not todo:
            return 0
        continuer = self._continuer
        continuations = greedy_continuations(
            continuer.model,
            self.tokenizer,
            [self.prompt_ids[index] for index in todo],
            continuer.max_new_tokens,
            continuer.batch_size,
            continuer.show_progress,
            known=continuer.known,
        )
        for index, continuation in zip(todo, continuations):
            self._sequences[index] = list(self.prompt_ids[index]) + continuation
            self._continued[index] = True
        return len(todo)

    def add_continuations(
        self,
        reference: nn.Module,
        max_new_tokens: int,
        batch_size: int = 8,
        show_progress: bool = True,
        known: Optional[Mapping[tuple[int, ...], Sequence[int]]] = None,
    ) -> None:
        """Continue every anchor now with `reference`'s greedy continuation (up to `max_new_tokens`; 0 keeps prompts
        only): [`continue_with`] then [`ensure_continued`]. `known`: continuations `reference` already gave (see
        [`greedy_continuations`])."""
        self.continue_with(reference, max_new_tokens, batch_size, show_progress, known)
        self.ensure_continued()

    def drop_continuations(self) -> None:
        """Back to the prompts alone (their token ids are kept), e.g. before new continuations are added."""
        self._sequences = [list(ids) for ids in self.prompt_ids]
        self._continuer = None
        self._continued = [False] * len(self.prompts)

    def refresh_continuations(
        self,
        model: nn.Module,
        max_new_tokens: int,
        batch_size: int = 8,
        show_progress: bool = False,
        indices: Optional[Iterable[int]] = None,
    ) -> None:
        """Replace every anchor's continuation by `model`'s greedy one (the on-policy refresh, with the policy):
        generated now for the anchors `indices` (default: all), for the others when first needed."""
        self.continue_with(model, max_new_tokens, batch_size=batch_size, show_progress=show_progress)
        self.ensure_continued(indices)

    def draw(self, batch_size: int, rng: random.Random) -> list[int]:
        """The indices of `batch_size` anchors drawn with `rng` (with replacement): what [`sample`] batches."""
        return [rng.randrange(len(self)) for _ in range(batch_size)]

    def sample(self, batch_size: int, rng: random.Random, device: torch.device) -> AnchorBatch:
        """A batch of `batch_size` anchors drawn with `rng` ([`draw`]), continued if they were not yet, left-padded so
        the scored positions are the last ones."""
        indices = self.draw(batch_size, rng)
        self.ensure_continued(indices)
        return self._batch(indices, device)

    def calibration_batches(self, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
        """Every anchor once, as protected data for `peft_selective.calibrate`: batches with `input_ids`,
        `attention_mask` and a `protected_mask` on the positions the KL scores (the last prompt token and the
        continuation's), so a GeometryProjected adapter protects the answers the month t−1 model gives off-scope,
        where a month's style bleeds, rather than the prompts' own tokens."""
        self.ensure_continued()
        batches = []
        for start in range(0, len(self), batch_size):
            batch = self._batch(range(start, min(start + batch_size, len(self))), torch.device("cpu"))
            batches.append(
                {
                    "input_ids": batch.input_ids,
                    "attention_mask": batch.attention_mask,
                    "protected_mask": batch.score_mask,
                }
            )
        return batches

    def _batch(self, indices: Sequence[int], device: torch.device) -> AnchorBatch:
        rows, scored = [], []
        for index in indices:
            ids, start = self._sequences[index], self.score_from[index]
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
