"""Structure of the tuners: registration as PEFT's tuners do it, no import cycle, GeometryProjected as a layer variant.

- Each tuner package registers its own methods in its `__init__.py` (module-level calls, nowhere else: no config's
  `__post_init__` registers anything); `peft_selective.registration` is only the mechanism and imports nothing from
  the package.
- The import graph of `peft_selective/tuners` + `registration` (every import, deferred ones included) is acyclic,
  and `tuners/selective` never imports `tuners/geometry`.
- The saved `selective_protected_stats` tensor is a `ProtectedStats` record; the bound formula is written once.
- "Full rank" is `rank=None` everywhere; `rank=0` is refused.
- The test suite: no test module (or script) imports another test module or conftest; shared helpers are in
  `tests/testing_utils.py`.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import PeftType
from testing_utils import TESTS_DIR

import peft_selective
from peft_selective import GeometryProjectedConfig, SAProjConfig, SelectiveMLPConfig
from peft_selective.tuners.geometry import ProjectedVariant, ProtectedStats
from peft_selective.tuners.geometry.subspace import ProtectedSubspace, relative_output_bound
from peft_selective.tuners.selective import SelectiveLayer


PACKAGE_DIR = Path(peft_selective.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
REGISTER_CALLS = {"register", "register_method", "register_variant", "register_peft_method"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never executed, so no import edge)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports_of(name: str, *, with_type_checking: bool = False) -> set[str]:
    """The peft_selective modules `name` imports, anywhere in its code (function-level imports included)."""
    path = module_path(name)
    tree = ast.parse(path.read_text())
    skipped = set() if with_type_checking else _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import submodule` imports the submodule; `from pkg.mod import name` imports pkg.mod
            targets = [f"{source}.{a.name}" if module_path(f"{source}.{a.name}") else source for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] == "peft_selective" and module_path(t)}
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module of `tuners` and `registration`, and (transitively) the package modules they import."""
    todo = [module_name(p) for p in (PACKAGE_DIR / "tuners").rglob("*.py")]
    todo.append("peft_selective.registration")
    graph: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = imports_of(name)
            todo += graph[name]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


# ------------------------------------------------------------------------------------------------- wings
#: Which wings each wing may import (besides itself). Imports run one way: utils <- core <- tuners <- continual <-
#: campaign; evaluation and demo are leaves that only the campaign (and demo: evaluation's types) builds on.
WING_MAY_IMPORT = {
    "utils": set(),
    "core": {"utils"},  # registration, targets, quantization
    "tuners": {"core", "utils"},
    "retention": {"tuners", "core", "utils"},  # the post-training scale dial over the tuners' adapters
    "root": {"tuners", "core", "utils"},  # peft_selective/__init__.py
    "evaluation": {"tuners", "core", "utils"},
    "continual": {"tuners", "core", "utils"},
    "demo": {"evaluation", "tuners", "core", "utils"},
    "campaign": {"root", "continual", "evaluation", "demo", "retention", "tuners", "core", "utils"},
}


def wing_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("registration", "targets", "quantization"):
        return "core"
    assert parts[1] in WING_MAY_IMPORT, f"{module} belongs to no wing: add it to WING_MAY_IMPORT"
    return parts[1]


def package_import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(module_name(p)) for p in PACKAGE_DIR.rglob("*.py")}


