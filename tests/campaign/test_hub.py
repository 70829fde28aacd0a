"""Pushing a campaign to the Hub: the plan, the dry run and the single commit (every Hub call intercepted)."""

import json

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import save_file

from peft_selective.campaign.hub import CampaignPushError, plan_push, push_campaign


REPO = "org/smollm2-continual-dpo"
FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "retention.png")


def make_campaign(root, months=("2025-06", "2025-07"), statuses=None):
    """A campaign directory with tiny real adapters and cards; `statuses` defaults to every month done."""
    statuses = statuses or ["done"] * len(months)
    root.mkdir(parents=True, exist_ok=True)
    (root / "campaign.json").write_text(
        json.dumps({"months": [{"name": m, "status": s, "seed": 0} for m, s in zip(months, statuses)]})
    )
    for k, month in enumerate(months):
        adapter = root / "adapters" / month
        adapter.mkdir(parents=True)
        save_file(
            {"base_model.model.layers.0.mlp.gate_proj.selective_delta_B": torch.full((2, 2), float(k))},
            adapter / FILES[1],
        )
        (adapter / FILES[0]).write_text(json.dumps({"peft_type": "SELECTIVE_MLP", "month": month}))
        # what PEFT / the Trainer leave next to an adapter: never uploaded
        (adapter / "README.md").write_text("PEFT's generic adapter README")
        (adapter / "training_args.bin").write_bytes(b"\x80\x04pickle")
        card = root / "cards" / month
        card.mkdir(parents=True)
        (card / "README.md").write_text(f"---\nlibrary_name: peft\n---\n# card of {month}\n")
        (card / "retention.png").write_bytes(b"\x89PNG\r\n\x1a\n" + month.encode())
    return root


def expected_paths(months):
    """Every month's files under months/<month>/, then the latest month's at the root."""
    return [f"months/{m}/{name}" for m in months for name in FILES] + list(FILES)


@pytest.fixture
def hub_calls(monkeypatch):
    """Intercept HfApi.create_repo / create_commit and record their arguments."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        # read the contents now, as the upload would
        contents = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        calls.append(("create_commit", repo_id, dict(kwargs, operations=operations, contents=contents)))
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


@pytest.fixture
def no_hub(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the Hub must not be called")

    for name in ("create_repo", "create_commit", "upload_file", "upload_folder", "whoami"):
        monkeypatch.setattr(HfApi, name, forbidden)


def test_plan_lists_every_done_month_and_the_latest_at_the_root(tmp_path):
    root = make_campaign(
        tmp_path / "c", months=("2025-06", "2025-07", "2025-08"), statuses=["done", "done", "running"]
    )
    plan = plan_push(root, REPO)
    assert [p for _, p in plan] == expected_paths(["2025-06", "2025-07"])
    local = {p: path for path, p in plan}
    assert local["adapter_model.safetensors"] == root / "adapters" / "2025-07" / "adapter_model.safetensors"
    assert local["README.md"] == root / "cards" / "2025-07" / "README.md"  # the card, not PEFT's adapter README
    assert local["months/2025-06/retention.png"] == root / "cards" / "2025-06" / "retention.png"
    assert not any(p.endswith(".bin") for _, p in plan)


def test_dry_run_uploads_nothing_and_needs_no_token(tmp_path, no_hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    root = make_campaign(tmp_path / "c")
    paths = push_campaign(root, REPO, dry_run=True)
    assert paths == expected_paths(["2025-06", "2025-07"])
    out = capsys.readouterr().out
    assert f"would upload {len(paths)} files to {REPO}" in out
    assert "months/2025-06/adapter_model.safetensors" in out


def test_push_is_one_commit_with_the_right_files(tmp_path, hub_calls):
    root = make_campaign(tmp_path / "c")
    paths = push_campaign(root, REPO, private=True, token="hf_test")
    assert paths == expected_paths(["2025-06", "2025-07"])

    assert [c[0] for c in hub_calls] == ["create_repo", "create_commit"]
    _, repo_id, repo_kwargs = hub_calls[0]
    assert repo_id == REPO and repo_kwargs["exist_ok"] is True and repo_kwargs["private"] is True
    _, repo_id, commit = hub_calls[1]
    assert repo_id == REPO
    assert "2025-06, 2025-07" in commit["commit_message"]
    assert all(isinstance(op, CommitOperationAdd) for op in commit["operations"])
    contents = commit["contents"]
    assert sorted(contents) == sorted(paths)
    # each file is the right month's: root = latest month
    for month in ("2025-06", "2025-07"):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert contents[f"months/{month}/{name}"] == (root / "adapters" / month / name).read_bytes()
        for name in ("README.md", "retention.png"):
            assert contents[f"months/{month}/{name}"] == (root / "cards" / month / name).read_bytes()
    assert contents["adapter_model.safetensors"] == contents["months/2025-07/adapter_model.safetensors"]
    assert contents["adapter_model.safetensors"] != contents["months/2025-06/adapter_model.safetensors"]
    assert contents["README.md"].decode().endswith("# card of 2025-07\n")
    assert json.loads(contents["adapter_config.json"])["month"] == "2025-07"


def test_custom_commit_message(tmp_path, hub_calls):
    push_campaign(make_campaign(tmp_path / "c"), REPO, commit_message="June and July")
    assert hub_calls[1][2]["commit_message"] == "June and July"


def test_missing_card_says_how_to_fix(tmp_path, no_hub):
    root = make_campaign(tmp_path / "c")
    (root / "cards" / "2025-06" / "README.md").unlink()
    with pytest.raises(CampaignPushError, match=r"2025-06.*no model card.*continual-dpo report"):
        push_campaign(root, REPO)
    with pytest.raises(CampaignPushError, match="continual-dpo report"):
        push_campaign(root, REPO, dry_run=True)


def test_missing_adapter_folder(tmp_path, no_hub):
    root = make_campaign(tmp_path / "c")
    for path in (root / "adapters" / "2025-07").iterdir():
        path.unlink()
    (root / "adapters" / "2025-07").rmdir()
    with pytest.raises(CampaignPushError, match=r"'2025-07' is done but its adapter folder .* is missing"):
        plan_push(root, REPO)


def test_adapter_saved_one_level_down_is_explained(tmp_path):
    # PEFT's save_pretrained puts an adapter not named "default" into a subfolder named after it
    root = make_campaign(tmp_path / "c")
    folder = root / "adapters" / "2025-07"
    (folder / "2025-07").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).rename(folder / "2025-07" / name)
    with pytest.raises(CampaignPushError, match="found one level down"):
        plan_push(root, REPO)


def test_pickled_adapter_is_refused(tmp_path, no_hub):
    root = make_campaign(tmp_path / "c")
    folder = root / "adapters" / "2025-06"
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(CampaignPushError, match=r"pickled weights \(adapter_model.bin\); only safetensors"):
        push_campaign(root, REPO, dry_run=True)


def test_no_done_month(tmp_path, no_hub):
    root = make_campaign(tmp_path / "c", statuses=["running", "pending"])
    with pytest.raises(CampaignPushError, match="No month .* has status 'done'"):
        push_campaign(root, REPO, dry_run=True)


def test_not_a_campaign_directory(tmp_path):
    with pytest.raises(CampaignPushError, match="continual-dpo init"):
        plan_push(tmp_path, REPO)


def test_invalid_repo_id(tmp_path):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        plan_push(make_campaign(tmp_path / "c"), "org/name/extra")
