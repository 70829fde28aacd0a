"""benchmarks/forgetting.py (protocol 2): matched learning, shares and the bar on synthetic per-item values, the month
spec's errors, and one real run of the whole harness on a tiny model with the bundled tokenizer."""

import importlib
import json
import sys

import pytest
from testing_utils import REPO_ROOT


@pytest.fixture(scope="module")
def forgetting():
    sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
    return importlib.import_module("benchmarks.forgetting")


def values(learning, retention=0.0, bleed=0.0, mc=0.5, exact=0.5, kl=0.0, n=40):
    """Per-item values of one arm: `learning` etc. are the item means (items half 0 / half 1 where possible)."""

    def items(mean):
        ones = round(mean * n)
        return [1.0] * ones + [0.0] * (n - ones)

    return {
        "learning_behaviour": items(learning),
        "retention_behaviour": [retention] * n,
        "bleed_rate": items(bleed),
        "knowledge_mc": items(mc),
        "knowledge_exact": items(exact),
        "kl_to_base": [kl] * n,
    }


def test_matched_learning_interpolates_item_by_item_between_the_alphas_around_it(forgetting):
    curve = {0.5: values(0.2, bleed=0.1), 1.0: values(0.6, bleed=0.5)}
    alpha, mixed, reached = forgetting.interpolate(curve, 0.4)
    assert reached and alpha == pytest.approx(0.75)
    assert sum(mixed["learning_behaviour"]) / 40 == pytest.approx(0.4)
    assert sum(mixed["bleed_rate"]) / 40 == pytest.approx(0.3)
    # a level the curve never reaches: its most learning, flagged
    alpha, _, reached = forgetting.interpolate(curve, 0.9)
    assert not reached and alpha == 1.0
    # a level below the smallest alpha's learning: the smallest alpha
    alpha, _, reached = forgetting.interpolate(curve, 0.1)
    assert reached and alpha == 0.5


def test_shares_are_ours_over_lora_of_what_each_gained_or_lost_against_the_base(forgetting):
    base = values(0.1, bleed=0.1, mc=0.8)
    lora = values(0.6, retention=-0.5, bleed=0.6, mc=0.4)
    ours = values(0.6, retention=-0.05, bleed=0.15, mc=0.75)
    shares = forgetting.shares(ours, lora, base)
    assert shares["learning_share"]["mean"] == pytest.approx(1.0)
    assert shares["bleed_share"]["mean"] == pytest.approx(0.1)
    assert shares["knowledge_loss_share"]["mean"] == pytest.approx(0.125)
    assert shares["retention_loss_share"]["mean"] == pytest.approx(0.1)
    lo, hi = shares["bleed_share"]["ci95"]
    assert lo <= 0.1 <= hi
    assert forgetting.meets_bar(shares)
    # ours learning less than 95% of LoRA's gain fails the bar whatever it keeps
    assert not forgetting.meets_bar(forgetting.shares(values(0.5, bleed=0.1, mc=0.8), lora, base))


def test_where_lora_loses_nothing_ours_must_lose_nothing_either(forgetting):
    base = values(0.1, bleed=0.3, mc=0.5)
    lora = values(0.6, bleed=0.2, mc=0.6)  # LoRA bled less than the base and gained knowledge
    shares = forgetting.shares(values(0.6, bleed=0.2, mc=0.6), lora, base)
    assert shares["bleed_share"] is None and shares["knowledge_loss_share"] is None  # no share of nothing
    assert forgetting.meets_bar(shares)  # ... and ours lost nothing either
    worse = forgetting.shares(values(0.6, bleed=0.35, mc=0.6), lora, base)  # ours bleeds above the base
    assert not worse["losses"]["bleed_share"]["met"] and not forgetting.meets_bar(worse)
    assert worse["losses"]["knowledge_loss_share"]["met"]


def test_greedy_knowledge_and_earlier_months_are_part_of_the_bar(forgetting):
    base = values(0.1, exact=0.5)
    lora = values(0.6, retention=-0.5, exact=0.2)
    assert forgetting.meets_bar(forgetting.shares(values(0.6, retention=-0.05, exact=0.45), lora, base))
    exact_lost = forgetting.shares(values(0.6, retention=-0.05, exact=0.3), lora, base)  # 2/3 of LoRA's loss
    assert exact_lost["knowledge_exact_loss_share"]["mean"] == pytest.approx(2 / 3)
    assert not forgetting.meets_bar(exact_lost)
    assert not forgetting.meets_bar(forgetting.shares(values(0.6, retention=-0.2, exact=0.5), lora, base))


