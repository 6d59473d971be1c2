"""Finding 1 of issue 10: nothing in a model directory is ever executed, through `higgs-ds train` and through
`swift sft --external_plugins`, and a hub id is refused instead of downloaded. Also the `swift sft` side of the
error policy (one `higgs-ds: error:` line, exit 2).

The hostile directory is the tiny model whose config.json names `configuration_files`: transformers then reads
config.4.0.0.json instead, which carries an auto_map into evil_config.py beside it; that file writes a marker
when imported. The old guard read only config.json's top level, so SWIFT imported it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, train_env
from .envs import SWIFT_MODEL_TYPE

PLUGIN = REPO / "higgs_ds" / "swift_plugin.py"
SWIFT = Path(sys.executable).parent / "swift"
TOLD_TO_REMOVE = "higgs-ds never runs code from a model directory"


def _evil_module(marker: Path) -> str:
    return (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('executed')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'higgs_audio'\n"
    )


def hostile_model_dir(root: Path, tiny_model_dir: Path, marker: Path, *, with_python: bool = True) -> Path:
    model = root / "hostile-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, configuration_files=["config.4.0.0.json"])))
    auto_map = {"AutoConfig": "evil_config.EvilConfig", "AutoModel": "evil_config.EvilConfig"}
    (model / "config.4.0.0.json").write_text(json.dumps(dict(config, auto_map=auto_map)))
    if with_python:
        (model / "evil_config.py").write_text(_evil_module(marker))
    return model


def _env(tmp_path: Path) -> dict:
    # transformers copies remote code into HF_MODULES_CACHE before importing it: keep that inside tmp_path
    return dict(train_env(29100), HF_MODULES_CACHE=str(tmp_path / "modules"), NPROC_PER_NODE="1")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("higgs-ds: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(300)  # with the session's shard fixture, built on first use
def test_higgs_ds_train_refuses_a_model_directory_with_code(tmp_path, tiny_model_dir, small_shards):
    marker = tmp_path / "MARKER"
    model = hostile_model_dir(tmp_path, tiny_model_dir, marker)
    cmd = [sys.executable, "-m", "higgs_ds.cli", "train", str(REPO / "configs" / "demo.toml"), "--model", str(model)]
    cmd += ["--output_dir", str(tmp_path / "run"), "--data.shards", json.dumps([str(small_shards)])]
    run = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=100)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    line = _one_error_line(run.stderr)
    assert str(model) in line and TOLD_TO_REMOVE in line and "remove" in line
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.timeout(400)
def test_swift_sft_refuses_a_model_directory_with_code(tmp_path, tiny_model_dir, small_shards):
    marker = tmp_path / "MARKER"
    model = hostile_model_dir(tmp_path, tiny_model_dir, marker)
    cmd = [str(SWIFT), "sft", "--external_plugins", str(PLUGIN), "--model", str(model)]
    cmd += ["--model_type", SWIFT_MODEL_TYPE, "--template", "higgs_audio", "--dataset", str(small_shards)]
    cmd += ["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--torch_dtype", "float32"]
    env = _env(tmp_path)
    env.pop("NPROC_PER_NODE")  # one process, no torchrun: the refusal comes while SWIFT parses its arguments
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    line = _one_error_line(run.stderr)
    assert str(model) in line and TOLD_TO_REMOVE in line
    assert not marker.exists()
    assert "model_info:" not in run.stdout + run.stderr  # refused before SWIFT read the model


@pytest.mark.timeout(60)
def test_remote_code_is_impossible_in_the_process_whatever_the_caller_trusts(tmp_path, tiny_model_dir):
    """The root: transformers' own loaders, called as ms-swift calls them (trust_remote_code=True), on a
    directory that never went through check_model_dir."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.models.auto import tokenization_auto

    from higgs_ds.models.trust import RemoteCodeRefused
    from higgs_ds.train.swift import register  # noqa: F401  installs the guard, as both entry points do

    marker = tmp_path / "MARKER"
    model = hostile_model_dir(tmp_path, tiny_model_dir, marker)
    with pytest.raises(RemoteCodeRefused, match=f"{model}.*{TOLD_TO_REMOVE}"):
        AutoConfig.from_pretrained(model, trust_remote_code=True)  # via configuration_files
    with pytest.raises(RemoteCodeRefused, match=str(model)):
        AutoModel.from_pretrained(model, trust_remote_code=True)

    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_config.EvilConfig", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(RemoteCodeRefused, match=str(model)):
        AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    # a class reference into another directory ("repo--module.Class"), through a name bound at import
    with pytest.raises(RemoteCodeRefused, match="evil_config.EvilConfig"):
        tokenization_auto.get_class_from_dynamic_module(f"{model}--evil_config.EvilConfig", str(model))
    assert not marker.exists() and not (tmp_path / "modules").exists()


