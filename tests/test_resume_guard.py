"""Resuming only what fits, and a rank that never waits forever (issue #10, findings 3, 6 and 7, training side):

- a saved data position is refused when the epoch plan it was taken in differs from this run's (batch
  settings, shards, seed), with what changed; on another number of ranks it continues the epoch; the same
  shards in a moved folder still resume;
- a checkpoint with a torn or garbage trainer_state.json / data state is not complete, and the newest one
  whose files parse is resumed; a data state is written with fsync before its rename;
- a dataloader worker stuck on a shard fails the rank after data.loader_timeout, naming the shard, and a
  worker's own error reaches the rank as one line.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from higgs_ds.errors import UserError
from higgs_ds.stream.loader import DataConfig, EpochDataLoader, ShardStream, build_dataloader
from higgs_ds.stream.plan import PlanError
from higgs_ds.stream.reader import ShardError
from higgs_ds.train.checkpoint import is_complete, latest_complete, read_data_state, write_data_state

WHAT_TO_DO = "resume with the saved settings and shards, or train into a new output_dir"


@pytest.fixture(scope="module")
def tok_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture
def shards(tmp_path, small_shards):
    """A private copy of the small shard set (3 shards: 3 + 3 + 2 samples), free to be damaged."""
    return Path(shutil.copytree(small_shards, tmp_path / "shards"))


def _loader(tok_config, shard_dir, *, rank=0, world_size=2, **settings):
    tok, config = tok_config
    cfg = DataConfig(**({"shards": [str(shard_dir)], "batch_size": 1, "seed": 3, "num_workers": 0} | settings))
    return build_dataloader(cfg, tok, config, rank=rank, world_size=world_size)


def _state_after(loader, batches: int) -> dict:
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    del it
    return state


# ---- a saved position applies only to the plan it was taken in ----
# (the timeouts are generous: the session's tiny codec and shards are built inside the first test using them)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "changed, named",
    [
        ({"batch_size": 2}, r"data\.batch_size: saved 1, now 2"),
        ({"max_tokens": 100000}, r"data\.max_tokens: saved None, now 100000"),
        ({"max_length": 100000}, r"data\.max_length: saved None, now 100000"),
        ({"seed": 4}, r"data\.seed: saved 3, now 4"),
    ],
)
def test_a_resume_with_other_batch_settings_is_refused_naming_them(tok_config, shards, changed, named):
    state = _state_after(_loader(tok_config, shards), 1)
    with pytest.raises(PlanError, match=named) as err:
        _loader(tok_config, shards, **changed).load_state_dict(state)
    assert WHAT_TO_DO in str(err.value)


def _drop_last_shard(shard_dir: Path) -> None:
    """Edit the set into a consistent one shard shorter: index.json and its sidecar's rows, size and sha256."""
    index = json.loads((shard_dir / "index.json").read_text())
    dropped = index["shards"].pop()
    index["num_samples"] -= dropped["num_samples"]
    desc = index["sample_table"]
    rows = np.load(shard_dir / desc["file"], allow_pickle=False)[: index["num_samples"]]
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    data = buf.getvalue()
    (shard_dir / desc["file"]).write_bytes(data)
    desc.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=len(rows))
    (shard_dir / "index.json").write_text(json.dumps(index))


@pytest.mark.timeout(300)
def test_a_resume_on_other_shards_is_refused_naming_the_directory(tok_config, shards):
    """The same folder, its index now listing one shard less (a rebuilt or edited set): batch k is other samples."""
    state = _state_after(_loader(tok_config, shards), 1)
    _drop_last_shard(shards)
    with pytest.raises(PlanError) as err:
        _loader(tok_config, shards).load_state_dict(state)
    message = str(err.value)
    assert f"data.shards[0] ({shards})" in message and "saved 3 shards / 8 samples" in message
    assert "now 2 shards / 6 samples" in message and WHAT_TO_DO in message


