"""lm-evaluation-harness on the current model: our knowledge suite as a local lm-eval task, offline, on a tiny Llama.

Skipped without the `lm-eval` extra (`pip install "peft-selective[lm-eval]"`; installed in dev / CI).
"""

import os


# Offline before datasets / huggingface_hub read their settings: the local task needs no Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from testing_utils import tiny_chat_llama  # noqa: E402


lm_eval = pytest.importorskip("lm_eval")

from peft_selective.evaluation import (  # noqa: E402
    KnowledgeItem,
    multiple_choice_accuracy,
    option_scores,
    run_lm_eval,
    write_knowledge_task,
)
from peft_selective.evaluation.harness import write_preference_task  # noqa: E402


TASK = "peft_selective_knowledge"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from peft_selective.demo.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    # the tiny chat Llama, wider and with tied embeddings, over the bundled model's tokenizer
    model = tiny_chat_llama(
        0,
        hidden_size=64,
        intermediate_size=192,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    ).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def items():
    pytest.importorskip("countryinfo")
    from peft_selective.demo.months import knowledge_items

    return knowledge_items(20, seed=0)


@pytest.fixture(scope="module")
def lm_eval_run(tiny, items, tmp_path_factory):
    model, tokenizer = tiny
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    write_knowledge_task(items, directory)
    return run_lm_eval(model, tokenizer, [TASK], include_path=directory, batch_size=16, log_samples=True)


def test_write_knowledge_task_files(items, tmp_path):
    path = write_knowledge_task(items, tmp_path / "tasks", task_name="kn")
    assert path == tmp_path / "tasks" / "kn.yaml"
    config = path.read_text()
    for line in ('task: "kn"', "dataset_path: json", "output_type: multiple_choice", "- metric: acc_norm"):
        assert line in config
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "kn.jsonl").read_text().splitlines()]
    assert len(rows) == len(items)
    for row, item in zip(rows, items):
        assert row["question"] == item.question and row["entity"] == item.entity
        assert sorted(row["choices"]) == sorted(item.options)
        assert row["choices"][row["label"]] == item.answer
    # Shuffled: the answer is not always first (a tie would then favour it).
    assert {row["label"] for row in rows} != {0}
    unshuffled = write_knowledge_task(items, tmp_path / "plain", shuffle_seed=None)
    first = json.loads(unshuffled.with_suffix(".jsonl").read_text().splitlines()[0])
    assert first["label"] == 0 and first["choices"] == list(items[0].options)
    with pytest.raises(ValueError, match="distractors"):
        write_knowledge_task([KnowledgeItem("Q?", "A")], tmp_path)
    with pytest.raises(ValueError, match="task_name"):
        write_knowledge_task(items, tmp_path, task_name="a b")


def test_knowledge_task_runs_with_intervals(lm_eval_run, items):
    result = lm_eval_run[TASK]
    assert set(result) == {"acc", "acc_norm", "n", "samples"}
    assert result["n"] == len(items)
    for metric in ("acc", "acc_norm"):
        entry = result[metric]
        assert 0.0 <= entry["mean"] <= 1.0
        assert entry["stderr"] is not None and entry["stderr"] >= 0
        lo, hi = entry["ci95"]
        assert 0.0 <= lo <= entry["mean"] <= hi <= 1.0
        # mean ± 1.96 stderr, clipped to [0, 1]
        assert lo == pytest.approx(max(0.0, entry["mean"] - 1.96 * entry["stderr"]), abs=1e-3)
        assert hi == pytest.approx(min(1.0, entry["mean"] + 1.96 * entry["stderr"]), abs=1e-3)
    assert len(result["samples"]) == len(items)


def _lm_eval_option_logliks(sample) -> list[float]:
    # filtered_resps: per option [log-likelihood, is_greedy] (some lm-eval versions store them as strings)
    return [float(resp[0]) for resp in sample["filtered_resps"]]


