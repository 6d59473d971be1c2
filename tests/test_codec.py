"""Stage: the Higgs audio codec (real HiggsAudioTokenizer class, tiny teacher, random seeded weights)."""

import shutil

import numpy as np
import pytest
import torch

from higgs_ds.shards.codec import CodecError, load_codec


def test_codes_shape_dtype_and_determinism(tiny_codec):
    wave = np.random.RandomState(0).randn(24000).astype(np.float32) * 0.1
    codes = tiny_codec.encode(wave)
    assert codes.dtype == np.uint16 and codes.shape == (8, 25)
    assert codes.max() < 1024
    np.testing.assert_array_equal(codes, tiny_codec.encode(wave))
    assert tiny_codec.provenance["frame_rate"] == 25 and tiny_codec.provenance["hop_length"] == 960
    assert len(tiny_codec.provenance["weights_sha256"]) == 64


def test_batched_encoding_equals_upstream_batch_one(tiny_codec):
    """Clips of equal length encoded together give the upstream one-at-a-time codes, including lengths
    where upstream re-pads its acoustic branch (not a multiple of the hop)."""
    rng = np.random.RandomState(1)
    for n in (24000, 30001, 12345):
        waves = rng.randn(3, n).astype(np.float32) * 0.1
        batched = tiny_codec.encode_batch(waves)
        for i in range(3):
            upstream = tiny_codec.model.encode(waves[i], sr=24000).cpu().numpy()  # boson's own encode, batch 1
            np.testing.assert_array_equal(batched[i], upstream.astype(np.uint16))


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
    with pytest.raises(CodecError, match="no model.pth"):
        load_codec(no_weights)
    with pytest.raises(CodecError, match="does not exist"):
        load_codec(tmp_path / "nowhere")


def test_codes_do_not_depend_on_what_was_encoded_first(tiny_codec, tmp_path):
    rng = np.random.RandomState(7)
    a, b = (rng.randn(24000 * 2).astype(np.float32) * 0.1 for _ in range(2))
    first, second = load_codec(tiny_codec.path), load_codec(tiny_codec.path)
    a_first = first.encode(a)
    second.encode(b)
    np.testing.assert_array_equal(second.encode(a), a_first)


def test_uninitialised_codebooks_are_refused(tiny_codec, tmp_path):
    state = torch.load(f"{tiny_codec.path}/model.pth", weights_only=True)
    shutil.copytree(tiny_codec.path, tmp_path / "raw", ignore=shutil.ignore_patterns("model.pth"))
    torch.save(
        {k: torch.zeros_like(v) if k.endswith("inited") else v for k, v in state.items()},
        tmp_path / "raw" / "model.pth",
    )
    with pytest.raises(CodecError, match="uninitialised codebooks"):
        load_codec(tmp_path / "raw")


def test_builder_groups_mixed_length_clips_and_matches_one_at_a_time(tiny_codec, tmp_path):
    """The builder's chunk encoder batches clips of exactly equal length (here: two pairs) and encodes the
    rest alone; every clip's codes equal boson's own one-at-a-time encode."""
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
        np.testing.assert_array_equal(clips[path][0], tiny_codec.model.encode(wave, sr=24000).cpu().numpy())
