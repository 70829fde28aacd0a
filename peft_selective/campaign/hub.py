"""Publish a continual-DPO campaign to one Hugging Face Hub model repo, in a single commit.

```python
from peft_selective.campaign.hub import plan_push, push_campaign

push_campaign("campaign/", "org/smollm2-continual-dpo", dry_run=True)  # prints the plan, touches nothing
push_campaign("campaign/", "org/smollm2-continual-dpo")  # create_repo(exist_ok=True) + one create_commit
```

Campaign directory (what is read; every path is named in `peft_selective.campaign.layout`):

- `campaign.json`: `{"months": [{"name": "2025-06", "status": "done", ...}, ...]}`; only months with status `"done"`
  are pushed, in that order;
- `adapters/<month>/`: the month's PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`);
- `cards/<month>/`: the month's model card (`README.md`, `retention.png`, written by `continual-dpo report`).

Repo layout (what is written):

- `months/<month>/`: every done month's adapter files, card and plot;
- the root: the latest done month's adapter files, card and plot, so `PeftModel.from_pretrained(base, repo_id)` loads
  the latest month and `subfolder="months/<month>"` any month.

Only the files above are uploaded (an allowlist): other files in the folders (PEFT's own adapter README, trainer state,
`training_args.bin`, ...) stay local. Weights go up as safetensors only: an adapter folder holding a pickled
`adapter_model.bin` is refused, since loading a pickle from the Hub can run arbitrary code. Every uploaded file must be
a regular file inside the campaign directory (no symbolic link on its way: a planted link would upload a file from
elsewhere) whose SHA-256 matches the one the month recorded (`"files"` of its entry; a campaign.json of format 2 only
recorded the adapter weights', `"adapter_sha256"`, which is then the one checked).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..utils.io import sha256_file
from .layout import (
    ADAPTER_FILES,
    CAMPAIGN_FILE,
    CARD_FILES,
    CARDS_DIR,
    PICKLED_WEIGHTS,
    CampaignLayout,
    check_month_name,
    hub_month,
    hub_path,
)


__all__ = ["CampaignPushError", "done_months", "plan_push", "push_campaign"]

logger = logging.getLogger(__name__)

CAMPAIGN_FILENAME = CAMPAIGN_FILE
DONE = "done"


class CampaignPushError(ValueError):
    """The campaign directory cannot be pushed as it is; the message says what is missing and how to fix it."""


def _read_campaign(campaign_dir: Path) -> list[dict]:
    path = CampaignLayout(campaign_dir).campaign_file
    if not path.is_file():
        raise CampaignPushError(
            f"No {CAMPAIGN_FILENAME} in {campaign_dir}: is this a campaign directory? Start one with "
            "`continual-dpo init`."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CampaignPushError(f"{path} is not valid JSON ({error}).") from error
    months = state.get("months") if isinstance(state, dict) else None
    if not isinstance(months, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in months):
        raise CampaignPushError(
            f'{path} must hold {{"months": [{{"name": "2025-06", "status": "done", ...}}, ...]}}; got {state!r:.200}.'
        )
    return months


def _done_entries(campaign_dir: Path) -> list[dict]:
    """The entries of the campaign's months with status `"done"`, in campaign order, their names checked."""
    entries = [m for m in _read_campaign(campaign_dir) if m.get("status") == DONE]
    names = [m["name"] for m in entries]
    for name in names:
        # Month names become folders of the repo: the campaign's month-name rule (one plain path segment each).
        try:
            check_month_name(name, f" in {CAMPAIGN_FILENAME}")
        except ValueError as error:
            raise CampaignPushError(
                f"{error} It cannot be a repo folder name: restore the file from a backup."
            ) from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CampaignPushError(f"{CAMPAIGN_FILENAME} lists the done month(s) {duplicates} more than once.")
    return entries


def done_months(campaign_dir: Union[str, Path]) -> list[str]:
    """Names of the campaign's months with status `"done"`, in campaign order."""
    return [m["name"] for m in _done_entries(Path(campaign_dir))]


def _checked(campaign_dir: Path, path: Path, entry: dict) -> Path:
    """`path` if it is a regular file reached without a symbolic link from `campaign_dir`, whose SHA-256 is the one
    the month recorded; else `CampaignPushError` naming the file."""
    relative = path.relative_to(campaign_dir)
    where = campaign_dir
    for part in relative.parts:
        where = where / part
        if where.is_symlink():
            raise CampaignPushError(
                f"{where} is a symbolic link (to {os.readlink(where)}): push uploads only regular files inside the "
                "campaign directory. Replace the link with the files themselves (or remove it), then push again."
            )
    if not stat.S_ISREG(path.lstat().st_mode):
        raise CampaignPushError(f"{path} is not a regular file: push uploads only regular files.")
    files = entry.get("files") or {}
    # A month done under campaign.json format 2 recorded only its adapter weights' checksum (`adapter_sha256`).
    legacy = CampaignLayout(Path()).adapter_weights(entry["name"]).as_posix() not in files
    recorded = files.get(relative.as_posix())
    if recorded is None and path.name == ADAPTER_FILES[1]:
        recorded = entry.get("adapter_sha256")
    if recorded is None and not legacy:
        raise CampaignPushError(
            f"{relative.as_posix()} has no recorded SHA-256 in {CAMPAIGN_FILENAME}: it was not written by the "
            "campaign. Write the cards with `continual-dpo report`, or rerun the month."
        )
    if recorded is not None and sha256_file(path) != recorded:
        raise CampaignPushError(
            f"{relative.as_posix()} changed since the campaign wrote it (SHA-256 mismatch): it is corrupted or was "
            "edited, and `eval` would refuse it too. Restore it from a backup (or, for a card, run `continual-dpo "
            "report`), then push again."
        )
    return path


