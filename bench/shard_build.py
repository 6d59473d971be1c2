"""Shard-build throughput, printed as one JSON object.

    python bench/shard_build.py [--clips 120] [--codec-clips 8] [--codec-seconds 4]

* cpu_audio_hours_per_core_minute: decode (libsndfile) + resample to 24 kHz (soxr) + tar write, one
  process with one thread, codec excluded (codes of the right shape stand in), on generated 3-15 s FLAC
  clips at 22.05 and 44.1 kHz; baseline_librosa_audio_hours_per_core_minute is the same work through
  librosa.load(sr=24000), the path boson's HiggsAudioTokenizer.encode takes for a file.
* codec_batched_speedup: the same equal-length clips encoded as one batch vs one at a time (the tiny
  codec: the released codec architecture with a 2-layer HuBERT teacher), codec_audio_seconds_per_s for
  the batched run and baseline_codec_audio_seconds_per_s for batch 1, on this machine's device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clips(folder: Path, count: int, seed: int = 0) -> list[tuple[Path, float]]:
    import soundfile as sf

    rng = np.random.RandomState(seed)
    clips = []
    for i in range(count):
        rate = (22050, 44100)[i % 2]
        seconds = float(rng.uniform(3, 15))
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(90, 300) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        wave += 0.02 * rng.randn(len(t))
        path = folder / f"clip{i:04d}.flac"
        sf.write(path, wave.astype(np.float32), rate)
        clips.append((path, seconds))
    return clips


def cpu_stages(clips, out: Path, use_librosa: bool) -> float:
    """Seconds of one-thread work to decode, resample and write every clip into a shard."""
    from higgs_ds.shards.audio import load_audio
    from higgs_ds.shards.writer import ShardWriter

    writer = ShardWriter(out, max_samples=10**9)
    start = time.process_time()
    for i, (path, _) in enumerate(clips):
        if use_librosa:
            import librosa

            wave, _ = librosa.load(path, sr=24000, mono=True)
        else:
            wave = load_audio(path, 24000)
        codes = np.zeros((8, -(-len(wave) // 960)), dtype=np.uint16)  # the codec's output shape, codec excluded
        writer.write(f"{i:09d}", {"id": str(i), "audio": [], "target_frames": codes.shape[1]}, codes, len(wave) / 24000)
    writer.close()
    return time.process_time() - start


def codec_batching(num: int, seconds: float, device: str) -> dict:
    import torch

    from higgs_ds.shards.codec import resolve_codec

    codec = resolve_codec("tiny", device=device)
    waves = (np.random.RandomState(1).randn(num, int(seconds * 24000)) * 0.1).astype(np.float32)
    codec.encode_batch(waves[:2])  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    single = [codec.encode(w) for w in waves]
    sync()
    t1 = time.perf_counter()
    batched = codec.encode_batch(waves)
    sync()
    t2 = time.perf_counter()
    assert all((a == b).all() for a, b in zip(single, batched)), "batched codes differ from batch-1 codes"
    audio = num * seconds
    return {
        "codec_batched_speedup": round((t1 - t0) / (t2 - t1), 2),
        "codec_audio_seconds_per_s": round(audio / (t2 - t1), 2),
        "baseline_codec_audio_seconds_per_s": round(audio / (t1 - t0), 2),
        "codec_batch": num,
        "codec_clip_seconds": seconds,
        "codec_device": device,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--codec-clips", type=int, default=8)
    p.add_argument("--codec-seconds", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # per-core figures for the CPU stages
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = make_clips(tmp, args.clips)
        hours = sum(s for _, s in clips) / 3600
        ours = cpu_stages(clips, tmp / "ours", use_librosa=False)
        base = cpu_stages(clips, tmp / "base", use_librosa=True)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "cpu_audio_hours_per_core_minute": round(hours / (ours / 60), 2),
        "baseline_librosa_audio_hours_per_core_minute": round(hours / (base / 60), 2),
        "cpu_clips": args.clips,
        "cpu_audio_hours": round(hours, 3),
    }
    result |= codec_batching(args.codec_clips, args.codec_seconds, args.device)
    result |= {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads_codec": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
