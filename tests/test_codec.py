"""Stage: the Higgs audio codec of this environment's format, tiny and with random seeded weights: the real
HiggsAudioV2TokenizerModel in the native environment, boson's HiggsAudioTokenizer in the boson one (both with
a 2-layer HuBERT teacher). That the two give the same codes on the same weights: tests/test_codec_convert.py."""

import json
import shutil

import numpy as np
import pytest
import torch

from higgs_ds.shards.codec import CodecError, load_codec
from tests.envs import here


def one_at_a_time(codec, wave: np.ndarray) -> np.ndarray:
    """The class's own batch-1 encoding: boson's upstream `encode`, or, native, our one-clip encode (equal to
    boson's on the same weights: tests/test_codec_convert.py)."""
    if codec.family == "boson":
        return codec.model.encode(wave, sr=24000).cpu().numpy().astype(np.uint16)
    return codec.encode(wave)


@pytest.mark.both_envs
@pytest.mark.timeout(120)
def test_codes_shape_dtype_and_determinism(tiny_codec):
    wave = np.random.RandomState(0).randn(24000).astype(np.float32) * 0.1
    codes = tiny_codec.encode(wave)
    assert tiny_codec.family == here()
    assert codes.dtype == np.uint16 and codes.shape == (8, 25)
    assert codes.max() < 1024 and len(np.unique(codes)) > 20  # spread over the codebooks, not one code
    np.testing.assert_array_equal(codes, tiny_codec.encode(wave))
    assert tiny_codec.provenance["frame_rate"] == 25 and tiny_codec.provenance["hop_length"] == 960
    assert tiny_codec.provenance["codebook_size"] == 1024 and tiny_codec.provenance["num_codebooks"] == 8
    assert tiny_codec.provenance["format"] == here()
    assert len(tiny_codec.provenance["weights_sha256"]) == 64


@pytest.mark.boson_env
@pytest.mark.timeout(300)
def test_batched_encoding_equals_upstream_batch_one(tiny_codec):
    """Clips of equal length encoded together give the upstream one-at-a-time codes, including lengths
    where upstream re-pads its acoustic branch (not a multiple of the hop)."""
    rng = np.random.RandomState(1)
    for n in (24000, 30001, 12345):
        waves = rng.randn(2, n).astype(np.float32) * 0.1
        batched = tiny_codec.encode_batch(waves)
        for i in range(2):
            np.testing.assert_array_equal(batched[i], one_at_a_time(tiny_codec, waves[i]))


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_native_batches_equal_clips_as_one_at_a_time(tiny_codec):
    """HiggsAudioV2TokenizerModel has no padding mask: a batch of equal-length clips (re-padded lengths
    included) gives each clip's own codes, and where no re-padding happens they are transformers' own
    `encode`'s too."""
    rng = np.random.RandomState(1)
    for n in (30001, 12345):
        waves = rng.randn(2, n).astype(np.float32) * 0.1
        batched = tiny_codec.encode_batch(waves)
        for i in range(2):
            np.testing.assert_array_equal(batched[i], tiny_codec.encode(waves[i]))
    with torch.inference_mode():
        own = tiny_codec.model.encode(torch.from_numpy(waves[:, None]), return_dict=False)
    np.testing.assert_array_equal(own.numpy(), batched)  # 12345 samples: no re-padding


@pytest.mark.both_envs
@pytest.mark.timeout(120)
def test_decode_gives_the_waveform_of_the_codes(tiny_codec):
    from higgs_ds.eval.generate import decode

    codes = tiny_codec.encode(np.random.RandomState(2).randn(24000).astype(np.float32) * 0.1)
    wave = tiny_codec.decode(codes)
    assert wave.dtype == np.float32 and wave.shape == (25 * 960,) and np.isfinite(wave).all() and wave.std() > 0
    np.testing.assert_array_equal(decode(tiny_codec, codes), wave)  # eval's decode goes through it
    np.testing.assert_array_equal(tiny_codec.decode(codes[:, :10]), tiny_codec.decode(codes[:, :10]))


