"""Behavioural evaluation: learning and forgetting judged by what the model generates, with 95% intervals.

The DPO implicit reward against the base (the sign of the margin) saturates at tiny learning rates: it calls a month
"learned" when greedy answers show nothing of it. This subpackage judges by behaviour instead:

| module | job |
|---|---|
| `intervals` | [`Estimate`], percentile-bootstrap intervals of a rate and of a paired difference, [`is_gain`] |
| `similarity` | [`agreement`]: is a generation closer to the chosen or to the rejected answer (length-robust F1) |
| `checks` | [`Check`]: a month's declared regex / JSON-schema / function test of a generation |
| `style` | [`StyleSignature`]: a month's style learned from its chosen vs rejected answers |
| `generation` | [`generate_answers`]: batched greedy answers, completions only |
| `behaviour` | [`learning_by_behaviour`], [`bleed`]: the month-level rates |
| `knowledge` | [`KnowledgeItem`], [`multiple_choice_accuracy`], [`exact_match`], [`check_no_overlap`] |
| `harness` | [`run_lm_eval`]: EleutherAI lm-eval tasks on the model as it is; [`write_knowledge_task`]: ours as a local one |

It depends on torch, transformers (duck-typed models and tokenizers) and tqdm only (`harness` imports the optional
`lm-eval` extra inside [`run_lm_eval`], never at import), and `import peft_selective` does not import it.
"""

from .behaviour import bleed, learning_by_behaviour, style_scores
from .checks import Check, validate_json_schema
from .generation import generate_answers
from .harness import run_lm_eval, write_knowledge_task
from .intervals import Estimate, bootstrap_mean, bootstrap_rate, is_gain, is_loss, paired_difference, paired_ratio
from .knowledge import (
    KnowledgeItem,
    check_no_overlap,
    exact_match,
    extract_answer,
    multiple_choice_accuracy,
    option_scores,
)
from .similarity import agreement, similarity
from .style import StyleSignature


__all__ = [
    "Check",
    "Estimate",
    "KnowledgeItem",
    "StyleSignature",
    "agreement",
    "bleed",
    "bootstrap_mean",
    "bootstrap_rate",
    "check_no_overlap",
    "exact_match",
    "extract_answer",
    "generate_answers",
    "is_gain",
    "is_loss",
    "learning_by_behaviour",
    "multiple_choice_accuracy",
    "option_scores",
    "paired_difference",
    "paired_ratio",
    "run_lm_eval",
    "similarity",
    "style_scores",
    "validate_json_schema",
    "write_knowledge_task",
]
