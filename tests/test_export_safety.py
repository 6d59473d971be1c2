"""Export and demo never delete what they did not make, never publish half an export, and keep credentials
and absolute paths out of what they write (issue #10, findings 2, 7 and 8 for exports; the demo's workdir).

The checkpoint is a plain Hugging Face one (the tiny model's files + trainer_state.json) in a run folder
with a higgs_ds_config.json, built per test from the session's tiny model: export reads it like a training
checkpoint, without a training run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_ds.errors import UserError

TOKEN = "tok-5f1e0c9a7d3b-not-a-real-credential"
HF_TOKEN = "hf_" + "Q" * 30


def _tree(root: Path) -> dict:
    """Every file under root with its size and bytes' hash: what must still be there afterwards."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _make_run(tmp_path: Path, tiny_model_dir: Path, shard_dirs: list[Path]) -> Path:
    """tmp_path/work/run: a run folder holding checkpoint-2 and a config carrying credentials and absolute paths."""
    run = tmp_path / "work" / "run"
    ckpt = run / "checkpoint-2"
    shutil.copytree(tiny_model_dir, ckpt)
    history = [{"step": 2, "loss": 1.5, "text_loss": 0.5, "audio_loss": 1.0}]
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 2, "log_history": history}))
    config = {
        "model": str(tiny_model_dir),
        "output_dir": str(run),
        "deepspeed": str(tmp_path / "ds" / "zero3.json"),
        "data": {"shards": [str(d) for d in shard_dirs]},
        "swift": {"hub_token": TOKEN, "run_name": f"mine {HF_TOKEN}", "extra": ["--hub_token", TOKEN]},
    }
    (run / "higgs_ds_config.json").write_text(json.dumps(config))
    return run


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    return _make_run(tmp_path, tiny_model_dir, [])


@pytest.fixture
def run_on_shards(tmp_path, tiny_model_dir, small_shards):
    """The same, trained on the session's small shard set (its index names the codec by absolute path)."""
    return _make_run(tmp_path, tiny_model_dir, [small_shards])