def test_agrees_with_multiple_choice_accuracy(lm_eval_run, tiny, items):
    """Same prompt ("Question: ...\\nAnswer:"), same options after a space: lm-eval's per-option log-likelihoods are
    our per-token means times the option's token count, and from them our per-item verdicts follow exactly."""
    model, tokenizer = tiny
    ours = option_scores(model, tokenizer, items, use_chat_template=False)
    correct, estimate = multiple_choice_accuracy(model, tokenizer, items, use_chat_template=False)
    by_question = {item.question: (i, item) for i, item in enumerate(items)}
    samples = lm_eval_run[TASK]["samples"]
    assert {s["doc"]["question"] for s in samples} == set(by_question)
    from_lm_eval = [None] * len(items)
    lm_eval_acc = []
    for sample in samples:
        i, item = by_question[sample["doc"]["question"]]
        choices, label = sample["doc"]["choices"], sample["doc"]["label"]
        logliks = _lm_eval_option_logliks(sample)
        assert len(logliks) == len(choices) == len(item.options)
        means = []
        for choice, loglik in zip(choices, logliks):
            j = item.options.index(choice)
            n_tokens = len(tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
            # the same number: lm-eval's total = our mean per token x tokens
            assert loglik == pytest.approx(ours[i][j] * n_tokens, rel=1e-4, abs=1e-4)
            means.append(loglik / n_tokens)
        # our rule (mean per token, a tie is wrong) applied to lm-eval's numbers
        from_lm_eval[i] = int(all(means[label] > m for k, m in enumerate(means) if k != label))
        # lm-eval's own acc is the argmax of the totals
        assert sample["acc"] == float(max(range(len(logliks)), key=lambda k: (logliks[k], -k)) == label)
        lm_eval_acc.append(sample["acc"])
    assert from_lm_eval == correct
    assert lm_eval_run[TASK]["acc"]["mean"] == pytest.approx(sum(lm_eval_acc) / len(lm_eval_acc))
    assert estimate.mean == pytest.approx(sum(correct) / len(correct))


def test_equal_length_options_agree_item_by_item(tiny, tmp_path):
    """Options with the same number of tokens (digits): lm-eval's `acc` (total log-likelihood) and our per-token mean pick the
    same option, so the per-item verdicts are equal."""
    model, tokenizer = tiny
    items = [
        KnowledgeItem(f"What is {a} plus {b}?", str((a + b) % 10), tuple(str((a + b + k) % 10) for k in (1, 2, 3)))
        for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (0, 3), (4, 4), (1, 7), (5, 3), (2, 2), (3, 3), (6, 2), (0, 1)]
    ]
    for item in items:
        assert len({len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for o in item.options}) == 1
    write_knowledge_task(items, tmp_path, task_name="digits")
    result = run_lm_eval(model, tokenizer, ["digits"], include_path=tmp_path, log_samples=True)["digits"]
    correct, estimate = multiple_choice_accuracy(model, tokenizer, items, use_chat_template=False)
    by_question = {item.question: i for i, item in enumerate(items)}
    per_item = [None] * len(items)
    for sample in result["samples"]:
        per_item[by_question[sample["doc"]["question"]]] = int(sample["acc"])
    assert per_item == correct
    assert result["acc"]["mean"] == pytest.approx(estimate.mean)