@pytest.mark.boson_env
@pytest.mark.timeout(300)
def test_strict_loading_names_missing_and_unexpected_keys(tiny_codec, tmp_path):
    src = tiny_codec.path
    state = torch.load(f"{src}/model.pth", weights_only=True)

    missing = tmp_path / "missing"
    shutil.copytree(src, missing, ignore=shutil.ignore_patterns("model.pth"))
    torch.save({k: v for k, v in state.items() if k != "fc_prior.weight"}, missing / "model.pth")
    with pytest.raises(CodecError, match="1 missing keys.*fc_prior.weight"):
        load_codec(missing)

    extra = tmp_path / "extra"
    shutil.copytree(src, extra, ignore=shutil.ignore_patterns("model.pth"))
    torch.save(dict(state, **{"not_a_module.weight": torch.zeros(1)}), extra / "model.pth")
    with pytest.raises(CodecError, match="1 unexpected keys.*not_a_module.weight"):
        load_codec(extra)

    no_weights = tmp_path / "no-weights"
    shutil.copytree(src, no_weights, ignore=shutil.ignore_patterns("model.pth"))
    with pytest.raises(CodecError, match="no model.safetensors or model.pth"):
        load_codec(no_weights)
    with pytest.raises(CodecError, match="does not exist"):
        load_codec(tmp_path / "nowhere")


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_native_strict_loading_names_missing_unexpected_and_misshaped_keys(tiny_codec, tmp_path):
    """Refused from the safetensors headers, before from_pretrained could fill a missing weight at random."""
    from safetensors.torch import load_file, save_file

    src = tiny_codec.path
    state = load_file(f"{src}/model.safetensors")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "fc.weight"}, "missing fc.weight"),
        "extra": (dict(state, **{"not_a_module.weight": torch.zeros(1)}), "unexpected not_a_module.weight"),
        "shape": (dict(state, **{"fc2.bias": torch.zeros(3)}), "shape of fc2.bias is \\[3\\] in the checkpoint"),
    }
    for name, (tensors, named) in cases.items():
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("model.safetensors"))
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        with pytest.raises(CodecError, match=f"do not match the HiggsAudioV2TokenizerModel.*{named}"):
            load_codec(tmp_path / name)
    shutil.copytree(src, tmp_path / "none", ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(CodecError, match="has no model.safetensors: a native-format codec holds"):
        load_codec(tmp_path / "none")
    with pytest.raises(CodecError, match="does not exist"):
        load_codec(tmp_path / "nowhere")


@pytest.mark.native_env
@pytest.mark.timeout(300)
def test_native_geometry_and_empty_codebooks_are_refused(tiny_codec, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_codec.path
    shutil.copytree(src, tmp_path / "zeros", ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(f"{src}/model.safetensors")
    state["quantizer.quantizers.0.codebook.embed"] = torch.zeros_like(state["quantizer.quantizers.0.codebook.embed"])
    save_file(state, str(tmp_path / "zeros" / "model.safetensors"))
    with pytest.raises(CodecError, match="all-zero codebooks.*quantizer.quantizers.0.codebook.embed"):
        load_codec(tmp_path / "zeros")
    shutil.copytree(src, tmp_path / "16", ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((tmp_path / "16" / "config.json").read_text())
    (tmp_path / "16" / "config.json").write_text(json.dumps(dict(config, target_bandwidths=[0.5, 1, 1.5, 2, 4])))
    (tmp_path / "16" / "model.safetensors").symlink_to(f"{src}/model.safetensors")
    with pytest.raises(CodecError, match="has 16 codebooks at 24000 Hz, 25 frames/s; Higgs-Audio v2 needs 8"):
        load_codec(tmp_path / "16")


@pytest.mark.both_envs
@pytest.mark.timeout(60)
def test_a_codec_of_the_other_format_says_how_to_convert_it(tmp_path):
    """The boson environment cannot load a native directory, nor the native one boson's: one line naming the
    directory and the conversion."""
    other = "boson" if here() == "native" else "native"
    codec = tmp_path / "codec"
    codec.mkdir()
    if other == "boson":
        (codec / "config.json").write_text(json.dumps({"n_q": 8, "bins": 1024, "sample_rate": 24000}))
        (codec / "model.pth").write_bytes(b"")
    else:
        (codec / "config.json").write_text(json.dumps({"model_type": "higgs_audio_v2_tokenizer"}))
        (codec / "model.safetensors").write_bytes(b"")
    named = f"{codec} is a {other}-format .*codec.*`higgs-ds convert {codec} --to {here()} --out"
    with pytest.raises(CodecError, match=named):
        load_codec(codec)


@pytest.mark.both_envs
@pytest.mark.timeout(120)
def test_codes_do_not_depend_on_what_was_encoded_first(tiny_codec, tmp_path):
    rng = np.random.RandomState(7)
    a, b = (rng.randn(24000).astype(np.float32) * 0.1 for _ in range(2))
    first, second = load_codec(tiny_codec.path), load_codec(tiny_codec.path)
    a_first = first.encode(a)
    second.encode(b)
    np.testing.assert_array_equal(second.encode(a), a_first)


@pytest.mark.boson_env
@pytest.mark.timeout(300)
def test_uninitialised_codebooks_are_refused(tiny_codec, tmp_path):
    state = torch.load(f"{tiny_codec.path}/model.pth", weights_only=True)
    shutil.copytree(tiny_codec.path, tmp_path / "raw", ignore=shutil.ignore_patterns("model.pth"))
    torch.save(
        {k: torch.zeros_like(v) if k.endswith("inited") else v for k, v in state.items()},
        tmp_path / "raw" / "model.pth",
    )
    with pytest.raises(CodecError, match="uninitialised codebooks"):
        load_codec(tmp_path / "raw")


@pytest.mark.both_envs
@pytest.mark.timeout(300)
def test_builder_groups_mixed_length_clips_and_matches_one_at_a_time(tiny_codec, tmp_path):
    """The builder's chunk encoder batches clips of exactly equal length (here: two pairs) and encodes the
    rest alone; every clip's codes equal the class's own one-at-a-time encoding."""
    import soundfile as sf

    from higgs_ds.shards.build import BuildConfig, _encode_clips, _init_worker

    rng = np.random.RandomState(3)
    paths = []
    for i, samples in enumerate([24000, 24000, 30011, 30011, 17000]):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, (rng.randn(samples) * 0.1).astype(np.float32), 24000, subtype="FLOAT")
        paths.append(str(path))
    _init_worker("tiny", "cpu", None, 2)
    clips = _encode_clips(paths, BuildConfig(codec_batch=16))  # batches on the CPU too (its default: 1)
    for path in paths:
        wave, _ = sf.read(path, dtype="float32")
        np.testing.assert_array_equal(clips[path][0], one_at_a_time(tiny_codec, wave))