def test_the_verdict_judges_the_recommended_arm_not_the_best_of_the_ablation(forgetting):
    recommended = [arm.key for arm in forgetting.ARMS.values() if arm.recommended]
    assert recommended == ["ours"]
    assert set(forgetting.ARMS["ours"].mechanisms) == set(forgetting.RECOMMENDED_MECHANISMS)
    ablation = [arm for arm in forgetting.ARMS.values() if arm.ours and len(arm.mechanisms) == 1]
    # every mechanism of the recommended arm is measured alone too
    assert {m for arm in ablation for m in arm.mechanisms} >= set(forgetting.RECOMMENDED_MECHANISMS) - {
        "shape_anchors"
    }


def test_the_style_reference_shows_each_in_scope_question_its_months_training_pairs(forgetting, monkeypatch):
    from argparse import Namespace

    from datasets import Dataset

    import peft_selective.evaluation as evaluation
    from peft_selective.demo.months import knowledge_items
    from peft_selective.evaluation import Check

    items = knowledge_items(n=None, seed=0)
    capital = next(i for i in items if "capital" in i.question.lower())
    other = next(i for i in items if "capital" not in i.question.lower())
    train = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is the capital of {c}?"}],
         "chosen": [{"role": "assistant", "content": f"{a}."}], "rejected": [{"role": "assistant", "content": "Hi!"}]}
        for c, a in [("A", "X"), ("B", "Y"), ("C", "Z"), ("D", "W"), ("E", "V")]
    ])  # fmt: skip
    bare = Check.from_spec(forgetting.BUILTIN_CHECKS["capitals"]["checks"][0])
    months = {"capitals": forgetting.Month("capitals", train, train, train, [bare], [bare], "capital")}
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return [f"{capital.answer}.", "I do not know, sorry about that."]

    monkeypatch.setattr(evaluation, "generate_answers", fake_generate)
    args = Namespace(knowledge_exact=2, max_new_tokens=8, eval_batch_size=2)
    result = forgetting.style_reference(None, None, months, [capital, other], args)
    in_scope, out_of_scope = seen["prompts"]
    assert out_of_scope == other.question  # in scope for no month: asked as it is
    assert len(in_scope) == 2 * forgetting.STYLE_SHOTS + 1 and in_scope[-1]["content"] == capital.question
    assert [t["content"] for t in in_scope[1 : 2 * forgetting.STYLE_SHOTS : 2]] == ["X.", "Y.", "Z.", "W."]
    assert result["knowledge_exact"] == [1.0, 0.0]
    assert result["in_style"] == [1.0] and result["in_scope_items"] == 1


def test_cached_answers_are_scored_again_by_the_checks_of_this_run(forgetting):
    from argparse import Namespace

    from datasets import Dataset

    from peft_selective.evaluation import Check

    rows = Dataset.from_list([{"prompt": "q", "chosen": "Lima.", "rejected": "The capital is Lima."}] * 2)

    def months_with(regex):
        check = Check.from_spec({"name": "style", "regex": regex})
        return {"m": forgetting.Month("m", rows, rows, rows, [check], [check], None)}

    # an evaluation after the last month, as cached by a run whose check also took a run of emoji for the style
    cached = {
        "months": {"m": {"generations": ["Lima.", "🌍🌍"], "scores": [1.0, 1.0]}},
        "knowledge_answers": [],
        "general_answers": ["🌍🌍", "A long answer, in sentences."],
        "knowledge_exact": [],
        "bleed": [1.0, 0.0, 0.0, 0.0],
    }
    args = Namespace(knowledge_exact=0)
    rescored = forgetting.score(json.loads(json.dumps(cached)), months_with(r"^\s*[^\W\d_]\S*$"), ["m"], [], args)
    assert rescored["months"]["m"]["scores"] == [1.0, 0.0]
    assert rescored["bleed"] == [0.0, 0.0, 0.0, 0.0]  # the general answers, then the month's (off-scope for no month)
    again = forgetting.score(json.loads(json.dumps(cached)), months_with(r"^\W*\S+$"), ["m"], [], args)
    assert again["months"]["m"]["scores"] == [1.0, 1.0] and again["bleed"] == [1.0, 0.0, 0.0, 0.0]