@pytest.mark.timeout(300)
@pytest.mark.parametrize("new_world", [1, 4])
def test_a_resume_on_another_number_of_ranks_reads_exactly_the_rest_of_the_epoch(tok_config, shards, new_world):
    """2 ranks take 1 batch each (8 samples, 4 batches per rank), a run on 1 or 4 ranks takes the rest: every
    sample of the epoch exactly once, plus the repeats the resumed plan counts (4 ranks: 6 single-sample
    batches left, none can be split, so 2 repeated to give each rank 2)."""
    whole = Counter(i for r in range(2) for b in _loader(tok_config, shards, rank=r) for i in b["sample_ids"])
    states, before = [], Counter()
    for r in range(2):
        loader = _loader(tok_config, shards, rank=r)
        it = iter(loader)
        before.update(next(it)["sample_ids"])
        states.append(json.loads(json.dumps(loader.state_dict())))
        del it
    assert states[0]["segments"] == [[2, 1]] == states[1]["segments"]
    after, counts, counted = Counter(), set(), 0
    for r in range(new_world):
        resumed = _loader(tok_config, shards, rank=r, world_size=new_world)
        resumed.load_state_dict(states[0])  # the global position: any saved rank's
        counted += resumed.dataset.plan().num_repeated  # before the pass: after it the next epoch is planned
        batches = [b["sample_ids"] for b in resumed]
        counts.add(len(batches))
        after.update(i for b in batches for i in b)
    assert counts == {6 // new_world + (new_world == 4)}, "every rank takes as many batches"
    assert not whole - (before + after), "no sample of the epoch is skipped"
    assert sum((before + after - whole).values()) == counted == {1: 0, 4: 2}[new_world]


@pytest.mark.timeout(300)
def test_the_same_shards_in_a_moved_folder_resume_exactly(tok_config, shards, tmp_path):
    whole = [b["sample_ids"] for b in _loader(tok_config, shards)]
    loader = _loader(tok_config, shards)
    it = iter(loader)
    first = [next(it)["sample_ids"]]
    state = loader.state_dict()
    del it
    moved = shutil.move(str(shards), str(tmp_path / "moved"))
    resumed = _loader(tok_config, moved)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as in a checkpoint
    assert first + [b["sample_ids"] for b in resumed] == whole


@pytest.mark.timeout(300)
def test_a_position_saved_without_a_plan_fingerprint_resumes_with_a_warning(tok_config, shards, caplog):
    """Decision: a state written before fingerprints (older higgs-ds) is accepted, with what it did record
    (seed, world size, weights, cloning) still checked, and a warning that the rest is assumed unchanged."""
    state = _state_after(_loader(tok_config, shards), 1)
    del state["plan"]
    with caplog.at_level(logging.WARNING, logger="higgs_ds.stream.loader"):
        _loader(tok_config, shards).load_state_dict(state)
    assert "without a fingerprint" in caplog.text and "assumed unchanged" in caplog.text
    with pytest.raises(PlanError, match="world size: saved 2 ranks, now 1"):
        _loader(tok_config, shards, world_size=1).load_state_dict(state)


@pytest.mark.timeout(300)
def test_a_position_past_the_end_of_the_epoch_is_refused(tok_config, shards):
    state = _state_after(_loader(tok_config, shards), 1) | {"batches_done": 1000, "segments": [[2, 1000]]}
    with pytest.raises(PlanError, match="1000 batches done in epoch 0, but the epoch has 4"):
        _loader(tok_config, shards).load_state_dict(state)


@pytest.mark.parametrize(
    "content",
    [
        b'{"epoch": 0, "batches_do',  # torn by a full disk
        b"[1, 2]",
        b"\xff\xfe",
        b'{"epoch": -1, "batches_done": 0, "seed": 0, "world_size": 2, "rank": 0}',
        b'{"epoch": 0, "batches_done": "3", "seed": 0, "world_size": 2, "rank": 0}',
        b'{"epoch": 0, "batches_done": 0, "seed": 0, "world_size": 2, "rank": 5}',
        b'{"epoch": 0, "batches_done": 0, "seed": 0, "world_size": 2, "rank": 0, "plan": []}',
    ],
)
def test_a_data_state_that_is_not_one_is_refused_naming_the_file(tmp_path, content):
    (tmp_path / "data_state_rank0.json").write_bytes(content)
    with pytest.raises(UserError) as err:
        read_data_state(tmp_path, 0)
    message = str(err.value)
    assert str(tmp_path / "data_state_rank0.json") in message and "resume from" in message and "\n" not in message


# ---- complete checkpoints: every file parses ----


def _checkpoint(out: Path, step: int, world_size: int = 2) -> Path:
    """What higgs-ds training leaves in a checkpoint, as far as completeness is concerned."""
    ckpt = out / f"checkpoint-{step}"
    (ckpt / f"global_step{step}").mkdir(parents=True)
    (ckpt / "latest").write_text(f"global_step{step}")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "higgs_audio"}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [{"loss": 1.0}] * 50}))
    for rank in range(world_size):
        state = {"epoch": 0, "batches_done": step, "seed": 0, "rank": rank}
        write_data_state(ckpt, rank, world_size, state)
        (ckpt / f"rng_state_{rank}.pth").write_bytes(b"rng")
    return ckpt


