"""Shared fixtures: the tiny real model, the tiny codec and a small shard set, built once per session."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The verified/checked-shard records of the test run (and of the training processes it starts) go to a
# folder of its own, removed at the end: tests never write to the user's ~/.cache/higgs-ds.
_CACHE = tempfile.mkdtemp(prefix="higgs-ds-test-cache-")
os.environ["HIGGS_DS_CACHE"] = _CACHE

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "shards" / "demo"


def pytest_configure(config):
    config.addinivalue_line("markers", "native_env: needs the native family's environment (transformers 5.x)")
    config.addinivalue_line("markers", "boson_env: needs boson's environment (boson_multimodal, transformers 4.46)")
    config.addinivalue_line("markers", "both_envs: run in each family's environment (`make test` runs it in both)")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    from higgs_ds.models.family import environment_family

    here = environment_family()
    for item in items:
        for family in ("native", "boson"):
            if family != here and item.get_closest_marker(f"{family}_env"):
                item.add_marker(pytest.mark.skip(reason=f"runs in the {family} environment (this one is {here})"))


def demo_lines(ids: set[str]) -> list[dict]:
    lines = [json.loads(line) for line in (DEMO / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if line["misc"]["id"] in ids]


def write_manifest(folder: Path, lines: list, name: str = "manifest.jsonl") -> Path:
    """A manifest in `folder` whose audio lives in a copy of the demo audio folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "audio").exists():
        shutil.copytree(DEMO / "audio", folder / "audio")
    path = folder / name
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


# 6 utterances (every speaker, flac, 16 kHz wav and 44.1 kHz stereo wav) + 2 voice-cloning samples
SMALL_IDS = {
    "alice_001",
    "alice_004",
    "bob_002",
    "bob_016",
    "carol_003",
    "carol_009",
    "clone_alice_003",
    "clone_bob_009",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from higgs_ds.models.tiny import write_tiny  # this environment's family: native in .venv, boson's in .venv-boson

    return write_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    """A tiny random-weight Higgs TTS 3 model in the released layout (native environment only: Qwen3)."""
    from higgs_ds.models.v3.tiny_model import write_tiny_v3_model

    return write_tiny_v3_model(tmp_path_factory.mktemp("tiny-v3"))


@pytest.fixture(scope="session")
def tiny_codec():
    import torch

    from higgs_ds.shards.codec import resolve_codec

    torch.set_num_threads(2)
    return resolve_codec("tiny")


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("small"), demo_lines(SMALL_IDS))


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, small_manifest, tiny_codec, tiny_model_dir):
    from higgs_ds.shards.build import BuildConfig, build_shards

    out = tmp_path_factory.mktemp("small-shards")
    build_shards(
        [str(small_manifest)],
        str(out),
        "tiny",
        BuildConfig(shard_samples=3, tokenizer=str(tiny_model_dir)),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def shards16(tmp_path_factory, tiny_codec, tiny_model_dir):
    """16 plain utterances of the demo corpus in 4 shards: epochs long enough to stop and resume inside one."""
    from higgs_ds.shards.build import BuildConfig, build_shards

    lines = [json.loads(x) for x in (DEMO / "manifest.jsonl").read_text().splitlines() if x.strip()]
    ids = sorted(line["misc"]["id"] for line in lines if "clone" not in line["misc"]["id"])[:16]
    manifest = write_manifest(tmp_path_factory.mktemp("m16"), demo_lines(set(ids)))
    out = tmp_path_factory.mktemp("shards16")
    build_shards([str(manifest)], str(out), "tiny", BuildConfig(shard_samples=4, tokenizer=str(tiny_model_dir)),
                 progress=False)  # fmt: skip
    return out


def train_env(port: int) -> dict:
    """Offline, one thread per rank, 2 ranks per node, the interpreter of this test run."""
    import sys

    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        NPROC_PER_NODE="2",
        MASTER_PORT=str(port),
    )


def train_cmd(out: Path, model_dir: Path, shards: Path, *overrides: str) -> list[str]:
    """`launch/torchrun.sh configs/demo.toml` with the given model, shards, output dir and overrides."""
    return [
        "bash",
        str(REPO / "launch" / "torchrun.sh"),
        str(REPO / "configs" / "demo.toml"),
        "--model",
        str(model_dir),
        "--output_dir",
        str(out),
        "--data.shards",
        json.dumps([str(shards)]),
        *overrides,
    ]


def torchrun_train(out: Path, model_dir: Path, shards: Path, *overrides: str, port: int, timeout: int = 540):
    """train_cmd on 2 CPU ranks of one node; fails the test with the log's tail if training fails."""
    import subprocess

    run = subprocess.run(
        train_cmd(out, model_dir, shards, *overrides),
        cwd=REPO,
        env=train_env(port),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr
