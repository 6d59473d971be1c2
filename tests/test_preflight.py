"""`higgs-ds preflight`: refuses bad shard sets and impossible plans with a message that says what to do (user
errors exit 2, a run that does not fit exits 1), and its disk and memory estimates follow what the run holds and
saves: checked against DeepSpeed's own estimators and against a real LoRA checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from higgs_ds.errors import CheckFailed, UserError
from higgs_ds.tools import preflight as pf
from higgs_ds.tools.preflight import run

from .conftest import REPO, train_cmd, train_env

GiB = 2**30


def _args(model, shards, out, *extra):
    return ["--model", str(model), "--output_dir", str(out), "--data.shards", json.dumps([str(shards)]), *extra]


@pytest.fixture(scope="module")
def released_model_dir(tmp_path_factory):
    """The released Higgs-Audio v2 architecture (5.77 B parameters) as a config only, in this environment's
    family's format: no weights are written."""
    from higgs_ds.models.family import NATIVE, environment_family
    from higgs_ds.models.tiny import RELEASED_TEXT, build_tiny_tokenizer

    if environment_family() == NATIVE:
        from higgs_ds.models.native.tiny import native_config as config_of
    else:
        from higgs_ds.models.tiny import model_config as config_of
    out = tmp_path_factory.mktemp("released-config")
    config_of(build_tiny_tokenizer(), RELEASED_TEXT).save_pretrained(out)
    assert not list(out.glob("*.safetensors"))
    return out


