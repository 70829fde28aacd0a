"""Model cards for the monthly adapters of a continual-DPO campaign: a Hub-ready `README.md` and a `retention.png`
plot, rendered from the jinja template `model_cards/adapter_card.md` with `huggingface_hub.ModelCard`.

```python
from peft_selective.campaign.model_card import render_model_card

readme = render_model_card(context, "campaign/cards/2025-07")  # writes README.md and retention.png there
```

The card states the base model as it was trained on (for the bundled default: the GGUF file, dequantized, and the
Hub model it converts; the precision as loaded; the campaign's fingerprint of its weights), the method with its
adapter config (the target modules as resolved on the model) and training hyperparameters, the data of every month, the behavioural retention matrix R[t][i] (greedy answers scored by the months' checks or by
agreement) with 95% intervals, average and backward transfer, what each month learned (paired gain against the model
before it), bleed, knowledge (multiple choice and exact match), the ranking of the held-out pairs (not
generation-based, with the implicit-reward accuracy under its own name), the general-ability metrics against the
untrained model ("month-0"), how to load the stacked adapters, and the limitations (which numbers are behavioural).
The plot (`plot_panels` gives its data) shows what each month learned, how each month's score moved from before it
to every later month, knowledge and bleed, refusal rates, and the KL to the base, each on its own axis.

Context schema (a dict; the campaign builds it after evaluating a month). Required keys:

| key | type | meaning |
|---|---|---|
| `month` | `str` | the month this card describes; must be the last entry of `months` |
| `months` | `list[str]` | months trained so far, in training order |
| `base_model` | `str` | Hub id (or path) of the base model (the title, and the metadata's `base_model` unless `base` says otherwise) |
| `method` | `str` | PEFT method, e.g. `"selective_mlp"` (also used as a Hub tag) |
| `method_config` | `dict` | the adapter config as saved after injection (`adapter_config.json`): `target_modules` (or `target_parameters`) resolved, not `None` |
| `training` | `dict` | training hyperparameters (JSON-able) |
| `data` | `dict[str, dict]` | per month: `source`, `train_rows`, `test_rows`, `rehearsal_rows` (further keys are shown too) |
| `retention` | `dict` | `{"months": [...], "R": [[...], ...]}`: `R[t][i]` = behavioural score on month i's held-out prompts after training month t; `None` (or absent) where i > t or not measured; `retention["months"]` must equal `months`. Optional: `ci95` (same shape, `[lo, hi]` or `None`), `scored_by` (`{month: "checks: ..." or "agreement"}`), `average` and `bwt_interval` (`{"mean", "ci95"}`) |
| `general` | `dict[str, dict[str, float]]` | `{"month-0": {metric: value}, "<month>": {metric: value}, ...}`; may be `{}` when nothing was measured, otherwise `"month-0"` (the base model before any month) is required |

Optional keys: `base` (the base as trained: `kind` `"embedded"` (the bundled GGUF), `"hub"` or `"local"`; `path`
(the GGUF file, Hub id or folder loaded); `revision` (Hub commit); `gguf_file` and `source_package` (embedded);
`converted_from` (embedded: the Hub model the GGUF converts, the metadata's `base_model`); `precision` (as loaded,
e.g. `"float32"` or `"4-bit nf4 (bitsandbytes), compute dtype float32; other weights float32"`); `fingerprint` (the
campaign's `base_fingerprint`, with `weights_sha256`); all optional but `kind`), `quantization` (`"4bit"`, `"8bit"` or
`None`), `hub_repo` (`"org/name"` or `None`: the loading code then
uses `subfolder="months/<month>"` of that repo, else the campaign's local `adapters/<month>` folders), `license` (a Hub
license id such as `"apache-2.0"`), `limitations` (`list[str]`, added to the card's own), and the tables of
`peft_selective.evaluation.suites` (summaries are `{"mean", "ci95": [lo, hi]}`): `learning` ([`learning_table`]: per month
`scored_by`, `before`, `after`, `gain`, `learned`), `bleed` ([`bleed_table`]: per month `styles`, `note`, `after`
{month: summary}, `base`), `knowledge` ([`knowledge_table`]: `mc` / `exact` {column: summary}, `n_mc`, `n_exact`,
`pool`) and `ranking` ([`ranking_table`]: per month `ranking_accuracy`, `ranking_margin`, `implicit_reward_accuracy`),
and `retention_dial` (per month with a retention scale, the campaign's record: `scale`, `rule`, and for a chosen
scale `curve` [{`scale`, `score`, `learning_gain`, `forgetting`}], `before`, `scored_by`, `validation_rows`).

Every problem with the context raises [`ModelCardContextError`] naming the key and what was expected.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCard, ModelCardData

from ..evaluation.preference import average_accuracy, backward_transfer, retention_cells
from ..targets import split_block_path
from ..utils.io import atomic_write
from . import layout


__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "PLOT_FILENAME",
    "ModelCardContext",
    "ModelCardContextError",
    "PlotPanel",
    "card_metadata",
    "plot_panels",
    "plot_retention",
    "render_model_card",
    "target_modules_text",
]

#: The template: the repository's top-level `model_cards/` folder, which the wheel ships as `peft_selective/campaign/model_cards/`.
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "adapter_card.md"
DEFAULT_TEMPLATE_PATH = (
    _PACKAGED_TEMPLATE
    if _PACKAGED_TEMPLATE.is_file()
    else Path(__file__).resolve().parents[2] / "model_cards" / "adapter_card.md"
)
#: The plot's file name, next to the card (the card links it relatively, so it works at any folder of a Hub repo).
PLOT_FILENAME = layout.PLOT_FILE

_REQUIRED_KEYS = (
    "month",
    "months",
    "base_model",
    "method",
    "method_config",
    "training",
    "data",
    "retention",
    "general",
)
_BASELINE = "month-0"
_PLOT_BASELINE = "month 0"
_DATA_COLUMNS = ("source", "train_rows", "test_rows", "rehearsal_rows")
# Long config values (resolved `target_modules` lists every adapted layer) are cut in the tables.
_MAX_LIST_ITEMS = 6
_MAX_CELL_CHARS = 120
_BASE_KINDS = ("embedded", "hub", "local")
_BASE_TEXT_KEYS = ("path", "revision", "gguf_file", "source_package", "converted_from", "precision")
# Keys of the adapter config that name what the adapter wraps (shown as a summary, never cut nor `null`).
_TARGET_KEYS = ("target_modules", "target_parameters")
_QUANTIZATION_CODE = {
    "4bit": 'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")',
    "8bit": "quantization_config=BitsAndBytesConfig(load_in_8bit=True)",
}


class ModelCardContextError(ValueError):
    """The model-card context is missing a key or has a malformed value; the message says which and what to pass."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelCardContextError(message)


