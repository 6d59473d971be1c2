"""Shard-build throughput, printed as one JSON object.

    python bench/shard_build.py [--clips 120] [--codec-clips 4] [--codec-seconds 4] [--repeats 3]

Every path is timed alike (bench/common.py): 1 warm-up pass, then the median of `--repeats` timed passes;
librosa, soundfile, torch and the codec are imported and built before any clock starts.

* cpu_stages: decode (libsndfile) + resample to 24 kHz (soxr) + tar write, one process with one thread,
  codec excluded (codes of the right shape stand in), on generated 3-15 s FLAC clips at 22.05 and 44.1 kHz,
  in process-CPU seconds; the baseline is the same work through librosa.load(sr=24000), the path boson's
  HiggsAudioTokenizer.encode takes for a file.
* codec: the same equal-length clips encoded as one batch (encode_batch) vs one at a time (encode), the tiny
  codec (the released codec architecture with a 2-layer HuBERT teacher), on this machine's device; both
  paths warmed the same way, and their codes checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, timing_settings  # noqa: E402  (bench/common.py)


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


def cpu_stages(clips, work: Path, use_librosa: bool):
    """Decode, resample and write every clip into a shard (a fresh folder per pass)."""
    import librosa

    from higgs_ds.shards.audio import load_audio
    from higgs_ds.shards.writer import ShardWriter

    passes = iter(range(10**6))

    def prepare():
        out = work / f"{'librosa' if use_librosa else 'ours'}{next(passes)}"

        def run():
            writer = ShardWriter(out, max_samples=10**9)
            for i, (path, _) in enumerate(clips):
                if use_librosa:
                    wave, _ = librosa.load(path, sr=24000, mono=True)
                else:
                    wave = load_audio(path, 24000)
                codes = np.zeros((8, -(-len(wave) // 960)), dtype=np.uint16)  # the codec's output shape
                record = {"id": str(i), "audio": [], "target_frames": codes.shape[1]}
                writer.write(f"{i:09d}", record, codes, len(wave) / 24000)
            writer.close()

        return run

    return prepare


def codec_paths(num: int, seconds: float, device: str, repeats: int) -> dict:
    import torch

    from higgs_ds.shards.codec import resolve_codec

    codec = resolve_codec("tiny", device=device)
    waves = (np.random.RandomState(1).randn(num, int(seconds * 24000)) * 0.1).astype(np.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    outputs = {}

    def path(name, encode):
        def prepare():
            sync()

            def run():
                outputs[name] = encode()
                sync()

            return run

        return prepare

    single = measure(path("single", lambda: [codec.encode(w) for w in waves]), repeats=repeats)
    batched = measure(path("batched", lambda: codec.encode_batch(waves)), repeats=repeats)
    assert all((a == b).all() for a, b in zip(outputs["single"], outputs["batched"])), "batched codes differ"
    audio = num * seconds
    return {
        "batched_speedup": round(single["wall_s"] / batched["wall_s"], 2),
        "batched_audio_seconds_per_s": round(audio / batched["wall_s"], 2),
        "baseline_batch1_audio_seconds_per_s": round(audio / single["wall_s"], 2),
        "batch": num,
        "clip_seconds": seconds,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "passes_wall_s": {"batch1": single["passes_wall_s"], "batched": batched["passes_wall_s"]},
    }


NOTES = {
    "timing": "every path: 1 warm-up pass untimed, then the median of the timed passes; imports (librosa, "
    "soundfile, torch) and codec loading before any clock",
    "cpu_stages": "audio-hours of input per core-minute (process CPU time, one thread) to decode, resample to "
    "24 kHz and write shards, codec excluded; baseline: librosa.load(sr=24000) doing the same",
    "codec": "the tiny codec (released architecture, 2-layer HuBERT teacher) encoding `batch` equal-length "
    "clips as one batch vs one at a time, wall time on `device`; the two give identical codes (checked)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--codec-clips", type=int, default=4)  # 8 ran 4m48 on the shared 2-core box
    p.add_argument("--codec-seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (after 1 warm-up); median")
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import librosa  # noqa: F401  (imported before any clock starts)
    import torch

    torch.set_num_threads(1)  # per-core figures for the CPU stages
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = make_clips(tmp, args.clips)
        hours = sum(s for _, s in clips) / 3600
        ours = measure(cpu_stages(clips, tmp, use_librosa=False), repeats=args.repeats)
        base = measure(cpu_stages(clips, tmp, use_librosa=True), repeats=args.repeats)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "settings": {
            "cpu_clips": args.clips,
            "cpu_audio_hours": round(hours, 3),
            "cpu_clip_seconds": "uniform 3-15, FLAC at 22.05 and 44.1 kHz",
            **timing_settings(1, args.repeats),
        },
        "machine": machine(),
        "cpu_stages": {
            "audio_hours_per_core_minute": round(hours / (ours["cpu_s"] / 60), 2),
            "baseline_librosa_audio_hours_per_core_minute": round(hours / (base["cpu_s"] / 60), 2),
            "speedup_over_librosa": round(base["cpu_s"] / ours["cpu_s"], 2),
            "passes_wall_s": {"ours": ours["passes_wall_s"], "librosa": base["passes_wall_s"]},
        },
        "codec": codec_paths(args.codec_clips, args.codec_seconds, args.device, args.repeats),
        "notes": NOTES,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