def _meta_sizes(model_dir) -> tuple[int, int]:
    """(all parameters, the largest module's own parameters), counted here as DeepSpeed's model_to_params does
    (which cannot run on the meta device: it tells parameters apart by data_ptr)."""
    import torch
    from transformers import AutoConfig

    from higgs_ds.models.family import NATIVE, model_family, register_auto_classes

    register_auto_classes()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if model_family(model_dir) == NATIVE:
            from transformers import HiggsAudioV2ForConditionalGeneration

            model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
        else:
            from boson_multimodal.model.higgs_audio import HiggsAudioModel

            model = HiggsAudioModel(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _plan(stdout: str) -> dict:
    """The plan preflight prints (other libraries may log lines before it)."""
    start = stdout.index("{\n")
    return json.loads(stdout[start : stdout.index("\n}", start) + 2])


def test_preflight_accepts_a_good_setup_and_prints_the_plan(tiny_model_dir, small_shards, tmp_path, capsys):
    assert (
        run(
            str(REPO / "configs" / "demo.toml"),
            _args(tiny_model_dir, small_shards, tmp_path / "o"),
            nodes=1,
            gpus_per_node=2,
            gpu_memory_gb=80,
            hashes=True,
        )
        == 0
    )
    out = capsys.readouterr().out
    plan = _plan(out)
    assert plan["ranks"] == 2 and plan["samples"] == 8 and plan["micro_batches_per_rank_per_epoch"] == 1
    assert plan["expanded_positions_per_optimizer_step"] > 0 and "preflight: OK" in out
    assert plan["dtype_assumed"] == "float32" and plan["checkpoints_kept"] == 1  # demo.toml: 40 steps, save every 40


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("corrupt", UserError, "differs from its index.json (sha256)"),
        ("missing", UserError, "is listed in index.json but missing: restore it, or rebuild it"),
        ("fifo", UserError, "is a fifo, not a regular file"),
        ("dev-zero", UserError, "is a symbolic link to /dev/zero, outside"),
        ("codec", UserError, "codebook_size=2048, the model expects 1024: rebuild them with the model's codec"),
        ("deepspeed", UserError, "zero_optimization.stage is 'three', not 0-3: fix the file"),
        ("too_few", CheckFailed, "fewer than its 4 dataloader workers: lower data.num_workers"),
    ],
)
def test_preflight_refuses_with_what_to_do(damage, error, message, tiny_model_dir, small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    extra = []
    named = shards
    if damage == "corrupt":
        data = bytearray((shards / "shard-000001.tar").read_bytes())
        data[700] ^= 1
        (shards / "shard-000001.tar").write_bytes(bytes(data))
        named = shards / "shard-000001.tar"
    elif damage == "missing":
        (shards / "shard-000002.tar").unlink()
        named = shards / "shard-000002.tar"
    elif damage in ("fifo", "dev-zero"):  # with --hashes: hashing either would never end
        named = shards / "shard-000002.tar"
        named.unlink()
        os.mkfifo(named) if damage == "fifo" else named.symlink_to("/dev/zero")
    elif damage == "codec":
        index = json.loads((shards / "index.json").read_text())
        index["codec"]["codebook_size"] = 2048
        (shards / "index.json").write_text(json.dumps(index))
    elif damage == "deepspeed":
        named = tmp_path / "ds.json"
        named.write_text(json.dumps({"zero_optimization": {"stage": "three"}}))
        extra = ["--deepspeed", str(named)]
    else:
        extra = ["--data.num_workers", "4"]
        named = "4 dataloader workers"
    with pytest.raises(error) as raised:
        run(
            str(REPO / "configs" / "demo.toml"),
            _args(tiny_model_dir, shards, tmp_path / "o", *extra),
            nodes=2,
            gpus_per_node=2,
            gpu_memory_gb=80,
            hashes=True,
        )
    assert message in str(raised.value) and str(named) in str(raised.value), raised.value
    assert not (tmp_path / "o").exists()  # preflight writes nothing


@pytest.mark.timeout(600)  # the shard fixture may be built here; the check itself takes well under a second
@pytest.mark.parametrize("name", ["/dev/zero", "../outside.tar", "sub/shard.tar", 7])
def test_preflight_never_follows_an_index_out_of_its_directory(name, tiny_model_dir, small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (tmp_path / "outside.tar").write_bytes(b"x")
    index = json.loads((shards / "index.json").read_text())
    index["shards"][0]["file"] = name
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as raised:  # with --hashes: hashing /dev/zero would never end
        run(str(REPO / "configs" / "demo.toml"), _args(tiny_model_dir, shards, tmp_path / "o"), 1, 2, 80, True)
    # named by the index and the entry, whichever layer (index schema or preflight) refuses it first
    assert str(shards / "index.json") in str(raised.value) and str(name) in str(raised.value), raised.value


@pytest.mark.timeout(600)  # with the session's shard fixture built on a loaded 2-core box
def test_cli_exit_codes_user_error_2_and_failed_check_1(tiny_model_dir, small_shards, tmp_path):
    """One `higgs-ds: ...` line on stderr, no traceback: 2 for a wrong input, 1 for a run that does not fit."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (shards / "shard-000002.tar").unlink()
    cli = [sys.executable, "-m", "higgs_ds.cli", "preflight", str(REPO / "configs" / "demo.toml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

    def preflight(*args):
        return subprocess.run(cli + list(args), env=env, capture_output=True, text=True, timeout=150, cwd=REPO)

    missing = preflight(*_args(tiny_model_dir, shards, tmp_path / "o"), "--nodes", "1", "--gpus-per-node", "2")
    assert missing.returncode == 2, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert lines[-1].startswith("higgs-ds: error: shard ") and str(shards / "shard-000002.tar") in lines[-1]
    assert "rebuild it" in lines[-1] and "Traceback" not in missing.stderr

    # 1e-5 GB per GPU cannot hold even the tiny model: a check that fails, with the plan printed first
    small = preflight(*_args(tiny_model_dir, small_shards, tmp_path / "o"), "--gpu-memory-gb", "1e-5")
    assert small.returncode == 1, small.stdout + small.stderr
    lines = small.stderr.strip().splitlines()
    assert lines[-1].startswith("higgs-ds: check failed: preflight: model states need about"), lines
    assert "per GPU" in lines[-1] and "ds_configs/zero3_offload.json" in lines[-1] and "Traceback" not in small.stderr
    assert _plan(small.stdout)["gpu_memory_source"] == "given (--gpu-memory-gb)"


def _cold_table(capsys, total, largest, gpus, nodes) -> dict:
    """estimate_zero3_model_states_mem_needs_all_cold's printed table: {options: GB per GPU}."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus, num_nodes=nodes)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and cells[1].endswith("GB") and "offload" in cells[2]:
            rows[" ".join(cells[2].split())] = float(cells[1].removesuffix("GB"))
    return rows


@pytest.mark.parametrize("gpus, nodes", [(8, 1), (8, 4), (1, 1)])
def test_model_states_match_deepspeeds_estimators_for_the_released_model(released_model_dir, gpus, nodes, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = _meta_sizes(released_model_dir)
    assert total == 5_771_283_456  # the released checkpoint's parameter count (shard index total_size / 2)
    sizes = pf.model_sizes(str(released_model_dir))
    world = gpus * nodes

    def ours(stage, offload_optimizer=False, offload_param=False):
        zero = pf.ZeroSettings(True, stage, offload_optimizer, offload_param)
        return pf.model_states_bytes(sizes, zero, world, gpus, dtype_bytes=2)

    table = _cold_table(capsys, total, largest, gpus, nodes)
    assert ours(3) / GiB == pytest.approx(table["offload_param=none, offload_optimizer=none, zero_init=1"], abs=0.01)
    for offload_optimizer, offload_param in [(False, False), (True, False), (True, True)]:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param
        )
        assert ours(3, offload_optimizer, offload_param) == pytest.approx(gpu, rel=1e-6)
    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        assert ours(2, offload) == pytest.approx(gpu, rel=1e-6)

    # LoRA keeps every weight but optimizer state for its adapters only: between the estimators' figures for a
    # model of the trainable size and of the whole size (all other parameters frozen weights)
    lora = pf.model_sizes(str(released_model_dir), "lora")
    assert 0 < lora.trainable < total / 100
    zero3 = pf.ZeroSettings(True, 3)
    _, only_adapters, _ = estimate_zero3_model_states_mem_needs(lora.trainable, largest, gpus, nodes, False, False)
    _, everything, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, False, False)
    assert only_adapters < pf.model_states_bytes(lora, zero3, world, gpus, 2) < everything


def _release_args(model, shards, out, *extra):
    return _args(model, shards, out, "--dtype", "bfloat16", "--max_steps", "1000", "--save_steps", "500", *extra)


def test_lora_on_the_released_model_fits_where_only_its_adapters_are_saved(
    released_model_dir, small_shards, tmp_path, capsys, monkeypatch
):
    """The issue's case: tuner = "lora" on the released config asked for 193.5 GB of disk; a LoRA checkpoint
    holds the adapters and their optimizer state, well under a GB. 20 GB free is plenty for it, and still too
    little for the full fine-tune's checkpoints, which are refused with what to change."""
    free = 20 * GiB
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free, total=free, used=0))
    config = str(REPO / "configs" / "demo.toml")
    args = _release_args(released_model_dir, small_shards, tmp_path / "o", "--tuner", "lora")
    assert run(config, args, nodes=1, gpus_per_node=8, gpu_memory_gb=80) == 0
    out = capsys.readouterr().out
    plan = _plan(out)
    assert plan["parameters"] == 5_771_283_456 and plan["checkpoints_kept"] == 2, plan
    assert plan["disk_gb_needed"] < 1 and plan["zero_stage"] == 3, plan

    with pytest.raises(CheckFailed) as refused:
        run(config, args[:-2], nodes=1, gpus_per_node=8, gpu_memory_gb=80)
    assert "has 20.0 GB free; the checkpoints this run keeps need about" in str(refused.value)
    assert str((tmp_path / "o").parent) in str(refused.value) and "save_total_limit" in str(refused.value)