def _optional_str(context: Mapping[str, Any], key: str) -> Optional[str]:
    value = context.get(key)
    _require(
        value is None or (isinstance(value, str) and value.strip() != ""),
        f"`{key}` must be a non-empty string or None, got {value!r}.",
    )
    return value


@dataclass(frozen=True)
class ModelCardContext:
    """A validated model-card context (see the module docstring for the dict it is built from).

    Attributes:
        month (`str`): the month the card describes (the last of `months`).
        months (`tuple[str, ...]`): months trained so far, in training order.
        base_model (`str`): Hub id or path of the base model.
        base (`dict`): the base as trained (`kind`, and what is known of `path`, `revision`, `gguf_file`,
            `source_package`, `converted_from`, `precision`, `fingerprint`).
        method (`str`): PEFT method name.
        method_config (`dict`): adapter config.
        training (`dict`): training hyperparameters.
        data (`dict[str, dict]`): per-month data summary.
        R (`list[list[Optional[float]]]`): square retention matrix, `R[t][i]` for i <= t, `None` elsewhere.
        general (`dict[str, dict[str, Optional[float]]]`): general metrics by `"month-0"` / month name.
        quantization (`str`, *optional*): quantization of the base model during training.
        hub_repo (`str`, *optional*): Hub repo the campaign is pushed to.
        license (`str`, *optional*): Hub license id.
        limitations (`tuple[str, ...]`): extra limitations from the campaign.
    """

    month: str
    months: tuple[str, ...]
    base_model: str
    method: str
    method_config: dict[str, Any]
    training: dict[str, Any]
    data: dict[str, dict[str, Any]]
    R: list[list[Optional[float]]]
    general: dict[str, dict[str, Optional[float]]]
    base: dict[str, Any] = field(default_factory=dict)
    quantization: Optional[str] = None
    hub_repo: Optional[str] = None
    license: Optional[str] = None
    limitations: tuple[str, ...] = field(default_factory=tuple)
    ci95: Optional[list[list[Optional[list[float]]]]] = None
    scored_by: dict[str, Optional[str]] = field(default_factory=dict)
    average: Optional[dict[str, Any]] = None
    bwt_interval: Optional[dict[str, Any]] = None
    learning: dict[str, dict[str, Any]] = field(default_factory=dict)
    bleed: dict[str, dict[str, Any]] = field(default_factory=dict)
    knowledge: dict[str, Any] = field(default_factory=dict)
    ranking: dict[str, dict[str, Any]] = field(default_factory=dict)
    retention_dial: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, context: Mapping[str, Any]) -> ModelCardContext:
        """Validate `context` and build the normalized context; raises [`ModelCardContextError`]."""
        _require(isinstance(context, Mapping), f"The model-card context must be a dict, got {type(context).__name__}.")
        missing = [key for key in _REQUIRED_KEYS if key not in context]
        _require(
            not missing,
            f"The model-card context is missing {', '.join(repr(k) for k in missing)} (it has {sorted(context)}). "
            "Required keys: "
            + ", ".join(_REQUIRED_KEYS)
            + "; see the `peft_selective.campaign.model_card` docstring for the schema.",
        )

        months = context["months"]
        _require(
            isinstance(months, Sequence) and not isinstance(months, str) and len(months) > 0,
            f"`months` must be a non-empty list of month names in training order, got {months!r}.",
        )
        months = tuple(months)
        _require(
            all(isinstance(m, str) and m for m in months), f"`months` must hold non-empty strings, got {list(months)}."
        )
        _require(len(set(months)) == len(months), f"`months` has duplicates: {list(months)}.")
        month = context["month"]
        _require(
            month == months[-1],
            f"`month` ({month!r}) must be the last entry of `months` ({list(months)}): a card describes the model after "
            "its month, with every earlier month in the retention table.",
        )
        for key in ("base_model", "method"):
            value = context[key]
            _require(
                isinstance(value, str) and value.strip() != "", f"`{key}` must be a non-empty string, got {value!r}."
            )
        for key in ("method_config", "training"):
            _require(isinstance(context[key], Mapping), f"`{key}` must be a dict, got {type(context[key]).__name__}.")
        _check_targets(context["method_config"])

        return cls(
            month=month,
            months=months,
            base_model=context["base_model"],
            method=context["method"],
            method_config=dict(context["method_config"]),
            training=dict(context["training"]),
            data=_check_data(context["data"], months),
            R=_check_retention(context["retention"], months),
            general=_check_general(context["general"], months),
            base=_check_base(context.get("base"), context["base_model"]),
            quantization=_optional_str(context, "quantization"),
            hub_repo=_optional_str(context, "hub_repo"),
            license=_optional_str(context, "license"),
            limitations=_check_limitations(context.get("limitations")),
            ci95=_check_intervals(context["retention"].get("ci95"), months),
            scored_by=dict(context["retention"].get("scored_by") or {}),
            average=_check_summary(context["retention"].get("average"), "retention['average']"),
            bwt_interval=_check_summary(context["retention"].get("bwt_interval"), "retention['bwt_interval']"),
            learning=_check_table(context.get("learning"), "learning"),
            bleed=_check_table(context.get("bleed"), "bleed"),
            knowledge=_check_table(context.get("knowledge"), "knowledge"),
            ranking=_check_table(context.get("ranking"), "ranking"),
            retention_dial=_check_table(context.get("retention_dial"), "retention_dial"),
        )


