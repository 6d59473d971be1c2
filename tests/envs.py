"""Running code in the other model family's environment, for the checks against boson's reference code.

The native family (.venv, transformers 5.x) and boson's (.venv-boson, boson_multimodal on transformers 4.46)
cannot share one Python environment, so a cross-family check runs a script from tests/reference/ in the
other venv, which writes plain data (.npz / .json / safetensors) that the test compares.

Where is the other interpreter: $HIGGS_DS_NATIVE_PYTHON / $HIGGS_DS_BOSON_PYTHON, else REPO/.venv or
REPO/.venv-boson. When it is missing the test is skipped, unless HIGGS_DS_REQUIRE_BOTH_ENVS=1 (set by
`make test`), where a missing environment is a failure: CI never passes by skipping the reference checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_ds.models.family import BOSON, NATIVE, environment_family

REPO = Path(__file__).resolve().parent.parent
VENVS = {NATIVE: ".venv", BOSON: ".venv-boson"}
ENV_VARS = {NATIVE: "HIGGS_DS_NATIVE_PYTHON", BOSON: "HIGGS_DS_BOSON_PYTHON"}
REQUIRE_BOTH = "HIGGS_DS_REQUIRE_BOTH_ENVS"
REFERENCE = REPO / "tests" / "reference"


def here() -> str:
    return environment_family()


def other(family: str | None = None) -> str:
    return BOSON if (family or here()) == NATIVE else NATIVE


def env_python(family: str) -> Path:
    """The interpreter of `family`'s environment (this one's own when it is this environment); skips the
    test (fails it under HIGGS_DS_REQUIRE_BOTH_ENVS=1) when that environment is not installed."""
    if family == here():
        return Path(sys.executable)
    path = Path(os.environ.get(ENV_VARS[family]) or REPO / VENVS[family] / "bin" / "python")
    if not path.is_file():
        message = f"the {family} environment is not installed ({path}); `make test` creates it"
        if os.environ.get(REQUIRE_BOTH) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def other_python(family: str | None = None) -> Path:
    return env_python(other(family))


def run_in_env(family: str, args: list[str], timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python ARGS...` in `family`'s environment; fails the test with the output when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(env_python(family)), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{family} environment: {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
        )
    return proc


# The SWIFT model type of this environment's family (registered by higgs_ds.train.swift.register).
SWIFT_MODEL_TYPE = {NATIVE: "higgs_audio_v2", BOSON: "higgs_audio"}[environment_family()]


def load_tiny(model_dir):
    """(tokenizer, config, model) of a model directory of this environment's family, loaded as training does."""
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.models.family import model_family

    tok = AutoTokenizer.from_pretrained(model_dir)
    if model_family(model_dir) == NATIVE:
        from higgs_ds.models.native.load import load_native_model

        return tok, AutoConfig.from_pretrained(model_dir), load_native_model(model_dir)
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers the "higgs_audio" config
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    return tok, AutoConfig.from_pretrained(model_dir), HiggsAudioModel.from_pretrained(model_dir)


def decoder_layers(model):
    """The decoder layers of either family's model (native: model.model.layers; boson: model.layers)."""
    return model.model.layers if hasattr(model, "model") else model.layers