def test_gpu_memory_is_the_devices_present_or_a_stated_assumption(
    released_model_dir, small_shards, tmp_path, capsys, monkeypatch
):
    import torch

    config, args = str(REPO / "configs" / "demo.toml"), _release_args(released_model_dir, small_shards, tmp_path / "o")
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10**15))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(config, args, nodes=1, gpus_per_node=8, gpu_memory_gb=None) == 0
    out = capsys.readouterr().out
    plan = _plan(out)
    assert plan["gpu_memory_gb"] == 80 and "assumed" in plan["gpu_memory_source"]
    assert "pass --gpu-memory-gb" in plan["gpu_memory_source"]

    # two 24 GB cards here: the full model's ZeRO-3 states on 2 GPUs (~44 GB each) do not fit, on 8 they do
    cards = [types.SimpleNamespace(total_memory=24 * GiB, name="Card24"), types.SimpleNamespace(total_memory=48 * GiB)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cards[i])
    with pytest.raises(CheckFailed) as refused:
        run(config, args, nodes=1, gpus_per_node=2, gpu_memory_gb=None)
    assert "over 80% of 24 GB (measured: Card24, the smallest of 2 GPU(s) here)" in str(refused.value)
    assert "ds_configs/zero3_offload.json" in str(refused.value)
    capsys.readouterr()
    assert run(config, args, nodes=1, gpus_per_node=8, gpu_memory_gb=None) == 0
    assert '"gpu_memory_gb": 24.0' in capsys.readouterr().out


def _sizes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_estimate_matches_a_real_lora_checkpoint(tmp_path, small_shards, tiny_model_dir):
    """A 2-rank ZeRO-3 LoRA run of the tiny model (float32): the estimate's parts against the files written."""
    out = tmp_path / "lora"
    overrides = ("--max_steps", "2", "--save_steps", "2", "--data.batch_size", "2", "--tuner", "lora")
    env = train_env(0)
    del env["MASTER_PORT"]  # one node, no port given: torchrun.sh lets torchrun pick a free one (--standalone)
    trained = subprocess.run(
        train_cmd(out, tiny_model_dir, small_shards, *overrides, "--save_probe", "false"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    sizes = pf.model_sizes(str(tiny_model_dir), "lora")
    parts = pf.checkpoint_bytes(sizes, pf.zero_settings(str(REPO / "ds_configs" / "zero3.json")), "lora", 4)
    adapters = _sizes([ckpt / "adapter_model.safetensors"])
    optimizer = _sizes((ckpt / "global_step2").glob("*optim_states.pt"))
    assert adapters > 0 and optimizer > 0
    assert parts["weights"] == pytest.approx(adapters, rel=0.1), (parts, adapters)
    assert parts["optimizer"] == pytest.approx(optimizer, rel=0.25), (parts, optimizer)
    everything = _sizes(Path(ckpt).rglob("*"))
    full = pf.checkpoint_bytes(pf.model_sizes(str(tiny_model_dir)), pf.zero_settings(""), "full", 4)
    assert sum(parts.values()) < everything < sum(full.values())  # far below what all weights would take