def _refusal(model) -> str:
    from higgs_ds.errors import UserError
    from higgs_ds.models.trust import check_model_dir

    with pytest.raises(UserError) as err:
        check_model_dir(model)
    return str(err.value)


def _copy(tiny_model_dir, tmp_path, name="model") -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / name))


def test_python_files_anywhere_inside_are_refused_with_their_path(tmp_path, tiny_model_dir):
    model = _copy(tiny_model_dir, tmp_path)
    (model / "sub" / "deeper").mkdir(parents=True)
    hidden = model / "sub" / "deeper" / "Modeling_Evil.PY"  # any case, any depth
    hidden.write_text("raise SystemExit")
    message = _refusal(model)
    assert str(hidden) in message and "remove them" in message
    hidden.unlink()
    compiled = model / "sub" / "x.cpython-311.pyc"
    compiled.write_bytes(b"\0")
    assert str(compiled) in _refusal(model)
    compiled.unlink()
    outside = tmp_path / "outside"  # a symlinked folder is followed (a hub cache snapshot is all links)
    outside.mkdir()
    (outside / "evil.py").write_text("")
    (model / "sub" / "linked").symlink_to(outside)
    assert "evil.py" in _refusal(model)


def test_an_auto_map_anywhere_in_any_json_is_refused(tmp_path, tiny_model_dir):
    model = _copy(tiny_model_dir, tmp_path)
    tokenizer_config = model / "tokenizer_config.json"
    value = json.loads(tokenizer_config.read_text())
    # nested, and spelled with a JSON escape: still the key a JSON reader sees
    tokenizer_config.write_text(json.dumps(value)[:-1] + ', "extra": {"nested": [{"auto\\u005fmap": {}}]}}')
    assert json.loads(tokenizer_config.read_text())["extra"]["nested"][0] == {"auto_map": {}}
    message = _refusal(model)
    assert str(tokenizer_config) in message and "auto_map" in message and "remove auto_map" in message


@pytest.mark.parametrize(
    "entry", ["../outside/config.4.0.0.json", "missing.4.0.0.json", "sub/config.4.0.0.json", "..", 7]
)
def test_configuration_files_may_name_only_files_beside_config_json(tmp_path, tiny_model_dir, entry):
    model = _copy(tiny_model_dir, tmp_path)
    (model / "sub").mkdir()
    (model / "sub" / "config.4.0.0.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.4.0.0.json").write_text("{}")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, configuration_files=[entry])))
    message = _refusal(model)
    assert str(model / "config.json") in message and "configuration_files" in message
    assert "remove" in message


def test_a_hub_id_or_a_missing_path_is_refused_without_downloading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("bosonai/higgs-audio-v2-generation-3B-base", str(tmp_path / "missing"), ""):
        message = _refusal(model)
        assert "never downloads" in message and "download it once" in message and f"model {model} " in message


@pytest.mark.timeout(60)
def test_swift_model_resolution_refuses_hub_ids_with_exit_2(capsys):
    """ms-swift resolves --model (downloading a hub id) in get_model_info_meta: the plugin refuses there."""
    from swift.hub.hub import HFHub, MSHub
    from swift.model import model_meta

    from higgs_ds.train.swift import register  # noqa: F401  installs the guard

    for resolve in (
        lambda: model_meta.safe_snapshot_download("bosonai/higgs-audio-v2-generation-3B-base"),
        lambda: MSHub.download_model("bosonai/higgs-audio-v2-tokenizer"),
        lambda: HFHub.download_model("bosonai/higgs-audio-v2-tokenizer"),
    ):
        with pytest.raises(SystemExit) as exited:
            resolve()
        assert exited.value.code == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "bosonai/higgs-audio-v2-" in line and "never downloads" in line


