"""Codec conversion between boson's HiggsAudioTokenizer and transformers' HiggsAudioV2TokenizerModel, checked
against boson's own code (issue #11, check 2: the converted codec gives boson's codes on the same audio).

The reference runs in the boson environment (tests/reference/boson_codec.py through tests/envs.py): boson's
tiny codec encodes demo clips and synthetic signals with its own `encode`. Here the same codec is converted
and encodes the same audio through higgs_ds.shards.codec's native path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_ds.models.convert import ConvertError
from higgs_ds.models.convert_codec import (
    BOSON_DEFAULTS,
    FEATURE_EXTRACTOR,
    HUBERT_MASK_TIME_PROB,
    KINDS,
    NATIVE_ACOUSTIC_DEFAULTS,
    NATIVE_DEFAULTS,
    TEACHER_PREFIX,
    boson_to_native_tensors,
    convert_codec,
    fold_weight_norm,
    module_table,
)
from higgs_ds.models.family import BOSON, NATIVE
from higgs_ds.shards.codec import RELEASED_CODEC_CONFIG, TINY_TEACHER_CONFIG, load_codec
from tests.envs import REFERENCE, run_in_env

SCRIPT = REFERENCE / "boson_codec.py"
RELEASE_TABLE = module_table(len(RELEASED_CODEC_CONFIG["ratios"]), RELEASED_CODEC_CONFIG["n_q"])


@pytest.fixture(scope="module")
def boson_reference(tmp_path_factory) -> dict:
    """boson's tiny codec's own codes (and decoded audio) for the demo clips and synthetic signals."""
    out = tmp_path_factory.mktemp("boson-codec") / "reference.npz"
    run_in_env(BOSON, [SCRIPT, "reference", out], timeout=400)
    with np.load(out) as ref:
        return {k: ref[k] for k in ref.files}


@pytest.fixture(scope="module")
def converted(boson_reference, tmp_path_factory) -> Path:
    return convert_codec(str(boson_reference["codec_dir"]), NATIVE, tmp_path_factory.mktemp("conv") / "native")


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------ equal to boson's own codes


@pytest.mark.native_env
@pytest.mark.timeout(600)
def test_converted_codec_gives_boson_codes(boson_reference, converted):
    """Every clip's codes from the converted codec equal boson's `encode` on the same audio: demo clips
    at 16, 22.05 and 44.1 kHz (read here as the builder reads them; equal to what boson's side read) and
    synthetic signals with and without boson's acoustic re-padding."""
    from higgs_ds.shards.audio import load_audio
    from tests.reference.boson_codec import AUDIO, CLIPS

    torch.set_num_threads(2)
    codec = load_codec(converted)
    assert codec.family == NATIVE and codec.provenance["format"] == NATIVE
    for name in CLIPS:
        np.testing.assert_array_equal(load_audio(AUDIO / name, 24000), boson_reference[f"wave_{Path(name).stem}"])
    names = list(boson_reference["names"])
    assert len(names) == 5
    for name in names:
        codes = codec.encode(boson_reference[f"wave_{name}"])
        np.testing.assert_array_equal(codes, boson_reference[f"codes_{name}"], err_msg=name)
        assert len(np.unique(codes)) > 10  # real codes, not a degenerate codebook


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_converted_codec_decodes_as_boson_does(boson_reference, converted):
    """The decoder converts too: boson's `decode` and the native one give the same waveform up to float
    rounding (measured: 2e-7 at a peak of 0.32; the two DAC implementations order their float ops apart)."""
    codec = load_codec(converted)
    decoded = [k[len("decoded_") :] for k in boson_reference if k.startswith("decoded_")]
    assert decoded
    for name in decoded:
        wave = codec.decode(boson_reference[f"codes_{name}"])
        frames = boson_reference[f"codes_{name}"].shape[1]
        assert wave.shape == boson_reference[f"decoded_{name}"].shape == (frames * 960,)
        np.testing.assert_allclose(wave, boson_reference[f"decoded_{name}"], rtol=0, atol=1e-5)


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_transformers_encode_agrees_where_it_does_not_repad(boson_reference, converted):
    """HiggsAudioV2TokenizerModel.encode itself gives boson's codes on the converted weights for clips whose
    acoustic branch needs no re-padding (1 s exactly; alice_001, 2 samples over a multiple of the hop): the
    modules and weights are the same, only its re-padding (hop / 2 a side, no trim) differs from boson's."""
    model = load_codec(converted).model
    for name in ("synthetic_24000", "alice_001"):
        with torch.inference_mode():
            own = model.encode(torch.from_numpy(boson_reference[f"wave_{name}"]).view(1, 1, -1), return_dict=False)
        np.testing.assert_array_equal(own[0].numpy(), boson_reference[f"codes_{name}"], err_msg=name)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_native_to_boson_to_native_is_bit_exact(tiny_codec, tmp_path):
    """Every tensor comes back bit for bit (weight norm unfolded as v = w, g = torch's own norm of w, so
    folding gives w exactly), and the config computes the same model."""
    from transformers import HiggsAudioV2TokenizerConfig

    boson = convert_codec(tiny_codec.path, BOSON, tmp_path / "boson")
    files = ["config.json", "higgs_ds_codec.json", "model.pth", "semantic_teacher"]
    assert sorted(p.name for p in boson.iterdir()) == files
    back = convert_codec(boson, NATIVE, tmp_path / "back")
    original, returned = _safetensors(Path(tiny_codec.path)), _safetensors(back)
    assert original.keys() == returned.keys()
    unequal = [k for k, t in original.items() if t.dtype != returned[k].dtype or not torch.equal(t, returned[k])]
    assert unequal == []
    bookkeeping = ("transformers_version", "_name_or_path", "architectures")
    configs = [HiggsAudioV2TokenizerConfig.from_pretrained(str(d)).to_dict() for d in (tiny_codec.path, back)]
    for config in configs:
        for sub in (config, config["acoustic_model_config"], config["semantic_model_config"]):
            for key in bookkeeping:
                sub.pop(key, None)
    assert configs[0] == configs[1]


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_boson_to_native_to_boson_keeps_every_effective_weight(boson_reference, converted, tmp_path):
    """Back to boson: the same keys; every tensor but the weight-norm pairs bit for bit; every DAC
    convolution's effective weight (what boson convolves with) bit for bit. The (g, v) pairs themselves
    are not kept: weight norm is not unique, and v's original scale is not in the native weight."""
    back = convert_codec(converted, BOSON, tmp_path / "back")
    original = torch.load(Path(str(boson_reference["codec_dir"])) / "model.pth", weights_only=True)
    returned = torch.load(back / "model.pth", weights_only=True)
    assert original.keys() == returned.keys()
    pairs = [k for k in original if k.endswith((".weight_g", ".weight_v"))]
    assert len(pairs) == 2 * sum(kind == "wn" for _, _, kind in RELEASE_TABLE)
    others = [k for k in original if k not in pairs and not torch.equal(original[k], returned[k])]
    assert others == []
    for g in (k for k in pairs if k.endswith("_g")):
        v = g[:-1] + "v"
        assert torch.equal(fold_weight_norm(original[g], original[v]), fold_weight_norm(returned[g], returned[v])), g


@pytest.mark.native_env
@pytest.mark.timeout(600)
def test_boson_encodes_a_converted_native_codec_alike(tiny_codec, tmp_path):
    """The other way, in boson's environment: this environment's tiny native codec converted to boson's
    format loads strictly there, and boson's own `encode` gives the native codes."""
    from tests.reference.boson_codec import waves

    boson_dir = convert_codec(tiny_codec.path, BOSON, tmp_path / "boson")
    given = waves()
    np.savez(tmp_path / "waves.npz", **{f"wave_{k}": v for k, v in given.items()})
    run_in_env(BOSON, [SCRIPT, "encode", boson_dir, tmp_path / "waves.npz", tmp_path / "codes.npz"], timeout=400)
    with np.load(tmp_path / "codes.npz") as boson_codes:
        assert sorted(boson_codes.files) == sorted(f"codes_{k}" for k in given)
        for name, wave in given.items():
            np.testing.assert_array_equal(tiny_codec.encode(wave), boson_codes[f"codes_{name}"], err_msg=name)


# ------------------------------------------------------------------------------ the table vs the real classes


@pytest.mark.native_env
@pytest.mark.timeout(120)
def test_key_table_and_defaults_match_the_native_class(tmp_path):
    from transformers import DacFeatureExtractor, HiggsAudioV2TokenizerConfig, HubertConfig

    from higgs_ds.models.convert_codec import boson_config, native_class_shapes, native_config

    for teacher in (TINY_TEACHER_CONFIG, {}):  # the tiny codec's and the release's (HuBERT-base)
        shapes = native_class_shapes(native_config(RELEASED_CODEC_CONFIG, teacher))
        table = {f"{native}.{p}" for _, native, kind in RELEASE_TABLE for p in KINDS[kind][1]}
        assert {k for k in shapes if not k.startswith(TEACHER_PREFIX)} == table
        assert f"{TEACHER_PREFIX}masked_spec_embed" in shapes  # boson's teacher has it too (HubertConfig's 0.05)
    defaults = HiggsAudioV2TokenizerConfig()
    for key, value in NATIVE_DEFAULTS.items():
        assert list(np.atleast_1d(getattr(defaults, key))) == list(np.atleast_1d(value)), key
    assert NATIVE_ACOUSTIC_DEFAULTS == HiggsAudioV2TokenizerConfig._default_acoustic_model_config_kwargs
    assert HUBERT_MASK_TIME_PROB == HubertConfig().mask_time_prob
    # the teacher boson gets computes what the native config builds, written out or left to the defaults
    for semantic in (None, {}, {"num_hidden_layers": 3, "mask_time_prob": 0.2}):
        native = {"model_type": "higgs_audio_v2_tokenizer", "target_bandwidths": [0.5, 1, 1.5, 2]}
        if semantic is not None:
            native["semantic_model_config"] = semantic
        built = HiggsAudioV2TokenizerConfig.from_dict(native).semantic_model_config
        teacher = HubertConfig(**boson_config(native)[1])
        assert (teacher.mask_time_prob, teacher.num_hidden_layers) == (built.mask_time_prob, built.num_hidden_layers)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR))
    extractor = DacFeatureExtractor.from_pretrained(str(tmp_path))
    assert (extractor.hop_length, extractor.sampling_rate, extractor.feature_size) == (960, 24000, 1)


