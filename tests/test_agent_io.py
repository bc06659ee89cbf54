"""Agent checkpoints: round trip, and clear errors for folders that are not, or no longer, what they claim."""

import json

import pytest
import safetensors.torch
import torch

from agents.io import load_policy, save_policy
from agents.policy import APTPolicy


def _policy() -> APTPolicy:
    torch.manual_seed(0)
    return APTPolicy(32, 16, 3, hidden=8, qk_dim=8)


def test_round_trip_keeps_weights(tmp_path):
    policy = _policy()
    loaded = load_policy(save_policy(tmp_path / "agent", policy))
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), loaded.state_dict().values()))


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path):
    folder = save_policy(tmp_path / "agent", _policy())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden": 16}))
    with pytest.raises(ValueError, match="do not fit its config"):
        load_policy(folder)
    del config["qk_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks \\['qk_dim'\\]"):
        load_policy(folder)


def test_a_policy_is_rebuilt_from_its_config_with_later_options_at_their_defaults():
    policy = APTPolicy(32, 16, 3, hidden=8, qk_dim=8, use_budget=True, sampling="topk", mixer="attention")
    assert APTPolicy.from_config({**policy.config(), "format": "ignored"}).config() == policy.config()
    old = {k: v for k, v in policy.config().items() if k in APTPolicy.CONFIG_KEYS}  # saved before the options
    assert APTPolicy.from_config(old).config() == {**old, "use_budget": False, "sampling": "bernoulli",
                                                   "mixer": "none", "mixer_heads": 4, "position_prior": 0.0,
                                                   "calibration": None}  # fmt: skip
    with pytest.raises(ValueError, match="lacks \\['embed_dim'\\]"):
        APTPolicy.from_config({k: v for k, v in old.items() if k != "embed_dim"})


def test_corrupt_or_missing_files_are_clear_errors(tmp_path):
    folder = save_policy(tmp_path / "agent", _policy())
    tensors = safetensors.torch.load_file(str(folder / "policy.safetensors"))
    (folder / "policy.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_policy(folder)
    assert tensors  # the file was a real one before
    with pytest.raises(FileNotFoundError, match="not an agent checkpoint"):
        load_policy(tmp_path / "nothing")


def test_agent_folder_moved_aside_by_a_killed_save_is_restored_on_read(tmp_path):
    folder = save_policy(tmp_path / "agent", _policy())
    folder.rename(tmp_path / ".agent.old")  # killed between the two renames
    assert load_policy(tmp_path / "agent") is not None


def test_a_budget_policy_round_trips():
    import tempfile
    from pathlib import Path

    policy = APTPolicy(32, 16, 3, hidden=8, qk_dim=8, use_budget=True, sampling="topk")
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_policy(save_policy(Path(tmp) / "agent", policy))
    assert loaded.use_budget and loaded.sampling == "topk"