def _torn(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: _torn(c / "trainer_state.json"),
        lambda c: (c / "trainer_state.json").write_bytes(b"\0" * 4096),  # a full disk's zero-filled block
        lambda c: (c / "trainer_state.json").write_text("[]"),
        lambda c: _torn(c / "config.json"),
        lambda c: _torn(c / "data_state_rank1.json"),
        lambda c: (c / "data_state_rank1.json").write_bytes(b"\xff" * 10),
        lambda c: (c / "data_state_rank1.json").write_text('{"world_size": "2"}'),
        lambda c: (c / "data_state_rank1.json").write_text((c / "data_state_rank0.json").read_text()),  # rank 0's
        lambda c: (c / "data_state_rank1.json").unlink(),
        lambda c: (c / "latest").write_text("global_step999"),
        lambda c: (c / "latest").write_text(f"../{c.name}/global_step6"),  # a path, even one back inside
    ],
    ids=[
        "torn-trainer-state",
        "zeroed-trainer-state",
        "list-trainer-state",
        "torn-config",
        "torn-data-state",
        "binary-data-state",
        "garbage-data-state",
        "copied-data-state",
        "missing-data-state",
        "dangling-latest",
        "latest-leaves-checkpoint",
    ],
)
def test_the_newest_checkpoint_whose_files_parse_is_resumed(tmp_path, damage):
    good = _checkpoint(tmp_path, 3)
    newest = _checkpoint(tmp_path, 6)
    assert is_complete(newest) and latest_complete(tmp_path) == newest
    damage(newest)
    assert is_complete(newest) is False  # never raises on what it finds
    assert latest_complete(tmp_path) == good


def test_a_data_state_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_data_state(tmp_path, 0, 1, {"epoch": 0, "batches_done": 1, "seed": 0, "rank": 0})
    final = str(tmp_path / "data_state_rank0.json")
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
    assert len(renames) == 1, events
    tmp = events[renames[0]][1]
    assert ("fsync", tmp) in events[: renames[0]], events  # the data is on disk before the name points at it
    assert ("fsync", str(tmp_path)) in events[renames[0] :], events  # and the rename itself is durable
    assert read_data_state(tmp_path, 0)["batches_done"] == 1


# ---- a stuck worker fails the rank, by name ----