def _check_targets(method_config: Mapping[str, Any]) -> None:
    """An adapter config that names its targets must name them resolved: `null` says nothing of what was adapted."""
    if "target_modules" not in method_config:
        return
    _require(
        any(method_config.get(key) for key in _TARGET_KEYS),
        "`method_config` has `target_modules` None: pass the adapter config saved after injection (the month's "
        "adapter_config.json), where the tuner has resolved the modules it wraps from the model's structure.",
    )


def _check_base(base: Any, base_model: str) -> dict[str, Any]:
    if base is None:  # nothing known beyond the name: a Hub id or a path, as `base_model` says
        return {"kind": None, "path": base_model}
    _require(isinstance(base, Mapping), f"`base` must be a dict, got {type(base).__name__}.")
    _require(
        base.get("kind") in _BASE_KINDS, f"`base['kind']` must be one of {_BASE_KINDS}, got {base.get('kind')!r}."
    )
    for key in _BASE_TEXT_KEYS:
        value = base.get(key)
        _require(
            value is None or (isinstance(value, str) and value.strip() != ""),
            f"`base[{key!r}]` must be a non-empty string or None, got {value!r}.",
        )
    fingerprint = base.get("fingerprint")
    _require(
        fingerprint is None or isinstance(fingerprint, Mapping),
        f"`base['fingerprint']` must be a dict (campaign.json's `base_fingerprint`) or None, got {fingerprint!r}.",
    )
    return dict(base)


def _check_data(data: Any, months: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    _require(isinstance(data, Mapping), f"`data` must be a dict keyed by month, got {type(data).__name__}.")
    missing = [m for m in months if m not in data]
    _require(
        not missing,
        f"`data` has no entry for {missing} (it has {sorted(data)}): give every month its "
        '{"source", "train_rows", "test_rows", "rehearsal_rows"} summary.',
    )
    for m in months:
        _require(isinstance(data[m], Mapping), f"`data[{m!r}]` must be a dict, got {type(data[m]).__name__}.")
    return {m: dict(data[m]) for m in months}


def _check_retention(retention: Any, months: tuple[str, ...]) -> list[list[Optional[float]]]:
    _require(
        isinstance(retention, Mapping) and "R" in retention and "months" in retention,
        f'`retention` must be a dict {{"months": [...], "R": [[...], ...]}}, got {retention!r}.',
    )
    _require(
        tuple(retention["months"]) == months,
        f"`retention['months']` ({list(retention['months'])}) must equal `months` ({list(months)}), in the same order.",
    )
    R = retention["R"]
    _require(
        isinstance(R, Sequence) and len(R) == len(months),
        f"`retention['R']` must have one row per month ({len(months)}), got {R!r}.",
    )
    matrix = []
    for t, row in enumerate(R):
        _require(
            isinstance(row, Sequence) and t < len(row) <= len(months),
            f"`retention['R'][{t}]` (after {months[t]}) must list the accuracy on months 0..{t} (at most {len(months)} "
            f"cells, None for months not trained yet), got {row!r}.",
        )
        cells: list[Optional[float]] = []
        for i in range(len(months)):
            value = row[i] if i < len(row) else None
            _require(
                value is None or _is_number(value),
                f"`retention['R'][{t}][{i}]` must be a finite number or None, got {value!r}.",
            )
            # i > t is a month not trained yet: the card leaves it blank whatever was measured.
            cells.append(float(value) if value is not None and i <= t else None)
        matrix.append(cells)
    return matrix


def _check_general(general: Any, months: tuple[str, ...]) -> dict[str, dict[str, Optional[float]]]:
    _require(
        isinstance(general, Mapping), f"`general` must be a dict keyed by 'month-0' and month names, got {general!r}."
    )
    if not general:
        return {}
    _require(
        _BASELINE in general,
        f"`general` has no {_BASELINE!r} entry (it has {sorted(general)}): the general-ability table compares every "
        "month against the base model before any training; evaluate it once and store it under 'month-0'.",
    )
    unknown = [key for key in general if key != _BASELINE and key not in months]
    _require(not unknown, f"`general` has entries for unknown months {unknown}; known: {[_BASELINE, *months]}.")
    checked = {}
    for key, metrics in general.items():
        _require(isinstance(metrics, Mapping), f"`general[{key!r}]` must be a dict metric -> value, got {metrics!r}.")
        for name, value in metrics.items():
            _require(
                value is None or _is_number(value),
                f"`general[{key!r}][{name!r}]` must be a finite number or None, got {value!r}.",
            )
        checked[key] = {str(name): (None if value is None else float(value)) for name, value in metrics.items()}
    return checked


def _check_summary(summary: Any, key: str) -> Optional[dict[str, Any]]:
    if summary is None:
        return None
    _require(
        isinstance(summary, Mapping)
        and _is_number(summary.get("mean"))
        and isinstance(summary.get("ci95"), Sequence)
        and len(summary["ci95"]) == 2
        and all(_is_number(v) for v in summary["ci95"]),
        f'`{key}` must be {{"mean": x, "ci95": [lo, hi]}} with finite numbers, got {summary!r}.',
    )
    return dict(summary)


def _check_intervals(ci95: Any, months: tuple[str, ...]) -> Optional[list[list[Optional[list[float]]]]]:
    if ci95 is None:
        return None
    _require(
        isinstance(ci95, Sequence) and len(ci95) == len(months),
        f"`retention['ci95']` must have one row per month ({len(months)}), got {ci95!r}.",
    )
    rows = []
    for t, row in enumerate(ci95):
        _require(isinstance(row, Sequence), f"`retention['ci95'][{t}]` must be a list, got {row!r}.")
        cells = []
        for i in range(len(months)):
            value = row[i] if i < len(row) else None
            _require(
                value is None
                or (isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value)),
                f"`retention['ci95'][{t}][{i}]` must be [lo, hi] or None, got {value!r}.",
            )
            cells.append([float(v) for v in value] if value is not None and i <= t else None)
        rows.append(cells)
    return rows