def test_an_arm_short_of_loras_learning_is_compared_with_the_recommended_arm_at_its_own_learning(forgetting):
    curve = {0.5: values(0.2, exact=0.4), 1.0: values(0.6, exact=0.2)}
    reading = forgetting.at_learning(curve, 0.4)
    assert reading["reached"] and reading["alpha"] == pytest.approx(0.75)
    assert reading["learning_behaviour"]["mean"] == pytest.approx(0.4)
    assert reading["knowledge_exact"]["mean"] == pytest.approx(0.3)
    below = forgetting.at_learning(curve, 0.1)  # less than the curve's smallest alpha learns: its nearest point
    assert not below["reached"] and below["alpha"] == 0.5


def test_each_arm_is_compared_with_the_style_reference_item_by_item_over_its_runs(forgetting):
    style = {"shots": 4, "in_scope_items": 4, "knowledge_exact": [1.0, 0.0, 1.0, 0.0], "in_style": [1.0] * 4}
    two_runs = [1.0, 1.0, 1.0, 0.0] + [0.0, 0.0, 1.0, 0.0]  # +1 on item 2 in run 1, -1 on item 1 in run 2
    result = forgetting.style_comparison(style, {"ours (matched)": two_runs}, [0.0] * 4)
    assert result["knowledge_exact"]["mean"] == 0.5
    assert result["minus_reference"]["ours (matched)"]["mean"] == 0.0
    assert result["minus_reference"]["lora_all (alpha 1)"]["mean"] == -0.5


def test_a_cached_run_of_another_recipe_is_refused_not_reused(forgetting, tmp_path):
    args = forgetting.parse_args(["--methods", "ours_plain"])
    arm = forgetting.ARMS["ours_plain"]
    forgetting.check_run_recipe(tmp_path, arm, args, 3e-4)
    forgetting.check_run_recipe(tmp_path, arm, args, 3e-4)  # same recipe: reused
    with pytest.raises(SystemExit, match="another recipe"):
        forgetting.check_run_recipe(tmp_path, forgetting.ARMS["ours_sft"], args, 3e-4)
    with pytest.raises(SystemExit, match="another recipe"):
        forgetting.check_run_recipe(tmp_path, arm, args, 1e-3)


def test_a_work_dir_of_other_months_items_or_settings_is_refused_not_reused(forgetting, tmp_path):
    from peft_selective.evaluation.knowledge import KnowledgeItem

    rows = [{"prompt": f"q{i}", "chosen": '{"a": 1}', "rejected": "plain words"} for i in range(2)]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = tmp_path / "months.json"
    spec.write_text(
        json.dumps({"months": [{"name": "m1", "train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}]})
    )
    args = forgetting.parse_args([])
    probe = [KnowledgeItem("What is the capital of France?", "Paris", ("Lyon", "Nice", "Lille"))]
    work = tmp_path / "work"
    work.mkdir()
    fingerprint = forgetting.work_dir_fingerprint(spec, probe, args)
    forgetting.check_work_dir(work, fingerprint)
    assert (work / forgetting.FINGERPRINT_FILE).exists()
    forgetting.check_work_dir(work, forgetting.work_dir_fingerprint(spec, probe, args))  # the same: reused

    args.max_new_tokens += 8
    with pytest.raises(SystemExit, match="other max_new_tokens than"):
        forgetting.check_work_dir(work, forgetting.work_dir_fingerprint(spec, probe, args))
    args.max_new_tokens -= 8
    other_probe = [KnowledgeItem("What is the capital of Peru?", "Lima", ("Cusco", "Quito", "Arequipa"))]
    with pytest.raises(SystemExit, match="other knowledge_items than"):
        forgetting.check_work_dir(work, forgetting.work_dir_fingerprint(spec, other_probe, args))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]))  # a month's data changed under the same file name
    with pytest.raises(SystemExit, match="other months than"):
        forgetting.check_work_dir(work, forgetting.work_dir_fingerprint(spec, probe, args))


def test_the_per_block_dial_scales_each_blocks_update_on_top_of_alpha(forgetting):
    import torch
    from torch import nn

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    model.lm_head = nn.Linear(2, 2)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = {k: torch.ones_like(v) for k, v in base_state.items() if k.endswith("weight")}
    forgetting.apply_delta(model, base_state, delta, 0.5, "0:0.5,1-:1")
    state = model.state_dict()
    for key, factor in [("model.layers.0.weight", 0.25), ("model.layers.1.weight", 0.5), ("lm_head.weight", 0.5)]:
        torch.testing.assert_close(state[key], base_state[key] + factor)
    assert torch.equal(state["model.layers.0.bias"], base_state["model.layers.0.bias"])  # no delta: untouched
    # applying again starts from the base (not on top of the last call)
    forgetting.apply_delta(model, base_state, delta, 1.0)
    torch.testing.assert_close(model.state_dict()["model.layers.0.weight"], base_state["model.layers.0.weight"] + 1)


def test_month_spec_errors_name_the_month_and_the_fix(forgetting, tmp_path):
    spec = tmp_path / "months.json"
    spec.write_text(json.dumps({"months": [{"name": "m1", "train": "missing.jsonl", "val": "x", "test": "y"}]}))
    with pytest.raises(SystemExit, match="month 'm1'.*does not exist"):
        forgetting.load_months(spec)
    rows = [{"prompt": "q", "chosen": '{"a": 1}', "rejected": "plain words in a sentence"}] * 2
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    month = {"name": "m1", "train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
    spec.write_text(json.dumps({"months": [{**month, "checks": [{"regex": "("}]}]}))
    with pytest.raises(SystemExit, match="month 'm1'"):
        forgetting.load_months(spec)
    spec.write_text(json.dumps({"months": [month, month]}))
    with pytest.raises(SystemExit, match="unique 'name'"):
        forgetting.load_months(spec)
    # a month without checks whose answers have no telling style: declare a check
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) for _ in range(2))
    )
    spec.write_text(json.dumps({"months": [month]}))
    with pytest.raises(SystemExit, match="month 'm1': No feature.*declare a check"):
        forgetting.load_months(spec)


