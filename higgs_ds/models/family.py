"""Which model family a directory holds, and which one this environment trains.

Two families of Higgs-Audio v2 checkpoints exist, and no single Python environment can load both:

* `native`: the transformers-native format Boson publishes since April 2026 on the `main` branch of
  bosonai/higgs-audio-v2-generation-3B-base (`HiggsAudioV2ForConditionalGeneration`, config
  `model_type` "higgs_audio_v2", transformers >= 5.3) and its codec bosonai/higgs-audio-v2-tokenizer
  (`HiggsAudioV2TokenizerModel`, `model_type` "higgs_audio_v2_tokenizer"). The default environment (.venv).
* `boson`: boson_multimodal 0.1.1's `HiggsAudioModel` (config `model_type` "higgs_audio"), the format of
  revision 10840182 of the model, 9d4988fb of the codec (config.json + model.pth, no model_type), and of
  every community fine-tune made with boson's code. Needs transformers < 4.47: its own environment
  (`make boson` -> .venv-boson).

A third family is Boson's current model, Higgs TTS 3 (`v3`: config `model_type` "higgs_multimodal_qwen3",
bosonai/higgs-tts-3-4b): transformers' Qwen3 backbone plus higgs_ds.models.v3's fused codebook table. It
needs transformers >= 4.51 (Qwen3), so the default environment trains it beside the native family.

The family is read from config.json (JSON only, nothing executed). A directory of the other family is a
one-line UserError saying which environment or conversion to use.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from higgs_ds.errors import UserError

NATIVE, BOSON, V3 = "native", "boson", "v3"
FAMILIES = (NATIVE, BOSON)  # the Higgs-Audio v2 formats, converted into each other (`higgs-ds convert --to`)
ALL_FAMILIES = (NATIVE, BOSON, V3)  # every family higgs-ds trains (`--family` choices)
MODEL_TYPES = {"higgs_audio_v2": NATIVE, "higgs_audio": BOSON, "higgs_multimodal_qwen3": V3}
NATIVE_CODEC_TYPE = "higgs_audio_v2_tokenizer"
BOSON_VENV = ".venv-boson"
ENVIRONMENT_HELP = {
    NATIVE: "the default environment (`make install` -> .venv, `pip install 'higgs-ds[native]'`)",
    BOSON: f"the boson environment (`make boson` -> {BOSON_VENV}, `pip install 'higgs-ds[boson]'`)",
    V3: "the default environment (`make install` -> .venv, `pip install 'higgs-ds[native]'`)",
}
# the environment that trains each family (the default one trains the native and the v3 family)
TRAINED_IN = {NATIVE: NATIVE, BOSON: BOSON, V3: NATIVE}


class FamilyError(UserError):
    """A model or codec directory of an unknown family, or of the family this environment does not train."""


def _config(path: Path) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FamilyError(f"{path}: no config.json: not a Higgs-Audio model or codec directory")
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FamilyError(f"{config}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise FamilyError(f"{config}: not a JSON object")
    return value


def model_family(model_dir: str | Path) -> str:
    """NATIVE, BOSON or V3, from config.json's model_type."""
    model_type = _config(Path(model_dir)).get("model_type")
    family = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise FamilyError(
            f"{model_dir}/config.json: model_type {model_type!r} is not a Higgs-Audio v2 or Higgs TTS 3 model "
            f"(expected one of {sorted(MODEL_TYPES)})"
        )
    return family


def codec_family(codec_dir: str | Path) -> str:
    """NATIVE (config.json with model_type higgs_audio_v2_tokenizer) or BOSON (boson's config.json of
    HiggsAudioTokenizer arguments, weights in model.pth)."""
    config = _config(Path(codec_dir))
    if config.get("model_type") == NATIVE_CODEC_TYPE:
        return NATIVE
    if "model_type" not in config and (Path(codec_dir) / "model.pth").is_file():
        return BOSON
    raise FamilyError(
        f"{codec_dir}: neither a native Higgs-Audio v2 codec (config.json model_type {NATIVE_CODEC_TYPE!r}) "
        "nor a boson-format one (config.json + model.pth)"
    )


def environment_family() -> str:
    """The family this Python environment trains: boson's when boson_multimodal is installed (it pins
    transformers < 4.47), the native one otherwise."""
    try:
        metadata.version("boson-multimodal")
        return BOSON
    except metadata.PackageNotFoundError:
        return NATIVE


def _wrong_family(kind: str, path, family: str, here: str) -> FamilyError:
    if family == V3:
        return FamilyError(f"{path} is a Higgs TTS 3 model, which {ENVIRONMENT_HELP[V3]} trains")
    return FamilyError(
        f"{path} is a {family}-format Higgs-Audio v2 {kind}, and this environment trains the {here} format: "
        f"use {ENVIRONMENT_HELP[family]}, or convert it with `higgs-ds convert {path} --to {here} --out DIR`"
    )


def require_model_family(model_dir: str | Path) -> str:
    """The directory's family, when this environment can load it; else a FamilyError saying what to do."""
    family, here = model_family(model_dir), environment_family()
    if TRAINED_IN[family] != here:
        raise _wrong_family("model", model_dir, family, here)
    return family


def require_codec_family(codec_dir: str | Path) -> str:
    family, here = codec_family(codec_dir), environment_family()
    if family != here:
        raise _wrong_family("codec", codec_dir, family, here)
    return family


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel know this environment's families: boson's classes register themselves when
    imported; the native ones are part of transformers; the v3 config is ours, registered locally (never
    trust_remote_code)."""
    if environment_family() == BOSON:
        import boson_multimodal.model.higgs_audio  # noqa: F401
    else:
        from higgs_ds.models.v3.modeling import register_v3

        register_v3()