def _check_table(table: Any, key: str) -> dict[str, Any]:
    if table is None:
        return {}
    _require(isinstance(table, Mapping), f"`{key}` must be a dict, got {type(table).__name__}.")
    return dict(table)


def _check_limitations(limitations: Any) -> tuple[str, ...]:
    if limitations is None:
        return ()
    _require(
        isinstance(limitations, Sequence) and not isinstance(limitations, str),
        f"`limitations` must be a list of strings, got {limitations!r}.",
    )
    _require(
        all(isinstance(item, str) for item in limitations), f"`limitations` must hold strings, got {limitations!r}."
    )
    return tuple(item.strip() for item in limitations if item.strip())


# ---------------------------------------------------------------------------------------------------------------------
# Formatting (the template lays out rows of ready-made cells)
# ---------------------------------------------------------------------------------------------------------------------


def _cell(text: str, limit: Optional[int] = _MAX_CELL_CHARS) -> str:
    """Make `text` safe inside a markdown table cell (cut at `limit` characters, unless None)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _config_value(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > _MAX_LIST_ITEMS:
        # The count first: the cell may be cut at _MAX_CELL_CHARS.
        shown = json.dumps(list(value[:_MAX_LIST_ITEMS]), default=str)[:-1]
        return _cell(f"{len(value)} items: {shown}, …]")
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return _cell(text)


def _config_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (_cell(key), target_modules_text(value) if key in _TARGET_KEYS and value else _config_value(value))
        for key, value in sorted(config.items())
    ]


def _layer_ranges(layers: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` -> `"0-2, 5"`."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def target_modules_text(targets: Union[str, Sequence[str]]) -> str:
    """What the adapter wraps, in a table cell: resolved module names grouped by their path inside the block with
    the layers they are in (`"60 modules: mlp.gate_proj, mlp.up_proj in layers 0-29"`); names outside numbered
    blocks are PEFT suffixes or full names, listed as they are; a string is PEFT's regex."""
    if isinstance(targets, str):
        return _cell(f"regex {targets}")
    names = sorted(set(targets))
    layers: dict[str, set[int]] = {}
    loose = []
    for name in names:
        located = split_block_path(name)
        if located is None:
            loose.append(name)
        else:
            layers.setdefault(located[1], set()).add(located[0])
    groups: dict[tuple[int, ...], list[str]] = {}
    for inner, indices in sorted(layers.items()):
        groups.setdefault(tuple(sorted(indices)), []).append(inner)
    parts = [f"{', '.join(inners)} in layers {_layer_ranges(indices)}" for indices, inners in groups.items()]
    if loose:
        parts.append("matched by name: " + ", ".join(loose))
    counted = sum(len(indices) for indices in layers.values())
    count = f"{counted} module{'s' if counted != 1 else ''}: " if counted else ""
    return _cell(count + "; ".join(parts), limit=None)


