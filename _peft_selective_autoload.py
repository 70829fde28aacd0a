"""Start-up hook that registers peft-selective's methods with PEFT whenever a program imports `peft`.

Installed as `peft_selective_autoload.pth` in site-packages, which makes Python import this module at start-up.
It only puts a tiny finder on `sys.meta_path` (no torch, no peft import): a program that never imports `peft` pays
for one small module import and nothing else. When `peft` is imported, the finder lets the normal import happen and
afterwards imports `peft_selective`, so `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM` can load our
adapters in a process that never imported `peft_selective` itself.

Set `PEFT_SELECTIVE_NO_AUTOLOAD=1` to turn the hook off.
"""

import os
import sys


class _RegisterAfterPeftImport:
    """Meta-path finder that defers to the other finders for `peft` and registers our methods once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion into ourselves below
        spec = None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None:
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)
            spec.loader.exec_module = exec_peft
            try:
                import peft_selective  # noqa: F401  (registers on import)
            except Exception as exc:  # never let our hook break `import peft`
                import warnings

                warnings.warn(f"peft-selective could not register its PEFT methods: {exc!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("PEFT_SELECTIVE_NO_AUTOLOAD") or "peft" in sys.modules:
        return
    if not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftImport())


install()
