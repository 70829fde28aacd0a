"""examples/: short scripts on the public API. They import neither the benchmarks nor private modules, and the
quickstart runs end to end on the bundled model (train, save, reload, merge)."""

import ast
import importlib.util
import json
import subprocess
import sys

import pytest
from testing_utils import EXAMPLES_DIR


EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            yield node.module
            # `from package import _private`
            yield from (f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_only_the_public_api(path):
    assert {"monthly_dpo.py", "selective_mlp_sft.py", "quickstart.py"} <= {p.name for p in EXAMPLES}
    for module in imported_modules(path):
        parts = module.split(".")
        assert parts[0] not in ("benchmarks", "_common", "tests", "testing_utils"), f"{path.name} imports {module}"
        assert not any(part.startswith("_") and part != "__future__" for part in parts), f"{path.name}: {module}"
    assert "sys.path" not in path.read_text(), f"{path.name} changes sys.path"


@pytest.mark.slow  # the bundled model, twice, and a few training steps: about a minute on a shared CPU
def test_quickstart_trains_saves_reloads_and_merges(tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES_DIR / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    result = quickstart.main(["--steps", "3", "--output-dir", str(tmp_path / "adapter")])
    assert len(result["losses"]) == 3 and result["losses"][-1] < result["losses"][0]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert result["reload_diff"] < 1e-5  # the saved adapter is the trained one
    assert result["merge_diff"] < 1e-3  # merging changes only float rounding
    assert isinstance(result["answer"], str)


@pytest.mark.slow  # both arms, two months of two steps on the bundled model, tiny evaluations
def test_monthly_dpo_quick_runs_both_arms_and_writes_table_plot_and_cards(tmp_path):
    output, results = tmp_path / "demo", tmp_path / "results" / "monthly_dpo"
    # As `make demo` runs it: its own process, so that what it prints is checked as a user sees it.
    command = [sys.executable, str(EXAMPLES_DIR / "monthly_dpo.py"), "--quick", "--fresh", "--output-dir", str(output)]
    run = subprocess.run([*command, "--results", str(results)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout + run.stderr
    for known in ("gemm_4bit_forward", "FutureWarning", "is deprecated"):  # peft_selective.utils.warnings' list
        assert known not in printed, f"the demo printed a known-irrelevant warning ({known!r}):\n{printed[-3000:]}"
    assert "Both arms finished" in run.stdout
    months = ["1-capitals", "2-currency"]

    payload = json.loads(results.with_suffix(".json").read_text())
    comparison = payload["comparison"]
    assert comparison["months"] == months and set(comparison["rows"]) == {"peft_selective", "lora"}
    campaign, lora = payload["peft_selective"]["evaluations"], payload["lora"]["evaluations"]
    for month in months:  # the same items, measured by the same evaluation, for both arms
        assert (
            sorted(lora[month]["behaviour"])
            == sorted(campaign[month]["behaviour"])
            == months[: months.index(month) + 1]
        )
        for scored in lora[month]["behaviour"]:
            assert (
                len(lora[month]["behaviour"][scored]["scores"])
                == len(campaign[month]["behaviour"][scored]["scores"])
                == 3
            )
        assert len(lora[month]["knowledge"]["mc"]) == len(campaign[month]["knowledge"]["mc"]) == 6
        assert lora[month]["knowledge"]["exact"]["items"] == campaign[month]["knowledge"]["exact"]["items"]
        for arm in ("peft_selective", "lora"):
            row = comparison["rows"][arm][month]
            assert row["learning"]["after"]["n"] == 3 and "gain" in row["learning"]
            assert row["knowledge_mc"]["n"] == comparison["knowledge_items"]["mc"] > 0
            assert row["kl_to_base"] > 0  # each arm's model moved away from the base
    assert comparison["rows"]["lora"]["2-currency"]["kept"]["n"] == 3  # month 1's items, after month 2
    assert comparison["rows"]["peft_selective"]["1-capitals"]["kept"] is None

    # The LoRA arm: all-linear LoRA, one adapter per month; the other arm: SelectiveMLP adapters stacked by the campaign
    for month in months:
        config = json.loads((output / "lora" / "adapters" / month / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and {"q_proj", "down_proj"} <= set(config["target_modules"])
        config = json.loads((output / "peft_selective" / "adapters" / month / "adapter_config.json").read_text())
        assert config["peft_type"] != "LORA" and "down_proj" not in config["target_modules"]
        card = (output / "peft_selective" / "cards" / month / "README.md").read_text()
        assert month in card
    table = results.with_suffix(".md").read_text()
    assert table.count("| LoRA + DPOTrainer |") == table.count("| peft-selective |") == 2
    assert "load average" in table and payload["load_average_start"] is not None
    image = results.with_suffix(".png").read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 20_000
    assert (output / "comparison.png").read_bytes() == image
