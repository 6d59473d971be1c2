"""`higgs-ds preflight`: refuses bad shard sets and impossible plans with a message that says what to do."""

import json
import shutil

import pytest

from higgs_ds.preflight import model_states_gb, run

from .conftest import REPO


def _args(model, shards, out):
    return ["--model", str(model), "--output_dir", str(out), "--data.shards", json.dumps([str(shards)])]


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
    plan = json.loads(out[: out.rindex("}") + 1])
    assert plan["ranks"] == 2 and plan["samples"] == 8 and plan["micro_batches_per_rank_per_epoch"] == 1
    assert plan["expanded_positions_per_optimizer_step"] > 0 and "preflight: OK" in out


@pytest.mark.parametrize(
    "damage, message",
    [
        ("corrupt", "differs from its index.json (sha256)"),
        ("missing", "listed in its index.json but missing"),
        ("codec", "codebook_size=2048, the model expects 1024: rebuild them with the model's codec"),
        ("too_few", "fewer than its 4 dataloader workers: lower data.num_workers"),
    ],
)
def test_preflight_refuses_with_what_to_do(damage, message, tiny_model_dir, small_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    extra = []
    if damage == "corrupt":
        data = bytearray((shards / "shard-000001.tar").read_bytes())
        data[700] ^= 1
        (shards / "shard-000001.tar").write_bytes(bytes(data))
    elif damage == "missing":
        (shards / "shard-000002.tar").unlink()
    elif damage == "codec":
        index = json.loads((shards / "index.json").read_text())
        index["codec"]["codebook_size"] = 2048
        (shards / "index.json").write_text(json.dumps(index))
    else:
        extra = ["--data.num_workers", "4"]
    assert (
        run(
            str(REPO / "configs" / "demo.toml"),
            _args(tiny_model_dir, shards, tmp_path / "o") + extra,
            nodes=2,
            gpus_per_node=2,
            gpu_memory_gb=80,
            hashes=True,
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "preflight: FAIL" in out and message in out, out


def test_memory_estimate_for_the_released_size():
    params = 5_771_283_456  # Higgs-Audio v2 generation 3B base (higgs-audio notes, 1.2)
    zero3 = {"stage": 3}
    assert model_states_gb(params, params, zero3, world=8, per_node=8) == pytest.approx(16 * params / 8 / 2**30)
    assert model_states_gb(params, params, {"stage": 0}, world=8, per_node=8) > 80  # plain data parallel: no fit
    assert model_states_gb(params, params, {"stage": 2}, world=8, per_node=8) == pytest.approx(
        (2 * params + 14 * params / 8) / 2**30
    )
    offload = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert model_states_gb(params, params, offload, world=8, per_node=8) < 3