@pytest.mark.boson_env
@pytest.mark.timeout(120)
def test_key_table_and_defaults_match_boson_class():
    import inspect

    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    from higgs_ds.models.convert_codec import boson_class_shapes

    shapes = boson_class_shapes(RELEASED_CODEC_CONFIG, TINY_TEACHER_CONFIG)
    table = {f"{boson}.{p}" for boson, _, kind in RELEASE_TABLE for p in KINDS[kind][0]}
    assert {k for k in shapes if not k.startswith(TEACHER_PREFIX)} == table
    signature = inspect.signature(HiggsAudioTokenizer.__init__).parameters
    assert {k: p.default for k, p in signature.items() if k not in ("self", "device")} == BOSON_DEFAULTS


@pytest.mark.boson_env
@pytest.mark.timeout(600)
def test_round_trip_in_the_boson_environment(tiny_codec, tmp_path):
    """Both directions work without transformers' native class (checked against boson's class instead):
    boson -> native -> boson loads strictly and gives the original codes."""
    native = convert_codec(tiny_codec.path, NATIVE, tmp_path / "native")
    assert json.loads((native / "config.json").read_text())["model_type"] == "higgs_audio_v2_tokenizer"
    back = load_codec(convert_codec(native, BOSON, tmp_path / "back"))
    wave = (np.random.RandomState(5).randn(30001) * 0.1).astype(np.float32)
    np.testing.assert_array_equal(back.encode(wave), tiny_codec.encode(wave))


# ------------------------------------------------------------------------------ refusals


def _boson_dir(path: Path, config: dict | None = None, teacher: dict | None = None, state=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(RELEASED_CODEC_CONFIG if config is None else config))
    if teacher is not None:
        (path / "semantic_teacher").mkdir()
        (path / "semantic_teacher" / "config.json").write_text(json.dumps(teacher))
    if state is None:
        (path / "model.pth").write_bytes(b"")  # refused settings are refused before the weights are read
    else:
        torch.save(state, path / "model.pth")
    return path


def _fake_boson_state(table=RELEASE_TABLE) -> dict:
    return {f"{boson}.{p}": torch.zeros(1, 1, 1) for boson, _, kind in table for p in KINDS[kind][0]}


@pytest.mark.both_envs
@pytest.mark.parametrize(
    "change, teacher, named",
    [
        ({"vq_scale": 2}, None, "vq_scale = 2: the native class computes only 1"),
        ({"semantic_techer": "wavlm_base_plus"}, None, 'semantic_techer = "wavlm_base_plus"'),
        ({"downsample_mode": "avg"}, None, 'downsample_mode = "avg"'),
        ({"bins": [8, 5, 5]}, None, "bins = \\[8, 5, 5\\]: finite scalar quantization"),
        ({"codebook_dim": None}, None, "codebook_dim = null"),
        ({"not_an_argument": 1}, None, "not_an_argument = 1: not a HiggsAudioTokenizer argument"),
        ({"ratios": [8, "5"]}, None, 'ratios / downsampling_ratios = "5": must be a positive integer'),
        ({}, {"hidden_size": 1024}, "hidden_size = 1024: boson's codec fixes it to 768"),
    ],
)
@pytest.mark.timeout(60)
def test_unconvertible_boson_settings_are_named(tmp_path, change, teacher, named):
    src = _boson_dir(tmp_path / "src", dict(RELEASED_CODEC_CONFIG, **change), teacher)
    with pytest.raises(ConvertError, match=named):
        convert_codec(src, NATIVE, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temp folder left


@pytest.mark.both_envs
@pytest.mark.parametrize(
    "change, named",
    [
        ({"acoustic_model_config": {"encoder_hidden_size": 32}}, "acoustic_model_config.encoder_hidden_size = 32"),
        ({"acoustic_model_config": {"upsampling_ratios": [8, 5, 4, 3, 2]}}, "upsampling_ratios = \\[8, 5, 4, 3, 2\\]"),
        ({"strides": [2, 1]}, "strides = \\[2, 1\\]: boson's semantic encoder fixes it to \\[1, 1\\]"),
        ({"semantic_model_config": {"model_type": "wavlm"}}, 'model_type = "wavlm"'),
        ({"codebook_dim": None}, "codebook_dim = null"),
    ],
)
@pytest.mark.timeout(60)
def test_unconvertible_native_settings_are_named(tmp_path, change, named):
    from higgs_ds.models.convert_codec import native_config

    config = native_config(RELEASED_CODEC_CONFIG, TINY_TEACHER_CONFIG)
    for key, value in change.items():
        config[key] = dict(config[key], **value) if isinstance(value, dict) else value
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConvertError, match=named):
        convert_codec(src, BOSON, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.both_envs
@pytest.mark.timeout(60)
def test_unmappable_missing_and_half_weight_norm_keys_are_named():
    state = _fake_boson_state()
    with pytest.raises(ConvertError, match="weights no boson-format codec holds: extra.weight"):
        boson_to_native_tensors(dict(state, **{"extra.weight": torch.zeros(1)}), RELEASE_TABLE, "src")
    with pytest.raises(ConvertError, match="missing weights fc_prior.weight:"):
        boson_to_native_tensors({k: v for k, v in state.items() if k != "fc_prior.weight"}, RELEASE_TABLE, "src")
    half = {k: v for k, v in state.items() if k != "encoder.block.7.weight_v"}
    with pytest.raises(ConvertError, match="missing weights encoder.block.7.weight_v:"):
        boson_to_native_tensors(half, RELEASE_TABLE, "src")
    # a DAC conv's plain weight is not boson's (its convs are weight-normed)
    with pytest.raises(ConvertError, match="holds: encoder.block.7.weight"):
        boson_to_native_tensors(dict(state, **{"encoder.block.7.weight": torch.zeros(1)}), RELEASE_TABLE, "src")
    native = boson_to_native_tensors(state, RELEASE_TABLE, "src")
    assert "acoustic_encoder.conv2.weight" in native and "quantizer.quantizers.7.codebook.embed" in native


@pytest.mark.both_envs
@pytest.mark.timeout(60)
def test_a_bad_checkpoint_is_named_and_nothing_is_left(tmp_path):
    src = _boson_dir(tmp_path / "extra", state=dict(_fake_boson_state(), **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(ConvertError, match=f"{src}: weights no boson-format codec holds: extra.weight"):
        convert_codec(src, NATIVE, tmp_path / "out")
    pickled = _boson_dir(tmp_path / "pickled", state={"fc_prior.weight": Path("not a tensor")})
    with pytest.raises(ConvertError, match="model.pth: not a loadable weights-only checkpoint"):
        convert_codec(pickled, NATIVE, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra", "pickled"]


@pytest.mark.both_envs
@pytest.mark.timeout(60)
def test_out_and_direction_refusals(tmp_path):
    src = _boson_dir(tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="exists and is not an empty folder"):
        convert_codec(src, NATIVE, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConvertError, match="lies inside or contains"):
        convert_codec(src, NATIVE, src / "converted")
    with pytest.raises(ConvertError, match="already a boson-format codec"):
        convert_codec(src, BOSON, tmp_path / "out")
    with pytest.raises(ConvertError, match="--to 'onnx'"):
        convert_codec(src, "onnx", tmp_path / "out")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert_codec(tmp_path / "nothing", NATIVE, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "nothing", "src"]
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.pth"]