def test_unknown_arms_and_alphas_without_one_are_refused(forgetting, capsys):
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--methods", "lora_all,nope"])
    assert "unknown --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--alphas", "0.5"])
    assert "must include 1.0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_run_writes_protocol_2_results_and_resumes(forgetting, tmp_path):
    argv = [
        "--model", "tiny", "--methods", "lora_all,ours,ours_lower_blocks", "--steps", "2", "--n-train", "8", "--n-val", "4",
        "--n-test", "4", "--knowledge-items", "150", "--knowledge-exact", "6", "--general-prompts", "3",
        "--max-new-tokens", "6", "--lrs", "1e-3,1e-2", "--work-dir", str(tmp_path / "work"),
        "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert forgetting.main(argv) == 0
    report = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert report["protocol"] == 2
    assert (tmp_path / "out" / "forgetting.png").stat().st_size > 0
    for arm in ("lora_all", "ours"):
        for alpha in ("0.5", "1"):
            stats = report["arms"][arm]["alphas"][alpha]
            for metric in forgetting.METRICS:
                lo, hi = stats[metric]["ci95"]
                assert lo <= stats[metric]["mean"] <= hi
    assert set(report["verdict"]) >= {"learning_share", "bleed_share", "knowledge_loss_share", "meets_bar"}
    assert report["settings"]["knowledge_items"] == 150
    # the validation answers are cached with their scores, so that a later run scores them by its own checks
    assert set(json.loads((tmp_path / "work" / "lr-lora_all.json").read_text())["answers"]) == {
        "base",
        "0.001",
        "0.01",
    }
    rows = [name.split(" ")[0] for name in report["style_reference"]["minus_reference"]]
    assert rows == ["lora_all", "ours", "ours_lower_blocks"]
    # the per-block arm reuses ours's training: no delta of its own, the same training logs, its own evaluations
    runs = tmp_path / "work" / "runs"
    assert not list((runs / "ours_lower_blocks-A-s0").glob("delta-*"))
    assert list((runs / "ours_lower_blocks-A-s0").glob("eval-*.json"))
    assert report["arms"]["ours_lower_blocks"]["train"] == report["arms"]["ours"]["train"]
    assert report["arms"]["ours_lower_blocks"]["mechanisms"][-1].startswith("per-block dial")

    # everything is cached: a second run trains and evaluates nothing, rewrites no file (the built-in months' data
    # included) and writes the same numbers
    def stamps():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*")}

    before = stamps()
    assert forgetting.main(argv) == 0
    assert stamps() == before
    again = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert again["arms"] == report["arms"] and again["verdict"] == report["verdict"]
    # the same work dir asked for other generation settings: refused, nothing of it touched
    with pytest.raises(SystemExit, match="other max_new_tokens"):
        forgetting.main([*argv, "--max-new-tokens", "7"])
    assert stamps() == before
