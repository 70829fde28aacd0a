"""examples/: short scripts on the public API. They import neither the benchmarks nor private modules, and the
quickstart runs end to end on the bundled model (train, save, reload, merge)."""

import ast
import importlib.util

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