def test_the_package_has_no_import_cycle():
    graph = package_import_graph()
    assert len(graph) > 40 and "peft_selective.campaign.campaign" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_imports_run_one_way_between_the_wings():
    wrong = []
    for module, imported in package_import_graph().items():
        wing = wing_of(module)
        for target in imported:
            other = wing_of(target)
            if other != wing and other not in WING_MAY_IMPORT[wing]:
                wrong.append(f"{module} ({wing}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_wing_rule_catches_an_upward_import():
    assert "continual" not in WING_MAY_IMPORT["tuners"] and "campaign" not in WING_MAY_IMPORT["evaluation"]
    assert wing_of("peft_selective.continual.trainer") == "continual" and wing_of("peft_selective.targets") == "core"


# ------------------------------------------------------------------------------------------------ the test suite
def forbidden_test_imports(source: str) -> list[str]:
    """The imports of a test module (or script) that reach into another test module or conftest: every shared helper
    lives in `testing_utils`, and conftest only holds fixtures."""
    wrong = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else [f"{'.' * node.level}{node.module or ''}"]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if name.startswith(".") or top == "conftest" or top.startswith("test_") or top == "tests":
                wrong.append(f"line {node.lineno}: {ast.unparse(node)}")
    return wrong


def test_no_test_imports_another_test_module_or_conftest():
    files = sorted(TESTS_DIR.rglob("*.py"))
    assert len(files) > 30 and TESTS_DIR / "testing_utils.py" in files
    wrong = [
        f"{path.relative_to(TESTS_DIR)} {problem}"
        for path in files
        for problem in forbidden_test_imports(path.read_text(encoding="utf-8"))
    ]
    assert not wrong, "import shared helpers from testing_utils:\n" + "\n".join(wrong)


def test_the_test_import_rule_catches_conftest_and_test_modules():
    source = "import conftest\nfrom test_campaign import cli\nimport test_health as h\nfrom . import x\n"
    assert len(forbidden_test_imports(source)) == 4
    assert forbidden_test_imports("from testing_utils import cli\nimport pytest\nfrom peft_selective import x") == []


def test_importing_the_package_imports_neither_trl_nor_matplotlib():
    code = (
        "import sys, peft_selective\n"
        "heavy = sorted({'trl', 'datasets', 'matplotlib'} & set(sys.modules))\n"
        "assert not heavy, heavy\nprint('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_adapters_work_without_the_extras():
    """What `pip install peft-selective` (no extras) gives: with trl, datasets, matplotlib, lm-eval and the demo
    packages made unimportable, the adapters still build, train a step, save and load."""
    code = textwrap.dedent(
        """
        import sys
        import importlib.machinery

        class Missing:
            # our extras' packages look installed to `find_spec` (transformers probes them that way) but cannot be
            # imported, as if `pip install peft-selective` had left them out
            blocked = {"trl", "datasets", "matplotlib", "gguf", "countryinfo", "lm_eval"}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.blocked:
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r} (simulated: not installed)")
            def exec_module(self, module):
                pass
        sys.meta_path.insert(0, Missing())
        import tempfile, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import PeftModel, get_peft_model
        from peft_selective import SelectiveMLPConfig
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2)
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        model = get_peft_model(base, SelectiveMLPConfig(rank=4))
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
        expected = model(input_ids=ids).logits
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            torch.manual_seed(0)
            loaded = PeftModel.from_pretrained(LlamaForCausalLM(config), d)
            assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
        assert not {"trl", "datasets", "matplotlib"} & set(sys.modules)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_core_dependencies_are_the_adapters_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("<")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert core == {"torch", "transformers", "peft", "safetensors", "huggingface_hub", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"trl", "campaign", "demo", "dev"} <= set(extras)
    assert project["scripts"]["continual-dpo"] == "peft_selective.campaign.cli:main"


def test_the_old_trl_ext_name_still_imports_with_a_deprecation_warning():
    code = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from trl_ext import ContinualDPOTrainer
            from trl_ext.campaign import Campaign
            import trl_ext.data
        import peft_selective.campaign, peft_selective.continual
        assert ContinualDPOTrainer is peft_selective.continual.ContinualDPOTrainer
        assert Campaign is peft_selective.campaign.Campaign
        assert any("trl_ext" in str(w.message) and w.category is FutureWarning for w in caught)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- import graph
def test_the_tuners_and_registration_have_no_import_cycle():
    graph = import_graph()
    assert "peft_selective.tuners.geometry.variant" in graph and "peft_selective.tuners.selective.layer" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_selective_never_imports_geometry():
    for path in (PACKAGE_DIR / "tuners" / "selective").rglob("*.py"):
        name = module_name(path)
        imported = imports_of(name, with_type_checking=True)
        assert not {m for m in imported if ".geometry" in m}, (name, imported)
        assert "geometry" not in {
            part for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
            for part in (node.module or "").split(".")
        }, name  # fmt: skip


def test_registration_is_only_the_mechanism():
    """It imports nothing from the package, and has no lock."""
    assert imports_of("peft_selective.registration") == set()
    source = (PACKAGE_DIR / "registration.py").read_text()
    assert "threading" not in source and "Lock" not in source


def test_methods_register_only_at_import_of_their_tuner_package():
    """Registration calls are module-level statements of the tuner packages' `__init__.py`, nowhere else (not in a
    config's `__post_init__`, not behind a function)."""
    calls: dict[str, list[str]] = {}
    for path in [*(PACKAGE_DIR / "tuners").rglob("*.py"), PACKAGE_DIR / "__init__.py"]:
        tree = ast.parse(path.read_text())
        top_level = {id(n) for stmt in tree.body if isinstance(stmt, ast.Expr) for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func in REGISTER_CALLS:
                    assert id(node) in top_level and path.name == "__init__.py", f"{path}: {ast.unparse(node)}"
                    calls.setdefault(module_name(path), []).append(ast.unparse(node.args[0]))
    assert calls == {
        "peft_selective.tuners.selective": ["'selective_mlp'", "'saproj'"],
        "peft_selective.tuners.geometry": ["ProjectedVariant.name", "'geometry_projected'"],
    }


def test_importing_a_deep_module_first_registers_everything_once():
    """A fresh process whose first import is a module deep inside the geometry package."""
    code = textwrap.dedent(
        """
        import peft_selective.tuners.geometry.variant as variant
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        from peft.utils.peft_types import PeftType
        import peft_selective
        from peft_selective.tuners.selective.layer import VARIANTS

        names = ["SELECTIVE_MLP", "SAPROJ", "GEOMETRY_PROJECTED"]
        assert all(list(PeftType).count(PeftType[n]) == 1 for n in names)
        assert all(PEFT_TYPE_TO_PREFIX_MAPPING[PeftType[n]] == "selective_" for n in names)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GEOMETRY_PROJECTED] is peft_selective.GeometryProjectedConfig
        assert VARIANTS == {"projected": variant.ProjectedVariant}
        peft_selective.register()
        peft_selective.registration.register_method(
            "saproj", peft_selective.SAProjConfig, peft_selective.SAProjModel
        )  # idempotent
        assert list(PeftType).count(PeftType.SAPROJ) == 1
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_configs_name_their_registered_type():
    for config_cls, name in (
        (SelectiveMLPConfig, "SELECTIVE_MLP"),
        (SAProjConfig, "SAPROJ"),
        (GeometryProjectedConfig, "GEOMETRY_PROJECTED"),
    ):
        assert config_cls().peft_type is PeftType[name]
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]] is config_cls


# ---------------------------------------------------------------------------------------------- the variant
def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))


def test_geometry_adapters_get_the_projected_variant_and_plain_ones_none():
    plain = get_peft_model(tiny_mlp(), SelectiveMLPConfig(target_modules=["0"]))
    layer = next(m for m in plain.modules() if isinstance(m, SelectiveLayer))
    assert not layer.selective_variant and "default" not in layer.selective_protected_stats

    model = get_peft_model(tiny_mlp(), GeometryProjectedConfig(target_modules=["0"], rank=2))
    model.add_adapter("month2", GeometryProjectedConfig(target_modules=["0"], rank=2))
    layer = next(m for m in model.modules() if isinstance(m, SelectiveLayer))
    assert isinstance(layer.selective_variant["default"], ProjectedVariant)
    assert layer.selective_variant["default"] is not layer.selective_variant["month2"]  # one per adapter
    assert ProtectedStats.from_tensor(layer.selective_protected_stats["default"]) == ProtectedStats(0, 0, 0, 0, 0)
    assert not layer.is_calibrated("default")
    model.delete_adapter("default")
    assert list(layer.selective_variant) == ["month2"] and "default" not in layer.selective_protected_basis


def test_protected_stats_round_trip_in_the_saved_layout():
    stats = ProtectedStats(residual_eigenvalue=0.25, output_energy=4.0, calibration_tokens=96, norm_cap=0.5,
                           outlier_axes=2)  # fmt: skip
    tensor = stats.to_tensor()
    # the layout adapters are saved with: [residual eigenvalue, output energy, tokens, norm cap, outlier axes], fp32
    assert tensor.dtype == torch.float32 and tensor.tolist() == [0.25, 4.0, 96.0, 0.5, 2.0]
    assert ProtectedStats.from_tensor(tensor) == stats and stats.calibrated
    with pytest.raises(ValueError, match="5 values"):
        ProtectedStats.from_tensor(torch.zeros(4))


def test_the_bound_is_one_formula():
    subspace = ProtectedSubspace(torch.zeros(8, 0), torch.zeros(0), torch.zeros(0), 0.3, torch.ones(8))
    stats = ProtectedStats(0.3, 2.0, 10, 0.7, 0)
    assert subspace.bound(0.7, 2.0) == stats.bound() == relative_output_bound(0.3, 0.7, 2.0)
    assert math.isclose(stats.bound(), math.sqrt(0.3) * 0.7 / math.sqrt(2.0))


# ------------------------------------------------------------------------------------------------- full rank
@pytest.mark.parametrize("config_cls", [SelectiveMLPConfig, SAProjConfig, GeometryProjectedConfig])
def test_full_rank_is_none_and_zero_is_refused(config_cls):
    with pytest.raises(ValueError, match="positive integer"):
        config_cls(rank=0)
    model = get_peft_model(tiny_mlp(), config_cls(target_modules=["0"], rank=None))
    layer = next(m for m in model.modules() if isinstance(m, SelectiveLayer))
    assert layer.rank["default"] is None and "default" in layer.selective_delta_weight
    assert "default" not in layer.selective_delta_A
