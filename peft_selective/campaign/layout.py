"""Every path of a campaign directory and of its Hub repository, and the month-name rule, named once.

Campaign directory (`CampaignLayout(root)`):

```
campaign/
  campaign.json            format version, the config, the base model's fingerprint, the knowledge pool and every
                           month (status, data summary, checks or fitted style signature, adapter checksum, training
                           metrics)
  evaluations.json         evaluation results: "month-0" (the base) and one entry per month
  data/<month>/            train.jsonl, test.jsonl, validation.jsonl (retention_scale "auto"), reference_logps.json,
                           before_behaviour.json, calibration.jsonl (geometry_projected)
  adapters/<month>/        adapter_config.json, adapter_model.safetensors; geometry_report.json (geometry_projected)
  buffer/                  the rehearsal buffer (`peft_selective.continual.rehearsal`)
  fisher/                  the summed Fisher, with EWC (`peft_selective.continual.ewc`)
  cards/<month>/           README.md (the model card) and retention.png (its plot)
  runs/<month>/            Trainer checkpoints while a month trains (removed when it is done)
  .lock                    while a command runs: its holder (pid, host, start, command), `peft_selective.utils.lock`;
                           buffer/ and fisher/ hold their own while they change
```

Hub repository (`hub_path`): every done month under `months/<month>/` (its adapter files, card and plot), the latest
done month's files again at the root.

Month names (`check_month_name`, the rule of `peft_selective.utils.names`, shared with the rehearsal buffer) become
folder names here and in the Hub repository: a letter or digit, then up to 63 letters, digits, `.`, `_` or `-`
(`MONTH_NAME_MAX_LENGTH` characters in all), and none of `RESERVED_MONTH_NAMES`. Every name read back from the state
files is checked by the same rule, so a hand-edited file cannot point outside the directory.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Optional, Union

from ..tuners.geometry.calibration import REPORT_FILENAME as GEOMETRY_REPORT_FILENAME
from ..utils.names import MONTH_NAME_MAX_LENGTH, MONTH_NAME_PATTERN, is_month_name  # noqa: F401
from ..utils.names import check_month_name as check_name_rule


#: Names a month cannot take: `month-0` is the base's entry of evaluations.json, `ref` TRL's reference adapter.
BASELINE = "month-0"
RESERVED_MONTH_NAMES = (BASELINE, "ref")


def check_month_name(name: object, where: str = "") -> str:
    """`name` if it follows the month-name rule and is not reserved (`RESERVED_MONTH_NAMES`), else `ValueError`."""
    check_name_rule(name, where)
    if name in RESERVED_MONTH_NAMES:
        raise ValueError(
            f"The month name {name!r} is reserved{where} (reserved: {list(RESERVED_MONTH_NAMES)}): pick another."
        )
    return name


# ------------------------------------------------------------------------------------------------- file names
CAMPAIGN_FILE = "campaign.json"
EVALUATIONS_FILE = "evaluations.json"

#: Folders with one subfolder per month (`runs` first: see `Campaign._undo_month`).
RUNS_DIR, DATA_DIR, ADAPTERS_DIR, CARDS_DIR = "runs", "data", "adapters", "cards"
MONTH_FOLDERS = (RUNS_DIR, DATA_DIR, ADAPTERS_DIR, CARDS_DIR)
#: Folders shared by every month.
BUFFER_DIR, FISHER_DIR = "buffer", "fisher"
SHARED_FOLDERS = (BUFFER_DIR, FISHER_DIR)

#: `data/<month>/`: the splits (`<split>.jsonl`) and what is measured before the month trains.
SPLIT_SUFFIX = ".jsonl"
REFERENCE_LOGPS_FILE = "reference_logps.json"
BEFORE_BEHAVIOUR_FILE = "before_behaviour.json"
CALIBRATION_FILE = "calibration.jsonl"

#: `adapters/<month>/`: PEFT's files, uploaded to the Hub; the geometry_projected calibration report.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
#: PEFT's pickled weight file names (`safe_serialization=False`); their presence makes the push refuse the month.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
GEOMETRY_REPORT_FILE = GEOMETRY_REPORT_FILENAME  # written by `GeometryReport.save`

#: `cards/<month>/`: the model card and its plot, uploaded to the Hub.
CARD_FILE = "README.md"
PLOT_FILE = "retention.png"
CARD_FILES = (CARD_FILE, PLOT_FILE)

#: The Hub repository's folder with one subfolder per month.
HUB_MONTHS_DIR = "months"


def hub_path(month: Optional[str] = None, filename: Optional[str] = None) -> str:
    """A path in the Hub repository: `months/<month>[/<filename>]`, or `filename` at the root when `month` is None."""
    parts = [HUB_MONTHS_DIR, month] if month is not None else []
    return str(PurePosixPath(*parts, *([filename] if filename else [])))


def hub_month(path_in_repo: str) -> Optional[str]:
    """The month of a path in the Hub repository (`months/<month>/...`), or None for a root file."""
    parts = PurePosixPath(path_in_repo).parts
    return parts[1] if len(parts) > 2 and parts[0] == HUB_MONTHS_DIR else None


def relative_path(folder: str, month: str, filename: Optional[str] = None) -> str:
    """A path relative to the campaign directory, as written in records and cards: `adapters/<month>[/<file>]`."""
    return str(PurePosixPath(folder, month, *([filename] if filename else [])))


class CampaignLayout:
    """The paths of the campaign directory `root` (see the module docstring)."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)

    @property
    def campaign_file(self) -> Path:
        return self.root / CAMPAIGN_FILE

    @property
    def evaluations_file(self) -> Path:
        return self.root / EVALUATIONS_FILE

    def folder(self, name: str) -> Path:
        """A top-level folder (`MONTH_FOLDERS`, `SHARED_FOLDERS`)."""
        return self.root / name

    @property
    def buffer(self) -> Path:
        return self.root / BUFFER_DIR

    @property
    def fisher(self) -> Path:
        return self.root / FISHER_DIR

    def runs(self, month: str) -> Path:
        return self.root / RUNS_DIR / month

    def data(self, month: str) -> Path:
        return self.root / DATA_DIR / month

    def adapter(self, month: str) -> Path:
        return self.root / ADAPTERS_DIR / month

    def card(self, month: str) -> Path:
        return self.root / CARDS_DIR / month

    def split(self, month: str, split: str) -> Path:
        """`data/<month>/<split>.jsonl` (`train`, `test`, `validation`)."""
        return self.data(month) / f"{split}{SPLIT_SUFFIX}"

    def reference_logps(self, month: str) -> Path:
        return self.data(month) / REFERENCE_LOGPS_FILE

    def before_behaviour(self, month: str) -> Path:
        return self.data(month) / BEFORE_BEHAVIOUR_FILE

    def calibration(self, month: str) -> Path:
        return self.data(month) / CALIBRATION_FILE

    def adapter_weights(self, month: str) -> Path:
        return self.adapter(month) / ADAPTER_WEIGHTS_FILE

    def card_file(self, month: str) -> Path:
        return self.card(month) / CARD_FILE
