"""Boson's own codec on fixed audio, for tests/test_codec_convert.py (runs in the boson environment).

    python tests/reference/boson_codec.py reference OUT.npz
        The tiny boson codec (higgs_ds.shards.codec.resolve_codec("tiny"): boson_multimodal's
        HiggsAudioTokenizer, built once into the cache) encodes CLIPS of the demo corpus (read with
        higgs_ds.shards.audio at 24 kHz) and SYNTHETIC signals with its own `encode` (batch 1, the upstream
        path), and decodes the first clips' codes with its own `decode`. OUT.npz: codec_dir, names,
        wave_NAME, codes_NAME (int64 (8, T)), decoded_NAME.
    python tests/reference/boson_codec.py encode CODEC_DIR WAVES.npz OUT.npz
        Loads CODEC_DIR with higgs_ds.shards.codec.load_codec (strict) and encodes every wave_NAME of WAVES.npz
        with boson's own `encode`: OUT.npz holds codes_NAME.

Plain arrays only (np.savez, no pickles).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from higgs_ds.shards.audio import load_audio  # noqa: E402
from higgs_ds.shards.codec import load_codec, resolve_codec  # noqa: E402

AUDIO = REPO / "shards" / "demo" / "audio"
# FLAC 22.05 kHz, WAV 16 kHz, stereo WAV 44.1 kHz: none a multiple of the 960-sample hop at 24 kHz
CLIPS = ("alice_001.flac", "bob_009.wav", "carol_016.wav")
DECODED = 2  # clips whose codes are decoded too


def synthetic() -> dict[str, np.ndarray]:
    """A chirp in noise, 1 s exactly (960 x 25: no acoustic re-padding) and 30001 samples (re-padded)."""
    rng = np.random.RandomState(11)
    out = {}
    for n in (24000, 30001):
        t = np.arange(n) / 24000
        out[f"synthetic_{n}"] = (0.3 * np.sin(2 * np.pi * (150 + 300 * t) * t) + 0.05 * rng.randn(n)).astype(np.float32)
    return out


def waves() -> dict[str, np.ndarray]:
    clips = {Path(name).stem: load_audio(AUDIO / name, 24000) for name in CLIPS}
    return {**clips, **synthetic()}


def boson_encode(codec, wave: np.ndarray) -> np.ndarray:
    return codec.model.encode(wave, sr=24000).cpu().numpy().astype(np.int64)  # upstream, batch 1


def reference(out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    codec = resolve_codec("tiny")
    out = {"codec_dir": np.array(codec.path)}
    named = waves()
    out["names"] = np.array(list(named))
    for i, (name, wave) in enumerate(named.items()):
        out[f"wave_{name}"], out[f"codes_{name}"] = wave, boson_encode(codec, wave)
        if i < DECODED:
            with torch.no_grad():
                decoded = codec.model.decode(torch.from_numpy(out[f"codes_{name}"])[None])  # numpy (1, 1, n)
            out[f"decoded_{name}"] = np.asarray(decoded[0, 0], dtype=np.float32)
    np.savez(out_path, **out)


def encode(codec_dir: str, waves_path: str, out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    codec = load_codec(codec_dir)
    given = np.load(waves_path)
    codes = {f"codes_{k[5:]}": boson_encode(codec, given[k]) for k in given.files if k.startswith("wave_")}
    np.savez(out_path, **codes)


if __name__ == "__main__":
    {"reference": reference, "encode": encode}[sys.argv[1]](*sys.argv[2:])