def _live_children(before: set[int]) -> list[psutil.Process]:
    kids = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return [p for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_for_no_children(before: set[int], seconds: float = 20) -> list[psutil.Process]:
    deadline = time.time() + seconds
    while (alive := _live_children(before)) and time.time() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.timeout(300)
def test_a_worker_stuck_on_a_shard_fails_the_rank_naming_it(tok_config, shards, monkeypatch):
    """A worker whose read of shard-000001.tar never returns (as on a hung filesystem): after
    data.loader_timeout the rank fails naming that shard, and the stuck worker is gone."""
    import higgs_ds.stream.loader as dataloader

    stuck = str(shards / "shard-000001.tar")

    def hanging(real):
        def read(refs, positions, *args, **kwargs):
            if any(refs[s].path == stuck for s, _ in positions):
                time.sleep(3600)
            return real(refs, positions, *args, **kwargs)

        return read

    # the strict read and the checked shards' read; the forked worker inherits both
    monkeypatch.setattr(dataloader, "read_positions", hanging(dataloader.read_positions))
    monkeypatch.setattr(dataloader, "read_encoded", hanging(dataloader.read_encoded))
    loader = _loader(tok_config, shards, world_size=1, num_workers=2, loader_timeout=2)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(UserError) as err:  # the worker sleeps an hour: only the loader's timeout ends this
        for _ in loader:
            pass
    message = str(err.value)
    assert stuck in message and "data.loader_timeout" in message and "shards verify" in message
    assert "shard-000000.tar" not in message and "shard-000002.tar" not in message  # batch_size 1: one shard
    assert "\n" not in message
    assert _wait_for_no_children(before) == []


@pytest.mark.timeout(300)
def test_a_fifo_in_place_of_a_shard_does_not_hang_the_rank(tok_config, shards):
    """The shard is swapped for a FIFO after the run started: opening it blocks forever."""
    loader = _loader(tok_config, shards, world_size=1, num_workers=1, loader_timeout=3)
    fifo = shards / "shard-000001.tar"
    fifo.unlink()
    os.mkfifo(fifo)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(UserError) as err:
        for _ in loader:
            pass
    assert str(fifo) in str(err.value) and "\n" not in str(err.value)
    assert _wait_for_no_children(before) == []


def _raise_for(path: str, error: UserError, name: str = "read_positions"):
    """The loader's read function `name` (the strict read_positions or the checked shards' read_encoded),
    raising `error` for a batch that reads `path`."""
    import higgs_ds.stream.loader as dataloader

    real = getattr(dataloader, name)

    def read(refs, positions, *args, **kwargs):
        if any(refs[s].path == path for s, _ in positions):
            raise error
        return real(refs, positions, *args, **kwargs)

    return read


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["reader", "collator"])
def test_a_workers_error_reaches_the_rank_as_one_line(tok_config, shards, monkeypatch, where):
    """torch re-raises a worker's exception with the worker's traceback in its message; the policy is one
    line naming the shard (exit 2), so the rank raises the worker's error as it was."""
    import higgs_ds.stream.loader as dataloader

    bad = str(shards / "shard-000002.tar")
    message = f"{bad}: member 'x.json' is not an object; rebuild the shard"
    tok, config = tok_config
    stream = ShardStream(DataConfig(shards=[str(shards)], batch_size=1, num_workers=1), tok, rank=0, world_size=1)
    if where == "reader":
        for name in ("read_positions", "read_encoded"):
            monkeypatch.setattr(dataloader, name, _raise_for(bad, ShardError(message), name))
        loader = build_dataloader(stream.cfg, tok, config, rank=0, world_size=1)
    else:

        def collate(samples):
            raise ShardError(message)

        loader = EpochDataLoader(stream, collate, num_workers=1)
    with pytest.raises(ShardError) as err:
        for _ in loader:
            pass
    assert str(err.value) == message


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), True, "600"])
def test_a_bad_loader_timeout_is_refused(timeout):
    with pytest.raises(PlanError, match=r"data\.loader_timeout .*finite number >= 0"):
        DataConfig(shards=["x"], loader_timeout=timeout)


def test_the_loader_timeout_is_documented_in_train_help():
    from higgs_ds.train.run import HELP

    text = HELP[HELP.index("--data.loader_timeout") :]
    assert text.startswith("--data.loader_timeout (default 600.0)") and "0 waits forever" in text