def _accuracy(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _metric(value: float) -> str:
    return f"{value:.4g}"


def _interval(summary: Optional[Mapping[str, Any]], signed: bool = False) -> str:
    """`0.812 [0.700, 0.900]` from a `{"mean", "ci95"}` summary ("–" when None)."""
    if not summary:
        return "–"
    sign = "+" if signed else ""
    lo, hi = summary["ci95"]
    return f"{summary['mean']:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def _retention_rows(ctx: ModelCardContext) -> list[tuple[str, list[str]]]:
    cells = retention_cells(ctx.R, ctx.ci95, missing=_accuracy(None), unreached="")
    return list(zip(ctx.months, cells))


def _summary(ctx: ModelCardContext) -> tuple[str, str]:
    """(average score, BWT) after the card's month, as text (with the 95% intervals when given: the average over the
    items of every month, BWT's paired over the same items)."""
    avg = average_accuracy(ctx.R)
    avg_text = "n/a (no cell measured)" if math.isnan(avg) else f"{avg:.3f}"
    if ctx.average is not None:
        avg_text = _interval(ctx.average) + " (over the items of every month)"
    if len(ctx.months) == 1:
        return avg_text, "n/a (a single month: nothing earlier to forget)"
    bwt = backward_transfer(ctx.R)
    if ctx.bwt_interval is not None:
        return avg_text, _interval(ctx.bwt_interval, signed=True) + " (paired interval, same items)"
    return avg_text, "n/a (cells not measured)" if math.isnan(bwt) else f"{bwt:+.3f}"


def _learning_rows(ctx: ModelCardContext) -> list[list[str]]:
    rows = []
    for month in ctx.months:
        entry = ctx.learning.get(month)
        if not entry:
            continue
        learned = {True: "**yes**", False: "no"}.get(entry.get("learned"), "–")
        scored_by = ctx.scored_by.get(month) or entry.get("scored_by") or "–"
        rows.append(
            [
                _cell(month),
                _cell(scored_by),
                _interval(entry.get("before")),
                _interval(entry.get("after")),
                _interval(entry.get("gain"), signed=True),
                learned,
            ]
        )
    return rows


def _dial_rows(ctx: ModelCardContext) -> tuple[list[list[str]], list[list[str]], dict[str, str]]:
    """The retention dial: `(per-month rows [month, scale, per-block factors, rule], the card's month's curve rows
    [scale, score, gain, forgetting] with the chosen scale in bold, notes for the sentence above the curve)`."""
    rows = []
    for month in ctx.months:
        record = ctx.retention_dial.get(month)
        if record:
            per_block = ", ".join(
                f"{blocks}: ×{factor:g}" for blocks, factor in (record.get("layer_scales") or {}).items()
            )
            rows.append(
                [
                    _cell(month),
                    f"{float(record['scale']):g}",
                    _cell(per_block or "–"),
                    _cell(record.get("rule") or "–"),
                ]
            )
    record = ctx.retention_dial.get(ctx.month) or {}
    curve = []
    for point in record.get("curve") or []:
        chosen = float(point["scale"]) == float(record["scale"])
        scale = f"**{float(point['scale']):g}**" if chosen else f"{float(point['scale']):g}"
        curve.append(
            [
                scale,
                f"{point['score']:.3f}" if _is_number(point.get("score")) else "–",
                f"{point['learning_gain']:+.3f}",
                f"{point['forgetting']:.4g}",
            ]
        )
    before = record.get("before")
    notes = {
        "validation_rows": str(record.get("validation_rows", "–")),
        "scored_by": str(record.get("scored_by") or "–"),
        "before": f"{before:.3f}" if _is_number(before) else "–",
    }
    return rows, curve, notes


def _bleed_rows(ctx: ModelCardContext) -> tuple[list[str], list[list[str]]]:
    if not ctx.bleed:
        return [], []
    columns = [f"after {m}" for m in ctx.months]
    rows = []
    for month in ctx.months:
        entry = ctx.bleed.get(month)
        if not entry:
            continue
        tested = entry.get("styles") or f"none ({entry.get('note') or 'no style test'})"
        after = entry.get("after") or {}
        cells = [_interval(after.get(m)) if m in after else "" for m in ctx.months]
        rows.append([_cell(month), _cell(tested), *cells, _interval(entry.get("base"))])
    return columns, rows


def _knowledge_rows(ctx: ModelCardContext) -> tuple[list[str], list[tuple[str, list[str]]], str]:
    knowledge = ctx.knowledge
    if not knowledge or not knowledge.get("mc"):
        return [], [], ""
    columns = [c for c in [_BASELINE, *ctx.months] if c in knowledge["mc"]]
    rows = [(f"multiple choice (n={knowledge.get('n_mc')})", [_interval(knowledge["mc"].get(c)) for c in columns])]
    if knowledge.get("exact"):
        exact = knowledge["exact"]
        rows.append((f"exact match (n={knowledge.get('n_exact')})", [_interval(exact.get(c)) for c in columns]))
    pool = knowledge.get("pool")
    note = f"{knowledge.get('n_mc')} of {pool} pool items" if pool else f"{knowledge.get('n_mc')} items"
    return columns, rows, note


def _ranking_rows(ctx: ModelCardContext) -> list[list[str]]:
    rows = []
    for month in ctx.months:
        entry = ctx.ranking.get(month)
        if not entry:
            continue
        margin, implicit = entry.get("ranking_margin"), entry.get("implicit_reward_accuracy")
        rows.append(
            [
                _cell(month),
                _interval(entry.get("ranking_accuracy")),
                "–" if not _is_number(margin) else f"{margin:+.4f}",
                "–" if not _is_number(implicit) else f"{implicit:.3f}",
            ]
        )
    return rows


def _general_table(ctx: ModelCardContext) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Header (metric + one column per month-0 / month) and rows of `value (change vs month 0)` cells."""
    if not ctx.general:
        return [], []
    columns = [_BASELINE, *ctx.months]
    metrics: list[str] = list(ctx.general[_BASELINE])
    for key in columns[1:]:
        metrics += [name for name in ctx.general.get(key, {}) if name not in metrics]
    rows = []
    for name in metrics:
        base = ctx.general[_BASELINE].get(name)
        cells = ["–" if base is None else _metric(base)]
        for m in ctx.months:
            value = ctx.general.get(m, {}).get(name)
            if value is None:
                cells.append("–")
            elif base is None:
                cells.append(_metric(value))
            else:
                cells.append(f"{_metric(value)} ({value - base:+.4g})")
        rows.append((_cell(name), cells))
    return columns, rows


def _data_table(ctx: ModelCardContext) -> tuple[list[str], list[tuple[str, list[str]]]]:
    extra = sorted({key for entry in ctx.data.values() for key in entry if key not in _DATA_COLUMNS})
    columns = [*_DATA_COLUMNS, *extra]
    rows = [
        (m, [("–" if ctx.data[m].get(c) is None else _config_value(ctx.data[m][c])) for c in columns])
        for m in ctx.months
    ]
    return columns, rows


def _hub_link(repo_id: str) -> str:
    return f"[`{repo_id}`](https://huggingface.co/{repo_id})"


def _base_rows(ctx: ModelCardContext) -> list[tuple[str, str]]:
    """(label, markdown) lines naming the base as trained: its source, the precision as loaded, the adapted modules."""
    base = ctx.base
    kind = base.get("kind")
    if kind == "embedded":
        package = f" of the `{base['source_package']}` package" if base.get("source_package") else ""
        rows = [
            (
                "Base model as trained",
                f"the bundled GGUF file `{base.get('gguf_file') or 'not recorded'}`{package}, dequantized to float32 by "
                "transformers and saved as a transformers folder (`peft_selective.demo.embedded`)",
            )
        ]
        if base.get("path"):
            rows.append(("GGUF file loaded", f"`{base['path']}`"))
        if base.get("converted_from"):
            rows.append(
                (
                    "Converted from",
                    f"{_hub_link(base['converted_from'])}: the GGUF is its Q4_1 quantization, so the weights trained "
                    "on are the dequantized Q4_1 ones, not the Hub checkpoint's",
                )
            )
    elif kind == "local":
        rows = [("Base model as trained", f"the local folder `{base.get('path') or ctx.base_model}`")]
    else:
        repo = base.get("path") or ctx.base_model
        rows = [("Base model as trained", _hub_link(repo) if kind == "hub" else f"`{repo}`")]
        if kind == "hub":
            rows.append(("Revision", f"`{base['revision']}`" if base.get("revision") else "not recorded"))
    precision = base.get("precision") or (
        f"not recorded (configured quantization: {ctx.quantization or 'none, full precision'})"
    )
    rows.append(("Precision during training and evaluation", precision))
    targets = [target_modules_text(ctx.method_config[key]) for key in _TARGET_KEYS if ctx.method_config.get(key)]
    if targets:
        rows.append(("Adapted modules", "; ".join(targets)))
    return rows


def _fingerprint_rows(ctx: ModelCardContext) -> list[tuple[str, str]]:
    fingerprint = ctx.base.get("fingerprint") or {}
    return [(_cell(key), _cell(json.dumps(value, default=str).strip('"'))) for key, value in fingerprint.items()]


def card_metadata(ctx: ModelCardContext) -> ModelCardData:
    """The card's YAML metadata. `base_model` names a Hub model only: the one the bundled GGUF converts (the card
    says so), the Hub id loaded, or none for a local folder (not a Hub id)."""
    kind = ctx.base.get("kind")
    if kind == "embedded":
        base_model = ctx.base.get("converted_from")
    elif kind == "local":
        base_model = None
    else:
        base_model = ctx.base.get("path") or ctx.base_model
    return ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=ctx.license,
        pipeline_tag="text-generation",
        tags=_tags(ctx.method),
    )


def _base_loading_lines(ctx: ModelCardContext) -> list[str]:
    """The lines that load the base as trained: the bundled GGUF through `load_embedded_model`, else transformers."""
    if ctx.base.get("kind") == "embedded":
        quantization = f'quantization="{ctx.quantization}"' if ctx.quantization else ""
        return [
            "from peft_selective.demo.embedded import load_embedded_model  # pip install peft-selective[demo]",
            "from peft import PeftModel",
            "",
            f"base, tokenizer = load_embedded_model({quantization})  # the bundled GGUF, dequantized: the base trained on",
        ]
    imports = "from transformers import AutoModelForCausalLM"
    kwargs = f', revision="{ctx.base["revision"]}"' if ctx.base.get("revision") else ""
    if ctx.quantization in _QUANTIZATION_CODE:
        imports += ", BitsAndBytesConfig"
        kwargs += ", " + _QUANTIZATION_CODE[ctx.quantization]
    lines = [
        "import peft_selective  # registers the peft-selective methods with PEFT (pip install peft-selective)",
        "from peft import PeftModel",
        imports,
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{ctx.base.get("path") or ctx.base_model}"{kwargs})',
    ]
    if ctx.quantization and ctx.quantization not in _QUANTIZATION_CODE:
        lines.append(
            f"# the base was trained quantized ({ctx.quantization}): load it the same way to match the numbers"
        )
    return lines


def _loading_code(ctx: ModelCardContext) -> str:
    """PEFT code that loads the base as trained and stacks every month's adapter up to the card's month."""
    lines = _base_loading_lines(ctx)

    def source(m: str) -> str:
        if ctx.hub_repo:
            return f'"{ctx.hub_repo}", subfolder="{layout.hub_path(m)}"'
        return f'"{layout.relative_path(layout.ADAPTERS_DIR, m)}"'

    if not ctx.hub_repo:
        lines.append("# paths relative to the campaign directory")
    first, *rest = ctx.months
    lines.append(f'model = PeftModel.from_pretrained(base, {source(first)}, adapter_name="{first}")')
    for m in rest:
        lines.append(f'model.load_adapter({source(m)}, adapter_name="{m}")')
    names = ", ".join(f'"{m}"' for m in ctx.months)
    lines.append(f"model.base_model.set_adapter([{names}])  # every month active: the model evaluated in this card")
    return "\n".join(lines)


def _limitations(ctx: ModelCardContext) -> list[str]:
    measured = "the general metrics listed" if ctx.general else "no general-ability metric"
    items = [
        "Behavioural (generation-based) numbers: the retention matrix, what each month learned, bleed and the "
        "knowledge exact match come from greedy answers, scored by the months' declared checks or by agreement with "
        "the chosen answers (a lexical similarity, not a judgement of quality). Not generation-based: the ranking "
        "accuracy and the implicit-reward accuracy of the held-out pairs, the multiple-choice knowledge accuracy "
        "(log-likelihood of the options), the KL to the base and the perplexity; the implicit-reward accuracy "
        "only shows that training moved the log-probabilities, not what the model answers.",
        f"Retention is measured only on each month's held-out prompts and on {measured}; behaviour outside them "
        "was not evaluated.",
    ]
    test_rows = [ctx.data[m].get("test_rows") for m in ctx.months]
    sizes = [n for n in test_rows if _is_number(n) and n > 0]
    if sizes:
        smallest = int(min(sizes))
        items.append(
            f"The held-out sets are small (smallest: {smallest} pairs, so one pair moves a score by "
            f"{1 / smallest:.3f}); read the 95% intervals, and the numbers come from a single run (the intervals "
            "cover the choice of items, not of the training seed)."
        )
    if len(ctx.months) > 1:
        items.append(
            f"Months are stacked: the {ctx.month} adapter alone does not contain the earlier months' updates; load "
            "all of them as shown above to get the evaluated model."
        )
    if ctx.base.get("kind") == "embedded":
        items.append(
            f"The base trained on is the bundled Q4_1 GGUF, dequantized, not the {ctx.base.get('converted_from') or 'Hub'}"
            " checkpoint itself: on the Hub checkpoint the outputs, and so the numbers, differ."
        )
    if ctx.quantization:
        items.append(
            f"The base model was {ctx.quantization} quantized during training and evaluation; on a full-precision "
            "base the outputs, and so the numbers, differ slightly."
        )
    items.append(
        "The adapter inherits the base model's limitations and biases. DPO moves it towards the preferences of the "
        "training data; this card does not assess that data's quality or bias."
    )
    return items + list(ctx.limitations)


def _tags(method: str) -> list[str]:
    tags = ["peft-selective", "continual-dpo", "dpo", method, "trl"]
    return list(dict.fromkeys(tags))  # a method named like a fixed tag would appear twice


# ---------------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------------


#: One plotted point: `(x, value, [lo, hi] or None)`, x indexing the panel's `xlabels`.
Point = tuple[int, float, Optional[list[float]]]
_UNIT_RANGE = (-0.02, 1.02)
# Horizontal offset between the series of a panel, so that equal values and their intervals do not hide each other.
_DODGE = 0.06


@dataclass(frozen=True)
class PlotPanel:
    """One panel of the card's plot, as data: what [`plot_retention`] draws (tests read it instead of pixels).

    Attributes:
        key (`str`): `"learning"`, `"retention"`, `"knowledge_bleed"`, `"refusal"` or `"kl"`.
        title, xlabel, ylabel (`str`): the axes' texts.
        xlabels (`list[str]`): the x tick labels; a point's x is an index into them.
        series (`dict[str, list[Point]]`): label -> points `(x, value, [lo, hi] or None)`.
        ylim (`tuple[float, float]`, *optional*): fixed y limits; None autoscales.
        zero_line (`bool`): draw y = 0 (gains, KL).
        joined (`bool`): join the points of a series by a line (not for one value per month, as the gains).
    """

    key: str
    title: str
    xlabel: str
    ylabel: str
    xlabels: list[str]
    series: dict[str, list[Point]]
    ylim: Optional[tuple[float, float]] = None
    zero_line: bool = False
    joined: bool = True


def plot_panels(context: Union[Mapping[str, Any], ModelCardContext]) -> list[PlotPanel]:
    """The panels of the card's plot, each measure on its own axis: learning (each month's paired gain, when the
    model before it was measured), retention (each month's score before it, right after it and after every later
    month), knowledge and bleed, refusal rates, and the KL to the base, the panels without data left out but
    retention. Perplexity and the drift probe stay in the general-ability table: on a shared axis the larger scale
    flattens the rest."""
    ctx = context if isinstance(context, ModelCardContext) else ModelCardContext.from_dict(context)
    builders = (_learning_panel, _retention_panel, _knowledge_bleed_panel, _refusal_panel, _kl_panel)
    return [panel for build in builders if (panel := build(ctx)) is not None]


def _summary_point(x: int, summary: Optional[Mapping[str, Any]]) -> list[Point]:
    return [(x, float(summary["mean"]), summary.get("ci95"))] if summary else []


def _learning_panel(ctx: ModelCardContext) -> Optional[PlotPanel]:
    points = [p for k, m in enumerate(ctx.months) for p in _summary_point(k, (ctx.learning.get(m) or {}).get("gain"))]
    if not points:
        return None
    return PlotPanel(
        key="learning",
        title="Learning: what each month gained",
        xlabel="training month",
        ylabel="gain in behavioural score (paired, 95% CI)",
        xlabels=list(ctx.months),
        series={"after the month - before it (same prompts)": points},
        zero_line=True,
        joined=False,
    )


def _retention_panel(ctx: ModelCardContext) -> PlotPanel:
    """Month i's line: before it (x = i, the model after the previous month), then after each month t >= i (x = t+1):
    the rise at its month is what it learned, the slope after it what later months kept."""
    series: dict[str, list[Point]] = {}
    for i, month in enumerate(ctx.months):
        points = _summary_point(i, (ctx.learning.get(month) or {}).get("before"))
        for t in range(i, len(ctx.months)):
            if ctx.R[t][i] is not None:
                points.append((t + 1, ctx.R[t][i], ctx.ci95[t][i] if ctx.ci95 is not None else None))
        if points:
            series[f"{month} prompts"] = points
    values = [v for points in series.values() for _, v, _ in points]
    return PlotPanel(
        key="retention",
        title="Learning and forgetting, by behaviour",
        xlabel="after training month",
        ylabel="behavioural score (held-out prompts)",
        xlabels=[_PLOT_BASELINE, *ctx.months],
        series=series,
        ylim=_UNIT_RANGE if values and 0.0 <= min(values) and max(values) <= 1.0 else None,
    )


def _column_series(ctx: ModelCardContext, values: Mapping[str, Any]) -> list[Point]:
    """Points over month 0 and the months from `{column: {"mean", "ci95"}}`."""
    return [p for k, column in enumerate([_BASELINE, *ctx.months]) for p in _summary_point(k, values.get(column))]


def _knowledge_bleed_panel(ctx: ModelCardContext) -> Optional[PlotPanel]:
    series: dict[str, list[Point]] = {}
    for key, label in (("mc", "knowledge (multiple choice)"), ("exact", "knowledge (exact match)")):
        series[label] = _column_series(ctx, (ctx.knowledge or {}).get(key) or {})
    for month, entry in (ctx.bleed or {}).items():
        series[f"bleed of {month}"] = _column_series(ctx, entry.get("after") or {})
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    return PlotPanel(
        key="knowledge_bleed",
        title="Knowledge and bleed",
        xlabel="after training month",
        ylabel="rate (95% CI)",
        xlabels=[_PLOT_BASELINE, *ctx.months],
        series=series,
        ylim=_UNIT_RANGE,
    )


def _general_series(ctx: ModelCardContext, metric: str) -> list[Point]:
    columns = [_BASELINE, *ctx.months]
    values = [(k, ctx.general.get(column, {}).get(metric)) for k, column in enumerate(columns)]
    return [(k, value, None) for k, value in values if value is not None]


def _refusal_panel(ctx: ModelCardContext) -> Optional[PlotPanel]:
    labels = {"refusal_rate": "refusal (harmful prompts)", "over_refusal_rate": "over-refusal (benign prompts)"}
    series = {label: points for metric, label in labels.items() if (points := _general_series(ctx, metric))}
    if not series:
        return None
    return PlotPanel(
        key="refusal",
        title="Refusal",
        xlabel="after training month",
        ylabel="share of prompts refused",
        xlabels=[_PLOT_BASELINE, *ctx.months],
        series=series,
        ylim=_UNIT_RANGE,
    )


def _kl_panel(ctx: ModelCardContext) -> Optional[PlotPanel]:
    points = _general_series(ctx, "kl_to_base")
    if not points:
        return None
    return PlotPanel(
        key="kl",
        title="KL to the base model",
        xlabel="after training month",
        ylabel="KL (nats per token, generic prompts)",
        xlabels=[_PLOT_BASELINE, *ctx.months],
        series={"KL to the base": points},
        zero_line=True,
    )


def plot_retention(context: Union[Mapping[str, Any], ModelCardContext], path: Union[str, Path]) -> Path:
    """Draw the panels of [`plot_panels`] (learning, learning and forgetting, knowledge and bleed, refusal, KL to the
    base) into one PNG at `path`, three panels a row.

    Returns:
        `Path`: the PNG written.
    """
    ctx = context if isinstance(context, ModelCardContext) else ModelCardContext.from_dict(context)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "The retention plot of the model card needs matplotlib: `pip install matplotlib` (it is in the `dev` "
            "extra of peft-selective)."
        ) from error

    panels = plot_panels(ctx)
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    # Figure + Agg canvas instead of pyplot: no global backend switch, no figure left open in the caller's process.
    figure = Figure(figsize=(5.5 * columns, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    atomic_write(path, png.getvalue())  # replaces a link planted at `path` instead of writing through it
    return path


def _draw_panel(ax: Any, panel: PlotPanel) -> None:
    for j, (label, points) in enumerate(panel.series.items()):
        shift = (j - (len(panel.series) - 1) / 2) * _DODGE
        xs = [x + shift for x, _, _ in points]
        _plot_with_intervals(ax, xs, [v for _, v, _ in points], [c for _, _, c in points], label, panel.joined)
    if panel.zero_line:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ticks = list(range(len(panel.xlabels)))
    ax.set_xticks(ticks, labels=panel.xlabels, rotation=30 if len(ticks) > 6 else 0)
    ax.set_xlim(-0.5, len(ticks) - 0.5)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.grid(alpha=0.3)
    if panel.series:
        _legend_below(ax)


def _plot_with_intervals(ax: Any, xs: list, ys: list, intervals: list, label: str, joined: bool = True) -> None:
    style = {"marker": "o", "linestyle": "-" if joined else "none", "label": label}
    if any(c is not None for c in intervals):
        low = [y - c[0] if c is not None else 0.0 for y, c in zip(ys, intervals)]
        high = [c[1] - y if c is not None else 0.0 for y, c in zip(ys, intervals)]
        ax.errorbar(xs, ys, yerr=[low, high], capsize=3, **style)
    else:
        ax.plot(xs, ys, **style)


def _legend_below(ax: Any) -> None:
    # Below the axes: inside, it hides the points it labels (accuracies sit high, several lines end at the last month).
    count = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(count, 3), frameon=False)


# ---------------------------------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------------------------------


def render_model_card(
    context: Union[Mapping[str, Any], ModelCardContext],
    output_dir: Union[str, Path],
    template_path: Optional[Union[str, Path]] = None,
) -> Path:
    """Write the month's model card (`output_dir/README.md`) and its plot (`output_dir/retention.png`).

    Args:
        context: the campaign's context dict (schema in the module docstring) or a [`ModelCardContext`].
        output_dir: folder to write to (created if needed); existing `README.md` / `retention.png` are replaced.
        template_path (*optional*): a jinja markdown template; defaults to [`DEFAULT_TEMPLATE_PATH`]. It receives
            `card_data` (the YAML metadata) and the variables built here (see the default template).

    Returns:
        `Path`: the README written.
    """
    ctx = context if isinstance(context, ModelCardContext) else ModelCardContext.from_dict(context)
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} not found. The default one lives in the repository's `model_cards/` "
            "folder (present in a source checkout); pass `template_path=` to use another."
        )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_retention(ctx, output_dir / PLOT_FILENAME)

    card_data = card_metadata(ctx)
    average, bwt = _summary(ctx)
    general_columns, general_rows = _general_table(ctx)
    data_columns, data_rows = _data_table(ctx)
    bleed_columns, bleed_rows = _bleed_rows(ctx)
    knowledge_columns, knowledge_rows, knowledge_note = _knowledge_rows(ctx)
    dial_rows, dial_curve_rows, dial_notes = _dial_rows(ctx)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        month=ctx.month,
        months=list(ctx.months),
        base_model=ctx.base_model,
        base_rows=_base_rows(ctx),
        fingerprint_rows=_fingerprint_rows(ctx),
        method=ctx.method,
        hub_repo=ctx.hub_repo,
        method_config_rows=_config_rows(ctx.method_config),
        training_rows=_config_rows(ctx.training),
        data_columns=data_columns,
        data_rows=data_rows,
        retention_rows=_retention_rows(ctx),
        has_intervals=ctx.ci95 is not None,
        scored_by_text=", ".join(f"{m} by {v}" for m, v in ctx.scored_by.items() if v) or "not recorded",
        average_accuracy=average,
        bwt=bwt,
        learning_rows=_learning_rows(ctx),
        dial_rows=dial_rows,
        dial_curve_rows=dial_curve_rows,
        dial_notes=dial_notes,
        bleed_columns=bleed_columns,
        bleed_rows=bleed_rows,
        knowledge_columns=knowledge_columns,
        knowledge_rows=knowledge_rows,
        knowledge_note=knowledge_note,
        ranking_rows=_ranking_rows(ctx),
        general_columns=general_columns,
        general_rows=general_rows,
        plot_filename=PLOT_FILENAME,
        plot_titles=[panel.title for panel in plot_panels(ctx)],
        hub_months_dir=layout.HUB_MONTHS_DIR,
        loading_code=_loading_code(ctx),
        limitations=_limitations(ctx),
    )
    readme = output_dir / layout.CARD_FILE
    atomic_write(readme, str(card).encode("utf-8"))  # what `card.save` writes, never through a planted link
    return readme