def test_args_json_naming_plugins_and_broken_json_are_refused(tmp_path, tiny_model_dir):
    from higgs_ds.models.trust import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    (model / "args.json").write_text(json.dumps({"external_plugins": ["/elsewhere/plugin.py"], "model_type": "x"}))
    message = _refusal(model)
    assert str(model / "args.json") in message and "remove external_plugins" in message
    (model / "args.json").write_text(json.dumps({"external_plugins": [str(PLUGIN)]}))  # our own plugin is fine
    assert check_model_dir(model) == model
    (model / "args.json").unlink()
    deep = model / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    message = _refusal(model)
    assert str(deep) in message and "not valid JSON" in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("special", ["fifo", "device"])
def test_a_file_that_never_ends_is_refused_without_reading_it(tmp_path, tiny_model_dir, special):
    model = _copy(tiny_model_dir, tmp_path)
    tokenizer = model / "tokenizer.json"
    tokenizer.unlink()
    if special == "fifo":
        os.mkfifo(tokenizer)  # opening it for reading would block forever
    else:
        tokenizer.symlink_to("/dev/zero")
    message = _refusal(model)
    assert str(tokenizer) in message and "not a regular file" in message and "remove it" in message


@pytest.mark.timeout(30)
def test_a_symlink_loop_does_not_hang_the_scan(tmp_path, tiny_model_dir):
    from higgs_ds.models.trust import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    (model / "loop").symlink_to(model)
    (model / "a").mkdir()
    (model / "a" / "b").symlink_to(model / "a")
    assert check_model_dir(model) == model  # terminates; the released layout (no code) is accepted


def test_the_released_tiny_model_and_a_training_checkpoint_layout(tmp_path, tiny_model_dir):
    from higgs_ds.models.trust import check_model_dir

    assert check_model_dir(tiny_model_dir) == tiny_model_dir
    ckpt = _copy(tiny_model_dir, tmp_path, "checkpoint-4")
    (ckpt / "zero_to_fp32.py").write_text("")  # DeepSpeed writes it into every checkpoint
    message = _refusal(ckpt)
    assert "zero_to_fp32.py" in message and "higgs-ds export" in message


def test_swift_pipeline_user_errors_exit_2_with_one_line(capsys):
    from higgs_ds.errors import UserError
    from higgs_ds.train.swift.cli_hooks import _user_errors_exit

    def step(self):
        raise UserError("--dataset /x has no index.json: build it")

    with pytest.raises(SystemExit) as exited:
        _user_errors_exit(step)(None)
    assert exited.value.code == 2
    assert _one_error_line(capsys.readouterr().err) == "higgs-ds: error: --dataset /x has no index.json: build it"


@pytest.mark.parametrize("command", ["shards build --tokenizer", "check-export", "export --base"])
def test_every_command_that_reads_a_model_directory_refuses_one_with_code(tmp_path, tiny_model_dir, capsys, command):
    """`shards build --tokenizer DIR`, `check-export DIR` and a LoRA export's `--base DIR` read a model directory
    too: the same refusal, naming it, before anything in it is loaded."""
    from higgs_ds import cli
    from higgs_ds.tools.export import _merged_lora

    marker = tmp_path / "MARKER"
    model = hostile_model_dir(tmp_path, tiny_model_dir, marker)
    if command == "export --base":  # the LoRA merge step itself: the checkpoint is never reached
        with pytest.raises(Exception) as err:
            _merged_lora(tmp_path / "no-checkpoint", str(model))
        message = str(err.value)
    else:
        argv = {
            "shards build --tokenizer": ["shards", "build", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o")]
            + ["--codec", "tiny", "--tokenizer", str(model)],
            "check-export": ["check-export", str(model), "--probe", str(tmp_path / "probe.pt")],
        }[command]
        assert cli.main(argv) == 2
        message = _one_error_line(capsys.readouterr().err)
    assert str(model) in message and TOLD_TO_REMOVE in message
    assert not marker.exists() and not (tmp_path / "o").exists()
