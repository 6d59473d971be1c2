"""safe_io: credentials redacted wherever they hide in a config, atomic writes, one builder per directory."""

import json
import multiprocessing as mp
import os

import pytest

from higgs_ds.errors import UserError
from higgs_ds.safe_io import REDACTED, DirLock, atomic_write_json, redact, temp_path

TOKEN = "hf_" + "Zq7" * 10


def test_credentials_are_redacted_in_nested_configs_and_argvs():
    cfg = {
        "swift": {"hub_token": TOKEN, "use_auth_token": TOKEN, "WANDB_API_KEY": "k-123", "push_to_hub": True},
        "report": {"aws_secret_access_key": "abc", "db_password": 123456, "private-key": ["pem"]},
        "data": {"max_tokens": 4096, "tokenizer": "/models/tok", "shards": ["a", "b"]},
        "argv": ["--hub_token", TOKEN, "--learning_rate", "1e-5", f"--api_key={TOKEN}", "--save_steps=5"],
        "note": f"pushed with {TOKEN} yesterday",
    }
    out = json.dumps(redact(cfg))
    assert TOKEN not in out and "k-123" not in out and '"abc"' not in out and "123456" not in out and "pem" not in out
    red = redact(cfg)
    # what is not a credential is kept as it was: counts, paths, flags, other argv values
    assert red["data"] == cfg["data"] and red["swift"]["push_to_hub"] is True
    assert redact({"use_auth_token": True, "hub_token": None}) == {"use_auth_token": True, "hub_token": None}
    argv = ["--hub_token", REDACTED, "--learning_rate", "1e-5", f"--api_key={REDACTED}", "--save_steps=5"]
    assert red["argv"] == argv
    assert red["note"] == f"pushed with {REDACTED} yesterday"
    assert cfg["swift"]["hub_token"] == TOKEN  # a copy: the run still has its token


def test_atomic_write_leaves_no_temp_files_and_temp_names_do_not_collide(tmp_path):
    target = tmp_path / "index.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    assert len({temp_path(target) for _ in range(1000)}) == 1000


def _hold_lock(directory, ready, release):
    with DirLock(directory):
        ready.set()
        release.wait(30)


@pytest.mark.timeout(60)
def test_a_second_builder_of_the_same_directory_fails_at_once_naming_the_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError) as err:
            with DirLock(tmp_path):
                pass
        assert f"pid {holder.pid}" in str(err.value) and str(tmp_path) in str(err.value)
    finally:
        release.set()
        holder.join(30)
    with DirLock(tmp_path):  # released when the holder is gone
        pass


@pytest.mark.timeout(60)
def test_a_killed_builder_does_not_leave_a_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, 9)
    holder.join(30)
    with DirLock(tmp_path):
        pass


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".higgs-ds.lock").symlink_to(victim)
    with pytest.raises(UserError) as err:
        with DirLock(out):
            pass
    assert str(out / ".higgs-ds.lock") in str(err.value) and "remove it" in str(err.value)
    assert victim.read_text() == "a user's file"