def _export(run: Path, out: Path, **kw) -> Path:
    from higgs_ds.tools.export import export

    return export(str(run), str(out), **kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "higgs_ds.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.timeout(300)
def test_export_onto_a_non_empty_unrelated_folder_is_refused_and_keeps_its_files(run, tmp_path):
    mine = tmp_path / "my documents"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("years of work")
    (mine / "notes.txt").write_text("keep me")
    before = _tree(mine)

    result = _cli("export", str(run), "--out", str(mine))

    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("higgs-ds: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(mine) in error[0] and "not a previous higgs-ds export" in error[0]
    assert "pass a new or empty folder" in error[0]
    assert _tree(mine) == before
    assert sorted(p.name for p in mine.parent.iterdir()) == ["my documents", "work"]  # no temp folder left


def _out_of(run: Path, name: str) -> Path:
    ckpt = run / "checkpoint-2"
    return {
        "run": run,
        "checkpoint": ckpt,
        "inside the checkpoint": ckpt / "export",
        "inside the run": run / "export",
        "above the run": run.parent,
        "a symlink to the run": run.parent.parent / "link-to-run",
    }[name]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "where", ["run", "checkpoint", "inside the checkpoint", "inside the run", "above the run", "a symlink to the run"]
)
def test_export_onto_or_into_the_run_is_refused_and_every_checkpoint_stays(run, where):
    out = _out_of(run, where)
    if where == "a symlink to the run":
        out.symlink_to(run, target_is_directory=True)
    before = _tree(run)

    with pytest.raises(UserError) as err:
        _export(run, out)

    message = str(err.value)
    assert str(run.resolve()) in message and "pass a folder outside the run" in message
    assert _tree(run) == before  # every checkpoint file, the config: all still there
    assert not (run / "checkpoint-2" / "export").exists() and not (run / "export").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "forgery",
    ["marker plus a user file", "marker that is a list", "marker that is not JSON", "marker as a symlink", "subfolder"],
)
def test_a_folder_that_only_looks_like_an_export_is_refused(run, tmp_path, forgery):
    out = tmp_path / "exported"
    _export(run, out)
    if forgery == "marker plus a user file":
        (out / "my_eval_results.csv").write_text("a,b\n")
    elif forgery == "marker that is a list":
        (out / "higgs_ds_export.json").write_text('["README.md"]')
    elif forgery == "marker that is not JSON":
        (out / "higgs_ds_export.json").write_text('{"format": "higgs-ds export", "files": [')
    elif forgery == "marker as a symlink":
        real = tmp_path / "marker.json"
        (out / "higgs_ds_export.json").rename(real)
        (out / "higgs_ds_export.json").symlink_to(real)
    else:
        (out / "checkpoint-9").mkdir()
        (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    before = _tree(out)

    with pytest.raises(UserError) as err:
        _export(run, out)

    assert str(out) in str(err.value) and "pass a new or empty folder" in str(err.value)
    assert _tree(out) == before


@pytest.mark.timeout(300)
def test_re_export_replaces_a_previous_export_and_leaves_no_temp_folder(run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    _export(run, out)
    assert json.loads((out / "higgs_ds_export.json").read_text())["dtype"] == "float32"

    _export(run, out, dtype="bfloat16")

    weights = load_file(out / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.bfloat16"}
    assert json.loads((out / "higgs_ds_export.json").read_text())["dtype"] == "bfloat16"
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported.")]
    assert [n for n in hidden if not n.endswith(".lock")] == []  # neither the new nor the old one left behind


@pytest.mark.timeout(300)
def test_re_export_without_an_atomic_exchange_still_replaces_by_rename(run, tmp_path, monkeypatch):
    import higgs_ds.tools.export as export_module

    out = tmp_path / "exported"
    _export(run, out)
    monkeypatch.setattr(export_module, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rmtree, removed = shutil.rmtree, []

    def rmtree(path, *a, **kw):
        removed.append(Path(path))
        # by the time anything is removed, the new export is already in place
        assert json.loads((out / "higgs_ds_export.json").read_text())["dtype"] == "bfloat16"
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(export_module.shutil, "rmtree", rmtree)
    _export(run, out, dtype="bfloat16")

    assert len(removed) == 1 and removed[0].name.startswith(".exported.old.") and not removed[0].exists()


@pytest.mark.timeout(300)
def test_a_crash_between_the_fallback_renames_is_recovered_by_the_next_export(run, tmp_path, capsys):
    out = tmp_path / "exported"
    _export(run, out)
    trash = tmp_path / ".exported.old.4242.0123456789abcdef"  # where the crash left the old export
    out.rename(trash)
    cut_short = tmp_path / ".exported.new.4243.fedcba9876543210"  # a build killed before its marker
    cut_short.mkdir()
    (cut_short / "model.safetensors").write_bytes(b"partial")

    _export(run, out, dtype="bfloat16")

    assert json.loads((out / "higgs_ds_export.json").read_text())["dtype"] == "bfloat16"
    assert not trash.exists()
    assert (cut_short / "model.safetensors").read_bytes() == b"partial"  # not recognised as an export: kept
    assert str(cut_short) in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_file_put_into_the_old_export_while_exporting_is_kept(run, tmp_path, monkeypatch):
    import higgs_ds.tools.export as export_module

    out = tmp_path / "exported"
    _export(run, out)
    real_exchange = export_module._exchange

    def user_writes_first(a, b):  # after the last check, just before the swap
        (out / "my_notes.txt").write_text("written during the export")
        return real_exchange(a, b)

    monkeypatch.setattr(export_module, "_exchange", user_writes_first)
    with pytest.raises(UserError) as err:
        _export(run, out, dtype="bfloat16")

    kept = [p for p in tmp_path.glob(".exported.*") if (p / "my_notes.txt").is_file()]
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    assert (kept[0] / "my_notes.txt").read_text() == "written during the export"


@pytest.mark.timeout(300)
def test_an_export_that_fails_midway_leaves_the_previous_export_whole(run, tmp_path, monkeypatch):
    import higgs_ds.tools.export as export_module

    out = tmp_path / "exported"
    _export(run, out)
    before = _tree(out)

    def fail_after_the_weights(ckpt, tmp, *args):
        (tmp / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_build", fail_after_the_weights)
    with pytest.raises(OSError):
        _export(run, out, dtype="bfloat16")

    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if ".new." in p.name] == []


@pytest.mark.timeout(600)  # the first test to use small_shards builds them
def test_credentials_in_the_run_config_reach_no_file_of_the_export(run_on_shards, tmp_path):
    out = tmp_path / "exported"
    _export(run_on_shards, out)

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        data = path.read_bytes()
        assert TOKEN.encode() not in data and HF_TOKEN.encode() not in data, path
    card = (out / "README.md").read_text()
    assert '"hub_token": "<redacted>"' in card  # the config is in the card, its token is not


@pytest.mark.timeout(600)
def test_no_absolute_path_of_the_machine_in_the_card_codec_or_marker(
    run_on_shards, tmp_path, tiny_model_dir, small_shards
):
    out = tmp_path / "exported"
    _export(run_on_shards, out)

    roots = {str(tmp_path), str(tmp_path.resolve()), str(tiny_model_dir), str(small_shards)}
    roots |= {os.path.dirname(str(small_shards)), os.path.dirname(str(tiny_model_dir))}
    roots |= {str(Path.home())} if len(Path.home().parts) > 1 else set()
    for name in ("README.md", "codec.json", "higgs_ds_export.json"):
        text = (out / name).read_text()
        leaked = [r for r in roots if r in text]
        assert leaked == [], (name, leaked)
    codec = json.loads((out / "codec.json").read_text())
    assert codec["codec"]["num_codebooks"] == 8  # still says which codec, by name and hash
    assert codec["trained_on_shards"] == [small_shards.name]
    marker = json.loads((out / "higgs_ds_export.json").read_text())
    assert marker["checkpoint"] == "run/checkpoint-2"
    assert "run/checkpoint-2" in (out / "README.md").read_text()


@pytest.mark.timeout(300)
def test_a_checkpoint_file_linking_out_of_the_checkpoint_is_not_copied(run, tmp_path):
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    tokenizer_config = run / "checkpoint-2" / "tokenizer_config.json"
    tokenizer_config.unlink()
    tokenizer_config.symlink_to(secret)

    with pytest.raises(UserError) as err:
        _export(run, tmp_path / "exported")

    assert str(tokenizer_config) in str(err.value) and "replace it with the file itself" in str(err.value)
    assert not (tmp_path / "exported").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("torn", ["trainer_state", "run config", "deepspeed latest"])
def test_a_torn_or_lying_checkpoint_file_is_a_named_error(run, tmp_path, torn):
    ckpt = run / "checkpoint-2"
    if torn == "trainer_state":
        (ckpt / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # the disk filled up
        named = ckpt
    elif torn == "run config":
        (run / "higgs_ds_config.json").write_text('["not", "a", "config"]')
        named = run / "higgs_ds_config.json"
    else:
        (run.parent / "elsewhere").mkdir()  # `latest` leads DeepSpeed's loader out of the checkpoint
        (ckpt / "latest").write_text("../../elsewhere")
        named = ckpt

    with pytest.raises(UserError) as err:
        _export(ckpt, tmp_path / "exported")

    assert str(named) in str(err.value) and ": " in str(err.value).split(str(named))[-1]  # then what to do
    assert not (tmp_path / "exported").exists()


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile DeepSpeed partition file can do."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch '{self.witness}'",))


@pytest.mark.timeout(300)
def test_a_deepspeed_partition_file_that_would_run_code_is_refused_unloaded(run, tmp_path):
    import torch

    ckpt = run / "checkpoint-2"
    (ckpt / "model.safetensors").unlink()  # the weights are in DeepSpeed's partitions only
    (ckpt / "global_step2").mkdir()
    (ckpt / "latest").write_text("global_step2")
    witness = tmp_path / "code-ran"
    model_states = ckpt / "global_step2" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": [], "param_shapes": _RunsCode(witness)}, model_states)
    torch.save({"optimizer_state_dict": {}}, ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    with pytest.raises(UserError) as err:
        _export(run, tmp_path / "exported")

    assert str(model_states) in str(err.value) and "your own runs" in str(err.value)
    assert not witness.exists()  # nothing was executed
    assert not (tmp_path / "exported").exists()
    assert torch.load.__module__ == "torch.serialization"  # torch.load is itself again afterwards


# ------------------------------------------------------------------------------------------- demo


@pytest.mark.timeout(60)
def test_demo_refuses_a_non_empty_workdir_it_did_not_make(tmp_path):
    from higgs_ds.tools.demo import run_demo

    work = tmp_path / "project"
    (work / "train").mkdir(parents=True)
    (work / "train" / "results.csv").write_text("mine")
    before = _tree(work)

    with pytest.raises(UserError) as err:
        run_demo(str(work), steps=1)

    assert str(work) in str(err.value) and "new or empty folder" in str(err.value)
    assert _tree(work) == before and sorted(p.name for p in work.iterdir()) == ["train"]  # nothing made or run


@pytest.mark.timeout(60)
def test_demo_replaces_only_its_own_train_folder(tmp_path):
    from higgs_ds.tools.demo import _fresh_train_dir, prepare_workdir

    work = prepare_workdir(tmp_path / "demo")  # new: made and marked
    (work / "train" / "checkpoint-1").mkdir(parents=True)
    assert prepare_workdir(work) == work  # a previous demo run is accepted again
    assert not _fresh_train_dir(work).exists()  # and its own training output replaced

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (work / "train").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError) as err:
        _fresh_train_dir(work)
    assert str(work / "train") in str(err.value) and "move it away" in str(err.value)
    assert (elsewhere / "keep.txt").read_text() == "mine"


@pytest.mark.timeout(60)
def test_a_demo_workdir_serves_one_family_and_an_old_marker_is_the_native_one(tmp_path):
    from higgs_ds.models.family import environment_family
    from higgs_ds.tools.demo import DEMO_MARKER, demo_family, prepare_workdir

    here = environment_family()
    work = prepare_workdir(tmp_path / "demo", here)
    assert json.loads((work / DEMO_MARKER).read_text())["family"] == here
    other = "v3" if here == "native" else "native"
    before = _tree(work)
    with pytest.raises(UserError) as err:
        prepare_workdir(work, other)
    assert str(work) in str(err.value) and f"the {here} family" in str(err.value)
    assert _tree(work) == before

    old = tmp_path / "old-demo"  # a marker written before the family was recorded
    old.mkdir()
    (old / DEMO_MARKER).write_text(json.dumps({"made_by": "higgs-ds demo"}))
    assert prepare_workdir(old, "native") == old.resolve()
    with pytest.raises(UserError):
        prepare_workdir(old, "v3")

    wrong = "boson" if here == "native" else "v3"  # a family this environment does not train
    with pytest.raises(UserError) as err:
        demo_family(wrong)
    assert "environment" in str(err.value) and ("make boson" in str(err.value) or "make install" in str(err.value))