def test_stacked_adapters_run(tiny, items, tmp_path):
    """A PeftModel with two selective adapters active together runs as it is, and its train / eval modes and the
    global random state are restored."""
    from peft import PeftModel, get_peft_model

    from peft_selective import SelectiveMLPConfig

    base, tokenizer = tiny
    import copy

    model = get_peft_model(copy.deepcopy(base), SelectiveMLPConfig(rank=4, init_weights=False), adapter_name="a")
    model.add_adapter("b", SelectiveMLPConfig(rank=4, init_weights=False))
    model.base_model.set_adapter(["a", "b"])
    assert isinstance(model, PeftModel)
    assert sorted(model.base_model.active_adapters) == ["a", "b"]
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)

    write_knowledge_task(items[:8], tmp_path)
    result = run_lm_eval(model, tokenizer, TASK, include_path=tmp_path, batch_size=16, log_samples=True)
    assert torch.rand(1) == expected  # lm-eval reseeds torch; we restore it
    assert model.training and all(m.training for m in model.modules())
    assert result[TASK]["n"] == 8
    assert 0.0 <= result[TASK]["acc"]["mean"] <= 1.0
    assert sorted(model.base_model.active_adapters) == ["a", "b"]
    # What was scored is the model with both adapters: lm-eval's log-likelihoods are ours on the PeftModel, not the
    # base model's.
    stacked = option_scores(model, tokenizer, items[:8], use_chat_template=False)
    plain = option_scores(base, tokenizer, items[:8], use_chat_template=False)
    by_question = {item.question: i for i, item in enumerate(items[:8])}
    differs = False
    for sample in result[TASK]["samples"]:
        i = by_question[sample["doc"]["question"]]
        item = items[i]
        for choice, loglik in zip(sample["doc"]["choices"], _lm_eval_option_logliks(sample)):
            j = item.options.index(choice)
            n_tokens = len(tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
            assert loglik == pytest.approx(stacked[i][j] * n_tokens, rel=1e-4, abs=1e-4)
            differs |= abs(loglik - plain[i][j] * n_tokens) > 1e-3
    assert differs


def test_preference_task_runs(tiny, tmp_path):
    model, tokenizer = tiny
    rows = [
        {"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]
    ]
    rows.append(
        {
            "prompt": [{"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    )
    path = write_preference_task(rows, tmp_path)
    documents = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    assert documents[-1]["question"] == "Say hi."
    assert all(d["choices"][d["label"]] == str(r["chosen"]) for d, r in zip(documents[:-1], rows))
    result = run_lm_eval(model, tokenizer, ["peft_selective_preference"], include_path=tmp_path)
    assert result["peft_selective_preference"]["n"] == len(rows)
    assert 0.0 <= result["peft_selective_preference"]["acc"]["mean"] <= 1.0


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r'pip install "peft-selective\[lm-eval\]"'):
        run_lm_eval(None, None, ["x"])


def test_evaluation_import_does_not_import_lm_eval():
    import subprocess
    import sys

    code = "import sys, peft_selective.evaluation; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_metric_conversion():
    from peft_selective.evaluation.harness import _convert

    raw = {
        "results": {
            "t": {
                "alias": "t",
                "name": "t",
                "sample_len": 50,
                "acc,none": 0.98,
                "acc_stderr,none": 0.05,
                "perplexity,none": 12.0,
                "perplexity_stderr,none": "N/A",
                "exact_match,strict": 0.5,
                "exact_match_stderr,strict": 0.1,
            },
        },
        "n-samples": {"t": {"original": 100, "effective": 50}},
    }
    raw["results"]["group"] = {"alias": "group", "acc,none": 0.5, "acc_stderr,none": 0.01, "sample_len": 30}
    assert _convert(raw, log_samples=False)["group"] == {
        "acc": {"mean": 0.5, "ci95": pytest.approx([0.5 - 0.0196, 0.5 + 0.0196], abs=1e-4), "stderr": 0.01},
        "n": 30,
    }
    t = _convert(raw, log_samples=False)["t"]
    assert t["n"] == 50
    assert set(t) == {"n", "acc", "perplexity", "exact_match,strict"}
    assert t["acc"]["ci95"][1] == 1.0 and t["acc"]["ci95"][0] == pytest.approx(0.98 - 1.96 * 0.05, abs=1e-3)
    assert t["perplexity"] == {"mean": 12.0, "ci95": None, "stderr": None}
    assert t["exact_match,strict"]["ci95"] == pytest.approx([0.5 - 0.196, 0.5 + 0.196], abs=1e-3)
    assert not math.isnan(t["acc"]["mean"])