def _adapter_files(campaign_dir: Path, entry: dict) -> list[Path]:
    month = entry["name"]
    folder = CampaignLayout(campaign_dir).adapter(month)
    if not folder.is_dir():
        raise CampaignPushError(
            f"Month {month!r} is done but its adapter folder {folder} is missing. Re-run `continual-dpo run-month` "
            f"for {month}, or restore the folder."
        )
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).exists()]
    if pickled:
        raise CampaignPushError(
            f"The {month} adapter in {folder} has pickled weights ({', '.join(pickled)}); only safetensors are pushed. "
            "Re-save the adapter with `model.save_pretrained(path)` (safe_serialization=True, the default) and delete "
            "the pickle file."
        )
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        hint = ""
        nested = sorted(p.parent.name for p in folder.glob(f"*/{ADAPTER_FILES[0]}"))
        if nested:
            # PEFT saves an adapter not named "default" into a subfolder named after it.
            hint = (
                f" The adapter was found one level down, in {[str(folder / n) for n in nested]}: PEFT's "
                "`save_pretrained` writes an adapter not named 'default' into a subfolder of that name. Move its "
                f"files up into {folder}."
            )
        raise CampaignPushError(f"The {month} adapter folder {folder} has no {', '.join(missing)}.{hint}")
    return [_checked(campaign_dir, folder / name, entry) for name in ADAPTER_FILES]


def _card_files(campaign_dir: Path, entry: dict) -> list[Path]:
    month = entry["name"]
    folder = CampaignLayout(campaign_dir).card(month)
    missing = [name for name in CARD_FILES if not (folder / name).is_file()]
    if missing:
        raise CampaignPushError(
            f"Month {month!r} has no model card: {', '.join(str(folder / n) for n in missing)} missing. Write the "
            f"cards with `continual-dpo report` (it renders {'/'.join(CARD_FILES)} into {CARDS_DIR}/<month>/), then push "
            "again."
        )
    return [_checked(campaign_dir, folder / name, entry) for name in CARD_FILES]


def plan_push(campaign_dir: Union[str, Path], repo_id: str) -> list[tuple[Path, str]]:
    """What a push uploads: `(local file, path in repo)` pairs, every done month under `months/<month>/` and then the
    latest done month again at the root. Reads nothing from the Hub.

    Raises:
        `CampaignPushError`: no done month, or a done month's adapter or card is missing, pickled, a symbolic link (or
            behind one), or not the file the campaign recorded (SHA-256).
        `ValueError`: `repo_id` is not a valid Hub repo id.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (expected 'name' or 'org/name'): {error}") from None
    campaign_dir = Path(campaign_dir)
    months = _done_entries(campaign_dir)
    if not months:
        raise CampaignPushError(
            f"No month of {campaign_dir / CAMPAIGN_FILENAME} has status 'done': nothing to push. Train one with "
            "`continual-dpo run-month` first."
        )
    plan: list[tuple[Path, str]] = []
    latest: list[Path] = []
    # Check every month before returning anything: a push is all or nothing.
    for entry in months:
        files = _adapter_files(campaign_dir, entry) + _card_files(campaign_dir, entry)
        plan += [(path, hub_path(entry["name"], path.name)) for path in files]
        latest = files
    plan += [(path, hub_path(None, path.name)) for path in latest]
    return plan


def push_campaign(
    campaign_dir: Union[str, Path],
    repo_id: str,
    dry_run: bool = False,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
) -> list[str]:
    """Upload the campaign's done months (see the module docstring for the layout) in one commit.

    Args:
        campaign_dir: the campaign directory.
        repo_id (`str`): the Hub model repo, `"org/name"`; created if it does not exist.
        dry_run (`bool`, defaults to `False`): print what would be uploaded and return; no Hub call, no token needed.
        token (`str`, *optional*): Hub token; default: the logged-in one (`hf auth login` / `HF_TOKEN`).
        private (`bool`, *optional*): visibility when the repo is created (an existing repo is left as it is).
        commit_message (`str`, *optional*): defaults to one naming the months pushed.

    Returns:
        `list[str]`: the paths in the repo that were (or, in a dry run, would be) uploaded.
    """
    plan = plan_push(campaign_dir, repo_id)
    paths = [path_in_repo for _, path_in_repo in plan]
    months = list(dict.fromkeys(month for month in map(hub_month, paths) if month is not None))
    if dry_run:
        # A dry run exists to be read: print, so it shows without logging configured.
        print(
            f"Dry run: would upload {len(plan)} files to {repo_id} (months {', '.join(months)}; root = {months[-1]}):"
        )
        for local, path_in_repo in plan:
            print(f"  {path_in_repo}  <-  {local} ({local.stat().st_size:,} bytes)")
        return paths

    message = commit_message or f"continual-dpo: months {', '.join(months)} (latest {months[-1]} at the root)"
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    operations = [
        CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local)) for local, path_in_repo in plan
    ]
    info = api.create_commit(repo_id, operations=operations, commit_message=message)
    logger.info(
        "Pushed %d files (months %s) to %s: %s",
        len(plan),
        ", ".join(months),
        repo_id,
        getattr(info, "commit_url", info),
    )
    return paths
