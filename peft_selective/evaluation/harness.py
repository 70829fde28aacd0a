"""General-ability tasks from the ecosystem: EleutherAI lm-evaluation-harness on the model as it is, adapters stacked.

```python
from peft_selective.evaluation import run_lm_eval, write_knowledge_task

# With Hub access: any lm-eval task or group, on the current model (a PeftModel with its active adapters, as is).
scores = run_lm_eval(model, tokenizer, ["arc_easy", "mmlu"], limit=200)
scores["arc_easy"]["acc"]  # {"mean": 0.61, "ci95": [0.54, 0.68], "stderr": 0.034}

# Offline: our own knowledge suite as a local lm-eval task (a YAML file and a JSONL dataset, no Hub).
write_knowledge_task(peft_selective.demo.months.knowledge_items(200), "lm_eval_tasks/")
scores = run_lm_eval(model, tokenizer, ["peft_selective_knowledge"], include_path="lm_eval_tasks/")
```

Needs the optional extra: `pip install "peft-selective[lm-eval]"` (the `lm-eval` package, imported only when
[`run_lm_eval`] runs; `import peft_selective.evaluation` does not import it).

Intervals. lm-eval reports a standard error per metric (for a mean such as `acc`, the sample standard deviation over
the square root of the number of documents; for some metrics a bootstrap). Here `ci95` is the normal interval
`mean ± 1.96 · stderr`, clipped to [0, 1] for rates (metrics named `acc*`, `exact_match`, `em`, `f1`, `mc1`, `mc2`,
`brier_score`); it is not the percentile bootstrap of [`bootstrap_rate`] that the rest of this subpackage reports, and
near 0 or 1 (or on few documents) it is too narrow: pass `log_samples=True` and bootstrap the per-document scores
when that matters.

The knowledge task and [`multiple_choice_accuracy`]: both score each option by its log-likelihood after the same
prompt (`"Question: ...\\nAnswer:"`, the option after a space; compare with `use_chat_template=False` on a chat
tokenizer), but they normalise differently:

- lm-eval `acc`: the option with the highest *total* log-likelihood (favours short options);
- lm-eval `acc_norm`: total log-likelihood divided by the option's length in characters;
- ours: the *mean log-likelihood per token*, and a tie with a distractor counts as wrong (lm-eval's `argmax` takes
  the first of tied options; [`write_knowledge_task`] shuffles the options so a tie does not favour the answer).

They agree item by item when an item's options have the same number of tokens (`acc`); the per-option
log-likelihoods themselves are the same numbers (see `tests/evaluation/test_lm_eval_harness.py`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .knowledge import KnowledgeItem


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["run_lm_eval", "write_knowledge_task", "write_preference_task"]

_INSTALL_HINT = (
    'run_lm_eval needs EleutherAI lm-evaluation-harness, an optional extra: pip install "peft-selective[lm-eval]" '
    '(or pip install "lm-eval>=0.4").'
)
# Metrics that are rates in [0, 1]: their normal intervals are clipped to it.
_RATE_METRICS = ("acc", "exact_match", "em", "f1", "mc1", "mc2", "brier_score")
_Z95 = 1.959963984540054


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:  # the extra is missing (or broken): say which one
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    return lm_eval, HFLM, TaskManager


def _is_rate(metric: str) -> bool:
    return metric.startswith("acc") or metric in _RATE_METRICS


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric_entry(metric: str, value: Any, stderr: Any) -> Any:
    """`{"mean", "ci95", "stderr"}` for a number (ci95 `None` without a standard error), anything else as is."""
    mean = _number(value)
    if mean is None:
        return value
    error = _number(stderr)
    entry = {"mean": mean, "ci95": None, "stderr": error}
    if error is not None:
        lo, hi = mean - _Z95 * error, mean + _Z95 * error
        if _is_rate(metric):
            lo, hi = max(0.0, lo), min(1.0, hi)
        entry["ci95"] = [lo, hi]
    return entry


def _convert(results: Mapping[str, Any], log_samples: bool) -> dict:
    """lm-eval's `simple_evaluate` output -> `{task: {metric: {"mean", "ci95", "stderr"}, "n": ..., ...}}`."""
    converted = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            # Metrics are "metric,filter"; other keys ("alias", "name", "sample_len", "samples") describe the task.
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else key
            entry[name] = _metric_entry(metric, value, metrics.get(f"{metric}_stderr,{filter_name}"))
        counts = n_samples.get(task)
        if isinstance(counts, Mapping) and "effective" in counts:
            entry["n"] = int(counts["effective"])
        else:  # groups: their number of documents
            for key in ("sample_len", "samples"):
                if isinstance(metrics.get(key), int) and not isinstance(metrics.get(key), bool):
                    entry["n"] = metrics[key]
                    break
        if log_samples and task in results.get("samples", {}):
            entry["samples"] = results["samples"][task]
        converted[task] = entry
    return converted


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Union[str, Sequence[str]],
    *,
    include_path: Optional[Union[str, Path, Sequence[Union[str, Path]]]] = None,
    batch_size: int = 8,
    limit: Optional[Union[int, float]] = None,
    num_fewshot: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    log_samples: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict:
    """Run EleutherAI lm-evaluation-harness tasks on `model` as it is, e.g. a `PeftModel` with several adapters active.

    The model instance is wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)` and
    passed to `lm_eval.simple_evaluate`: whatever adapters are active (stacked, scaled, merged) are what is evaluated;
    nothing is loaded again from disk or the Hub (the task datasets are, unless local). The modules' train / eval
    modes and the global random states (Python, NumPy, torch; lm-eval seeds them) are restored afterwards. lm-eval may
    set `tokenizer.pad_token` when the tokenizer has none.

    Args:
        model: a causal LM (`transformers` model or `PeftModel`).
        tokenizer: its tokenizer.
        tasks (`str` or `Sequence[str]`): lm-eval task or group names, e.g. `["arc_easy", "mmlu"]` (need the Hub or a
            filled `HF_DATASETS_CACHE`), or local tasks written by [`write_knowledge_task`] (with `include_path`).
        include_path (`str`, `Path` or a sequence of them, *optional*): folders with extra task YAML files
            (lm-eval's `TaskManager(include_path=...)`); they take precedence over the built-in tasks.
        batch_size (`int`, defaults to 8): requests per forward pass.
        limit (`int` or `float`, *optional*): documents per task (a float below 1: a fraction). lm-eval marks such
            results as not for reporting; fine for a quick look.
        num_fewshot (`int`, *optional*): few-shot examples per prompt; default: each task's own.
        device (`str` or `torch.device`, *optional*): when given, the model is moved there first (in place, as
            `model.to(device)` does); by default it is evaluated where it is.
        log_samples (`bool`, defaults to `False`): also return lm-eval's per-document records (`"samples"` of each
            task: the document, the requests' arguments, the responses, e.g. each option's `[log-likelihood,
            is_greedy]`, and the per-document metrics).
        simple_evaluate_kwargs: passed on to `lm_eval.simple_evaluate` (e.g. `apply_chat_template=True`,
            `bootstrap_iters`, `gen_kwargs`, `random_seed`).

    Returns:
        `dict`: `{task: {metric: {"mean": float, "ci95": [lo, hi] or None, "stderr": float or None}, "n": int}}` for
        every task and group lm-eval reports (a group such as `mmlu` and its subtasks). Metrics computed after a
        filter other than `none` keep lm-eval's `"metric,filter"` name; non-numeric values are kept as they are.
        `ci95` is `mean ± 1.96 · stderr` (clipped to [0, 1] for rates such as `acc`), `None` where lm-eval gives no
        standard error.

    Raises:
        `ImportError`: when `lm-eval` is not installed, naming the extra to install.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("No tasks given; e.g. tasks=['arc_easy'] or a task written by write_knowledge_task.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if device is not None:
        model.to(device)

    if include_path is not None and not isinstance(include_path, (str, Path)):
        include_path = [str(path) for path in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    task_manager = simple_evaluate_kwargs.pop("task_manager", None) or _task_manager(TaskManager, tasks, include_path)

    modes = {module: module.training for module in model.modules()}
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    python_state = random.getstate()
    numpy_state = _numpy_random_state()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=log_samples,
                task_manager=task_manager,
                **simple_evaluate_kwargs,
            )
    finally:
        for module, training in modes.items():
            module.training = training
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)
    if results is None:  # only non-zero ranks of a distributed run get None
        return {}
    return _convert(results, log_samples)


def _task_manager(TaskManager, tasks: list[str], include_path: Any):
    """lm-eval's task index: of `include_path` alone when it holds every task (indexing lm-eval's few thousand
    built-in YAML files takes seconds), else of the built-in tasks and `include_path`."""
    if include_path is not None:
        try:
            local = TaskManager(include_path=include_path, include_defaults=False)
        except TypeError:  # lm-eval versions without include_defaults
            local = None
        if local is not None and all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def _numpy_random_state():
    try:
        import numpy
    except ImportError:  # pragma: no cover - lm-eval depends on numpy
        return None
    return numpy.random.get_state()


# ---------------------------------------------------------------------------------------------------------------------
# Local task definitions
# ---------------------------------------------------------------------------------------------------------------------


def _check_task_name(task_name: str) -> None:
    if not task_name or not all(c.isalnum() or c in "_-." for c in task_name):
        raise ValueError(f"task_name must be letters, digits, '_', '-' or '.', got {task_name!r}.")


def _write_task(
    directory: Union[str, Path], task_name: str, rows: list[dict], doc_to_text: str, extra_metrics: Sequence[str] = ()
) -> Path:
    """Write `<task_name>.jsonl` and `<task_name>.yaml` (a `multiple_choice` task on `question` / `choices` / `label`)
    into `directory`; return the YAML's path."""
    _check_task_name(task_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_path = (directory / f"{task_name}.jsonl").resolve()
    with open(data_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics = ["acc", "acc_norm", *extra_metrics]
    metric_list = "".join(
        f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true\n" for metric in metrics
    )
    # JSON strings are valid YAML scalars: paths and templates need no further escaping.
    config = (
        f"# Written by peft_selective.evaluation.harness; run with run_lm_eval(..., include_path=<this folder>).\n"
        f"task: {json.dumps(task_name)}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(str(data_path))}\n"
        f"test_split: test\n"
        f"output_type: multiple_choice\n"
        f"doc_to_text: {json.dumps(doc_to_text)}\n"
        f'doc_to_choice: "{{{{choices}}}}"\n'
        f'doc_to_target: "{{{{label}}}}"\n'
        f'target_delimiter: " "\n'
        f"metric_list:\n{metric_list}"
        f"metadata:\n"
        f"  version: 1.0\n"
    )
    config_path = directory / f"{task_name}.yaml"
    config_path.write_text(config, encoding="utf-8")
    return config_path


def write_knowledge_task(
    items: Sequence[KnowledgeItem],
    directory: Union[str, Path],
    task_name: str = "peft_selective_knowledge",
    *,
    shuffle_seed: Optional[int] = 0,
) -> Path:
    """Write our knowledge suite as a local lm-eval `multiple_choice` task, runnable offline through [`run_lm_eval`].

    Writes `<directory>/<task_name>.jsonl` (one document per item: `question`, `choices`, `label` = the answer's
    index, `entity`) and `<directory>/<task_name>.yaml` (`dataset_path: json` with `dataset_kwargs.data_files`
    pointing at the JSONL by absolute path, `doc_to_text: "Question: {{question}}\\nAnswer:"`, the options after a
    space, metrics `acc` and `acc_norm`). Pass `include_path=directory` and `tasks=[task_name]` to [`run_lm_eval`]
    (or `lm_eval --include_path directory --tasks task_name` on the command line).

    Args:
        items (`Sequence[KnowledgeItem]`): questions with distractors, e.g. `peft_selective.demo.months.knowledge_items()`.
        directory (`str` or `Path`): where to write (created if missing; the two files are overwritten).
        task_name (`str`, defaults to `"peft_selective_knowledge"`): the task's name (also the files' stem); two
            suites in one folder need different names.
        shuffle_seed (`int`, *optional*, defaults to 0): the options of each item are shuffled with this seed, so
            that lm-eval's `argmax` (the first of tied options) does not favour the answer; `None` keeps
            [`KnowledgeItem.options`]' order (answer first).

    Returns:
        `Path`: the YAML file.
    """
    items = list(items)
    if not items:
        raise ValueError("No knowledge items; build some with `peft_selective.demo.months.knowledge_items()`.")
    no_options = [item.question for item in items if not item.distractors]
    if no_options:
        raise ValueError(f"Multiple choice needs distractors; these items have none: {no_options[:5]}.")
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    rows = []
    for item in items:
        order = list(range(len(item.options)))
        if rng is not None:
            rng.shuffle(order)
        rows.append(
            {
                "question": item.question,
                "choices": [item.options[i] for i in order],
                "label": order.index(0),
                "entity": item.entity,
            }
        )
    return _write_task(directory, task_name, rows, "Question: {{question}}\nAnswer:")


def write_preference_task(
    rows: Sequence[Mapping[str, Any]],
    directory: Union[str, Path],
    task_name: str = "peft_selective_preference",
    *,
    shuffle_seed: Optional[int] = 0,
) -> Path:
    """Write preference rows (`prompt`, `chosen`, `rejected`) as a local lm-eval 2-way `multiple_choice` task.

    Each row becomes a document whose options are its chosen and its rejected answer after the prompt (fed as is, no
    chat template; the answer follows after a space), the chosen one being correct: `acc` is how often the model
    finds the chosen answer more likely in total, `acc_norm` per character. Conversational rows (TRL message lists)
    are reduced to their text: the user turns of the prompt, the assistant turn of each answer.

    Args:
        rows (`Sequence[Mapping]`): preference rows, e.g. a month's test split.
        directory (`str` or `Path`): where to write the JSONL and the YAML.
        task_name (`str`, defaults to `"peft_selective_preference"`): the task's name.
        shuffle_seed (`int`, *optional*, defaults to 0): seed of the options' order (`None`: chosen first).

    Returns:
        `Path`: the YAML file.
    """
    from .text import response_text

    def text(value: Any, roles: tuple[str, ...]) -> str:
        if isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value):
            return "\n".join(response_text(m) for m in value if m.get("role", "user") in roles)
        return response_text(value)

    rows = list(rows)
    if not rows:
        raise ValueError("No preference rows.")
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    documents = []
    for index, row in enumerate(rows):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
        if missing:
            raise ValueError(f"Row {index} lacks {missing}; preference rows need prompt, chosen and rejected.")
        chosen, rejected = text(row["chosen"], ("assistant",)), text(row["rejected"], ("assistant",))
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"Row {index} has an empty chosen or rejected answer.")
        choices, label = [chosen, rejected], 0
        if rng is not None and rng.random() < 0.5:
            choices, label = [rejected, chosen], 1
        documents.append({"question": text(row["prompt"], ("system", "user")), "choices": choices, "label": label})
    return _write_task(directory, task_name, documents, "{{question}}")
