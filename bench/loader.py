"""Training-stream throughput against real floors, printed as one JSON object.

    python bench/loader.py [--samples 4000] [--seed-samples 1] [--max-tokens 8192] [--repeats 3]

On generated shards of realistic sizes (1-20 s of audio per sample, ~40 characters of text, the codes of a
25 Hz 8-codebook codec, token ids stored at build time as `shards build --tokenizer` does), in one process
with one thread. Every path gets the same timing (bench/common.py: 1 warm-up pass, then the median of
`--repeats` timed passes; imports, tokenizer and model loading outside the clock):

* floors.bytes: every shard file read whole, sequentially in 8 MiB reads, page cache warm, no parsing;
* floors.reader: the reader's own member table (higgs_ds.stream.reader.member_table, rebuilt each pass as a
  fresh worker does: header scan, + sha256 with --verify-shards always; with "once" (the default) the warm-up
  pass hashes and records each shard in an empty cache and the timed passes scan headers only) and one seek +
  one read per sample in the epoch plan's order, no decoding;
* floors.random_reads: one os.pread per sample of exactly its members' bytes, in the plan's order, files open;
* stream: the training path itself, build_dataloader -> ShardStream (shards checked whole on this machine:
  one read a sample and two views, higgs_ds.stream.checked_read; else read_positions with every check +
  SampleEncoder on the stored token ids) -> this environment's family collator, with budget batching
  (--max-tokens), num_workers=0: one loader core; and its stages timed apart (the strict path too);
* headroom: what one H100 consumes at the MFU goal, tokens/s = MFU x peak / (6 x params), converted to
  samples/s with these shards' mean expanded tokens per sample;
* seed_path: the seed design (per sample: read the audio, resample with librosa, encode with the released
  codec architecture on this CPU, tokenize, collate) against ours charged with the real shard build once
  (higgs_ds.shards.build with the same codec, per sample) plus E epochs of the stream, for each E;
* padding: real / padded positions for budget batching, fixed batches of the same mean size in the epoch's
  random order, and fixed batches of that size over the same length-sorted windows budget batching uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, timing_settings  # noqa: E402  (bench/common.py)

# The GPU side of the headroom: the MFU goal of issue #12 on one H100 SXM.
H100_BF16_DENSE_FLOPS = 989e12
MFU_GOAL = 0.45
MODEL_PARAMS = 5.8e9  # the released Higgs-Audio v2 generation model: 5,771,283,456 parameters
EPOCHS = (1, 10)
SEED_CLIP_SECONDS = 10.5  # the mean clip of the generated shards (uniform 1-20 s)


def make_shards(
    out: Path, model_dir: Path, num: int, seed: int = 0, min_seconds: float = 1, max_seconds: float = 20
) -> None:
    from transformers import AutoTokenizer

    from higgs_ds.models.tiny import CODEBOOK_SIZE
    from higgs_ds.shards.writer import ShardWriter, write_index
    from higgs_ds.stream.tokens import chatml_tokens, expanded_length, tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.RandomState(seed)
    words = "the quick brown fox jumps over a lazy dog while seven bright birds sing near old stone walls".split()
    writer = ShardWriter(out, max_samples=250)
    for i in range(num):
        seconds = float(rng.uniform(min_seconds, max_seconds))
        frames = int(np.ceil(seconds * 25))
        text = " ".join(rng.choice(words, size=int(rng.randint(4, 12))))
        chatml = {
            "messages": [
                {"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": text},
                {"role": "assistant", "content": {"type": "audio", "audio_url": f"a/{i}.flac"}},
            ],
            "speaker": f"spk{i % 20}",
        }
        input_ids, label_ids, _ = chatml_tokens(chatml, tok)
        record = dict(
            chatml,
            id=f"s{i}",
            audio=[{"url": f"a/{i}.flac", "frames": frames, "seconds": seconds}],
            target_frames=frames,
            expanded_length=expanded_length(len(input_ids), [frames]),
            input_ids=input_ids,
            label_ids=label_ids,
        )
        codes = rng.randint(0, CODEBOOK_SIZE, size=(8, frames)).astype(np.uint16)
        writer.write(f"{i:09d}", record, codes, seconds)
    shards = writer.close()
    write_index(
        out / "index.json",
        shards,
        {
            "num_codebooks": 8,
            "codebook_size": 1024,
            "frame_rate": 25,
            "sample_rate": 24000,
            "hop_length": 960,
            "codec": "generated",
        },
        {"tokenizer_fingerprint": tokenizer_fingerprint(tok)},
    )


# ------------------------------------------------------------------------------------------ floors


def byte_floor(paths: list[str]):
    """Each shard read whole into one reused 8 MiB buffer: the cost of the bytes alone."""
    buffer = bytearray(8 << 20)

    def prepare():
        def run():
            for path in paths:
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buffer):
                        pass

        return run

    return prepare


def reader_floor(refs, positions: list[tuple[int, int]]):
    """The reader's member table and one seek + read per sample (read_positions without the decoding)."""
    from higgs_ds.stream.reader import member_table

    def prepare():
        member_table.cache_clear()  # each epoch's fresh workers rebuild it

        def run():
            handles = {}
            try:
                for s, i in positions:
                    members = member_table(refs[s].path)[i]
                    f = handles.get(s) or handles.setdefault(s, open(refs[s].path, "rb"))
                    first = members[0][2]
                    f.seek(first)
                    f.read(members[-1][2] + members[-1][3] - first)
            finally:
                for f in handles.values():
                    f.close()

        return run

    return prepare


# ------------------------------------------------------------------------------------------ the stream


def random_read_floor(refs, positions: list[tuple[int, int]]):
    """One os.pread per sample of exactly its members' bytes, in the epoch plan's order, every file held open:
    what random access to the samples costs in system calls and copies, before any parsing."""
    from higgs_ds.stream.reader import member_table

    spans = {}
    for s, i in positions:
        members = member_table(refs[s].path)[i]
        spans[s, i] = (members[0][2], members[-1][2] + members[-1][3] - members[0][2])
    order = [(s, *spans[s, i]) for s, i in positions]

    def prepare():
        fds = {s: os.open(refs[s].path, os.O_RDONLY) for s in {s for s, _ in positions}}

        def run():
            try:
                for s, start, length in order:
                    os.pread(fds[s], length, start)
            finally:
                for fd in fds.values():
                    os.close(fd)

        return run

    return prepare


def _fresh_worker() -> None:
    """Forget what this process has opened, as each epoch's new dataloader worker starts."""
    from higgs_ds.stream import checked_read
    from higgs_ds.stream.reader import member_table

    member_table.cache_clear()
    checked_read.clear()


def stream(shards: Path, tok, config, max_tokens: int, collator: str, counted: list, verify: str):
    """The training path, a fresh loader per pass (as each epoch's workers are fresh)."""
    from higgs_ds.stream.loader import DataConfig, build_dataloader

    cfg = DataConfig(shards=[str(shards)], max_tokens=max_tokens, num_workers=0, collator=collator,
                     verify_shards=verify)  # fmt: skip

    def prepare():
        _fresh_worker()
        loader = build_dataloader(cfg, tok, config, rank=0, world_size=1)  # index + epoch plan: outside

        def run():
            counted.append(sum(batch["input_ids"].shape[0] for batch in loader))

        return run

    return prepare


def stream_stages(shards: Path, tok, config, max_tokens: int, collator: str, timing: dict, verify: str) -> dict:
    """The stream's time by stage, each timed alone over the same epoch plan (what a profile would split),
    microseconds per sample: read_encode = what the stream itself does per batch (ShardStream.read_batch:
    checked shards without decoding, else the strict read + SampleEncoder), as a fresh worker; the strict
    path apart (strict_read: read_positions with member tables rebuilt, every sample decoded and checked;
    strict_encode: SampleEncoder on those records), as a shard not yet checked on this machine is read;
    collate: the family's collator on the encoded batches."""
    from higgs_ds.models.interface import make_collator
    from higgs_ds.stream.loader import DataConfig, ShardStream
    from higgs_ds.stream.reader import member_table, read_positions

    cfg = DataConfig(shards=[str(shards)], max_tokens=max_tokens, num_workers=0, verify_shards=verify)
    stream = ShardStream(cfg, tok, rank=0, world_size=1)
    batches, collate = list(stream.plan().batches), make_collator(config, tok, collator)
    records = [list(read_positions(stream.refs, b, vocab_size=stream.vocab_size)) for b in batches]
    encoded = [[stream.encode(r) for r in batch] for batch in records]
    collate(encoded[0])  # the fast collator's one check against boson's, outside the clock

    def read_encode():
        _fresh_worker()
        return lambda: [stream.read_batch(b) for b in batches]

    def strict_read():
        member_table.cache_clear()
        return lambda: [list(read_positions(stream.refs, b, vocab_size=stream.vocab_size)) for b in batches]

    stages = {
        "read_encode": read_encode,
        "strict_read": strict_read,
        "strict_encode": lambda: lambda: [[stream.encode(r) for r in batch] for batch in records],
        "collate": lambda: lambda: [collate(batch) for batch in encoded],
    }
    n = sum(len(b) for b in batches)
    return {name: round(measure(prepare, **timing)["wall_s"] / n * 1e6, 2) for name, prepare in stages.items()}


# ------------------------------------------------------------------------------------------ the seed path


def released_size_codec():
    """The released codec architecture (full HuBERT-base teacher) with seeded random weights, in this
    environment's family, as the builder's Codec; its codebooks fitted once, as the tiny codec's are, so
    encoding cost is that of the real codec (the weights' values do not change it)."""
    import torch

    from higgs_ds.models.family import NATIVE, environment_family
    from higgs_ds.shards import codec as codec_module

    family = environment_family()
    signal = codec_module._fitting_signal().view(1, 1, -1)
    torch.manual_seed(0)
    if family == NATIVE:
        from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

        from higgs_ds.models.convert_codec import native_config

        config = native_config(codec_module.RELEASED_CODEC_CONFIG, {"mask_time_prob": 0.0})  # HuBERT-base
        model = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig.from_dict(config)).eval()
        codec_module._fit_native_codebooks(model, signal, 0)
    else:
        model = codec_module._construct(codec_module.RELEASED_CODEC_CONFIG, {}, "cpu").eval()
        with torch.inference_mode():
            model._xcodec_encode(signal)  # boson's k-means codebook init happens on the first batch
    provenance = {
        "codec": "released-architecture-random-weights",
        "codec_path": "(in memory)",
        "format": family,
        "weights_sha256": "seeded-random-0",
        "sample_rate": 24000,
        "hop_length": 960,
        "frame_rate": 25,
        "num_codebooks": 8,
        "codebook_size": 1024,
    }
    return codec_module.Codec(model=model, path="(in memory)", provenance=provenance, family=family)


def seed_clips(folder: Path, num: int) -> tuple[Path, list[dict]]:
    """`num` FLAC clips of the mean length at 22.05 kHz (a common corpus rate) and their manifest."""
    import soundfile as sf

    (folder / "audio").mkdir(parents=True)
    rng = np.random.RandomState(1)
    lines = []
    for i in range(num):
        wave = (rng.randn(int(22050 * SEED_CLIP_SECONDS)) * 0.1).astype(np.float32)
        sf.write(folder / "audio" / f"seed{i}.flac", wave, 22050)
        lines.append(
            {
                "messages": [
                    {"role": "system", "content": "Generate audio following instruction."},
                    {"role": "user", "content": "the quick brown fox jumps over a lazy dog"},
                    {"role": "assistant", "content": {"type": "audio", "audio_url": f"audio/seed{i}.flac"}},
                ],
                "speaker": "spk0",
            }
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, lines


def seed_path(codec, tok, collate, manifest: Path, lines: list[dict]):
    """Per sample, every epoch: read + resample (librosa, as boson's encode does), encode, tokenize, collate."""
    import librosa

    from higgs_ds.stream.tokens import EncodedSample, chatml_tokens

    def prepare():
        def run():
            samples = []
            for line in lines:
                url = line["messages"][2]["content"]["audio_url"]
                wave, _ = librosa.load(manifest.parent / url, sr=24000, mono=True)
                codes = codec.encode(wave)
                ids, labels, _ = chatml_tokens(line, tok)
                ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
                samples.append(EncodedSample(None, ids, labels, codes, [codes.shape[1]]))
            collate(samples)

        return run

    return prepare


def shard_build(codec, manifest: Path, model_dir: Path, work: Path):
    """The real builder on the same clips with the same codec, into a fresh folder per pass."""
    from higgs_ds.shards.build import BuildConfig, build_shards

    passes = iter(range(10**6))

    def prepare():
        out = work / f"build{next(passes)}"

        def run():
            build_shards([str(manifest)], str(out), codec, BuildConfig(tokenizer=str(model_dir)), progress=False)

        return run

    return prepare


# ------------------------------------------------------------------------------------------ padding


def padding(refs, max_tokens: int) -> dict:
    """Real / padded positions of three batchings of the same epoch (higgs_ds.stream.plan's public API)."""
    from higgs_ds.stream.plan import BatchingConfig, plan_epoch

    def length(pos) -> int:
        return int(refs[int(pos[0])].lengths[int(pos[1])])

    def fraction(batches) -> float:
        real = sum(length(p) for b in batches for p in b)
        return real / sum(len(b) * max(length(p) for p in b) for b in batches)

    def largest(batches) -> int:  # padded positions of the biggest micro-batch: what sizes GPU memory
        return max(len(b) * max(length(p) for p in b) for b in batches)

    def plan(**batching):
        return plan_epoch(refs, BatchingConfig(**batching), seed=0, epoch=0, rank=0, world_size=1)

    budget = plan(max_tokens=max_tokens)
    mean_batch = round(sum(len(b) for b in budget.batches) / len(budget.batches))
    fixed = plan(batch_size=mean_batch)
    order = [p for b in plan(batch_size=1).batches for p in b]  # the epoch's global order, one per batch
    window = BatchingConfig().window  # the windows budget batching sorts by length
    sorted_fixed = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=length)
        sorted_fixed += [ranked[i : i + mean_batch] for i in range(0, len(ranked), mean_batch)]
    return {
        "budget_batching": round(budget.real_position_fraction(refs), 4),
        "budget_batching_recomputed": round(fraction(budget.batches), 4),
        "fixed_batches_random_order": round(fixed.real_position_fraction(refs), 4),
        "fixed_batches_length_sorted_windows": round(fraction(sorted_fixed), 4),
        "largest_batch_padded_positions": {
            "budget_batching": largest(budget.batches),
            "fixed_batches_random_order": largest(fixed.batches),
            "fixed_batches_length_sorted_windows": largest(sorted_fixed),
        },
        "budget_max_tokens": max_tokens,
        "fixed_batch_size": mean_batch,
        "sort_window": window,
    }, [tuple(int(x) for x in p) for b in budget.batches for p in b]


# ------------------------------------------------------------------------------------------ report


def headroom(stream_per_s: float, mean_tokens: float) -> dict:
    flops_per_token = 6 * MODEL_PARAMS
    tokens_per_s = MFU_GOAL * H100_BF16_DENSE_FLOPS / flops_per_token
    gpu_samples_per_s = tokens_per_s / mean_tokens
    return {
        "formula": "tokens/s = MFU x peak_flops / (6 x params); samples/s = tokens/s / mean expanded tokens per sample",
        "params": MODEL_PARAMS,
        "mfu": MFU_GOAL,
        "peak_flops_h100_bf16_dense": H100_BF16_DENSE_FLOPS,
        "training_flops_per_token": flops_per_token,
        "gpu_tokens_per_s": round(tokens_per_s, 1),
        "mean_expanded_tokens_per_sample": round(mean_tokens, 1),
        "gpu_samples_per_s": round(gpu_samples_per_s, 2),
        "stream_per_core_over_one_gpu": round(stream_per_s / gpu_samples_per_s, 1),
    }


def seed_accounting(seed_cpu: float, build_cpu: float, stream_cpu: float) -> dict:
    """Core-seconds per sample: the seed pays its decode + encode every epoch; we pay the build once."""
    out = {
        "seed_core_s_per_sample_per_epoch": round(seed_cpu, 3),
        "build_core_s_per_sample_once": round(build_cpu, 3),
        "stream_core_s_per_sample_per_epoch": round(stream_cpu, 7),
        "stream_speedup_per_epoch_excluding_build": round(seed_cpu / stream_cpu),
    }
    for e in EPOCHS:
        out[f"speedup_E{e}"] = round(e * seed_cpu / (build_cpu + e * stream_cpu), 3)
    return out


NOTES = {
    "timing": "every path: the warm-up passes untimed, then the median of the timed passes (settings); imports, "
    "tokenizer/model/codec construction, loader construction (index load + epoch plan) outside the clock",
    "floors.bytes": "each shard file read whole, sequential 8 MiB reads, page cache warm, no parsing: the "
    "cost of the bytes alone; samples/s = the shards' samples / that time",
    "floors.reader": "higgs_ds.stream.reader.member_table rebuilt (as a fresh worker "
    "does: header scan, + sha256 when settings.verify_shards is 'always') and one seek + read per sample in "
    "the epoch plan's order; no JSON/npy decoding, no checks",
    "floors.random_reads": "one os.pread per sample of exactly its members' bytes (offsets from the member "
    "table, outside the clock), in the epoch plan's order, files held open: the system calls and copies of "
    "random access alone, the least any reader of these samples in this order pays",
    "stream": "build_dataloader (num_workers=0: one core, torch 1 thread) -> read_positions with every check -> "
    "SampleEncoder on the stored token ids -> the family's collator, budget batching; samples per wall second",
    "stream.stages_us_per_sample": "the stream's stages timed apart over the same plan (same timing rule): "
    "read_encode = ShardStream.read_batch as a fresh worker (shards checked whole on this machine: one read a "
    "sample, no decoding; see higgs_ds.shards.checked); strict_read = read_positions with member tables rebuilt "
    "(tar scan, + sha256 if 'always'), strict decode and checks, and strict_encode = SampleEncoder: what a shard "
    "not yet checked here costs; collate = the family's collator. read_encode + collate is about "
    "stream.us_per_sample (the loader's own overhead is the rest)",
    "ratios": "stream samples/s over each floor's samples/s, same run",
    "headroom": "stream samples/s on one core over what one H100 at 45% MFU consumes (6 x params FLOPs per "
    "token, attention FLOPs left out, padding not counted: both make the GPU's demand look larger, not smaller)",
    "seed_path": "core-seconds (process CPU time) per sample. seed: per epoch, read + librosa resample + the "
    "released codec architecture (random weights, full HuBERT-base teacher) on this CPU + tokenize + collate. "
    "ours: the real shard builder with the same codec once (torch threads as the builder sets them) + E epochs "
    "of the stream. speedup_E = E x seed / (build + E x stream): the codec work is the same, paid once instead "
    "of E times; the stream's own speedup per epoch is shown apart, excluding the build",
    "padding": "real / padded positions of one epoch: budget batching (max_tokens, length-sorted windows, "
    "higgs_ds.stream.plan), fixed batches of the same mean size in the epoch's random order, and fixed batches "
    "of that size cut from the same length-sorted windows (sort_window). Sorting is what removes the padding; "
    "the budget is what bounds a micro-batch's padded positions (largest_batch_padded_positions <= max_tokens), "
    "which fixed batches of sorted long samples exceed",
    "goals": "issue #12: stream >= 20% of the byte floor and >= 100x one H100's consumption per loader core",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed-samples", type=int, default=1, help="clips per seed-path and shard-build pass")
    p.add_argument("--max-tokens", type=int, default=8192, help="budget of expanded positions per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (after 1 warm-up); median")
    p.add_argument("--verify-shards", default="once", choices=("once", "always"), help="DataConfig.verify_shards")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import librosa  # noqa: F401  (imported before any clock starts)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.models.family import BOSON, environment_family
    from higgs_ds.models.interface import make_collator
    from higgs_ds.models.tiny import write_tiny
    from higgs_ds.shards import verified
    from higgs_ds.stream.reader import load_index, shard_refs

    torch.set_num_threads(1)
    family = environment_family()
    timing = dict(warmup=1, repeats=args.repeats)
    verified.set_mode(args.verify_shards)  # the reader floor's member tables too
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HIGGS_DS_CACHE"] = str(tmp / "cache")  # an empty cache: the warm-up pass hashes and records
        model_dir = write_tiny(tmp / "model")
        tok, config = AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
        shards = tmp / "shards"
        make_shards(shards, model_dir, args.samples)
        time.sleep(verified.SETTLE_NS / 1e9)  # files younger than this are never recorded (shards.verified)
        refs = shard_refs([str(shards)])
        paths = [r.path for r in refs]
        total_bytes = sum(os.path.getsize(p) for p in paths)
        lengths = [int(n) for r in refs for n in r.lengths]
        audio_hours = sum(s["audio_seconds"] for s in load_index(shards)["shards"]) / 3600
        pad, positions = padding(refs, args.max_tokens)

        counted: list[int] = []
        verify = args.verify_shards
        runs = {
            "bytes": measure(byte_floor(paths), **timing),
            "reader": measure(reader_floor(refs, positions), **timing),
            "random_reads": measure(random_read_floor(refs, positions), **timing),
            "stream": measure(stream(shards, tok, config, args.max_tokens, "fast", counted, verify), **timing),
        }
        streamed = counted[-1]
        stages = stream_stages(shards, tok, config, args.max_tokens, "fast", timing, args.verify_shards)
        if family == BOSON:
            boson = stream(shards, tok, config, args.max_tokens, "boson", [], args.verify_shards)
            runs["stream_boson_collator"] = measure(boson, **timing)

        codec = released_size_codec()
        manifest, lines = seed_clips(tmp / "seed", args.seed_samples)
        collate = make_collator(config, tok, "boson" if family == BOSON else "fast")  # the seed used boson's
        runs["seed_path"] = measure(seed_path(codec, tok, collate, manifest, lines), **timing)
        runs["shard_build"] = measure(shard_build(codec, manifest, model_dir, tmp / "builds"), **timing)
        torch.set_num_threads(1)  # the builder sets its own thread count

    n = len(lengths)
    floors = ("bytes", "reader", "random_reads", "stream")
    rate = {k: round(v, 1) for k, v in ((k, n / runs[k]["wall_s"]) for k in floors)}
    rate["stream"] = round(streamed / runs["stream"]["wall_s"], 1)  # samples the loader yielded
    result = {
        "settings": {
            "samples": n,
            "streamed_samples_per_pass": streamed,
            "shards": len(paths),
            "verify_shards": args.verify_shards,
            "shard_bytes_total": total_bytes,
            "audio_seconds_per_sample": "uniform 1-20 (mean 10.5)",
            "max_tokens": args.max_tokens,
            "num_workers": 0,
            "torch_threads": 1,
            "family": family,
            "seed_samples_per_pass": args.seed_samples,
            "seed_clip_seconds": SEED_CLIP_SECONDS,
            "epochs_E": list(EPOCHS),
            **timing_settings(1, args.repeats),
        },
        "machine": machine(),
        "floors": {
            "bytes_samples_per_s": rate["bytes"],
            "bytes_mb_per_s": round(total_bytes / 1e6 / runs["bytes"]["wall_s"], 1),
            "reader_samples_per_s": rate["reader"],
            "random_reads_samples_per_s": rate["random_reads"],
        },
        "stream": {
            "samples_per_s_per_core": rate["stream"],
            "mb_per_s_per_core": round(total_bytes / 1e6 / runs["stream"]["wall_s"], 1),
            "audio_hours_per_s_per_core": round(audio_hours * streamed / n / runs["stream"]["wall_s"], 2),
            "us_per_sample": round(runs["stream"]["wall_s"] / streamed * 1e6, 2),
            "stages_us_per_sample": stages,
        },
        "ratios": {
            "stream_over_byte_floor": round(rate["stream"] / rate["bytes"], 4),
            "stream_over_reader_floor": round(rate["stream"] / rate["reader"], 4),
            "stream_over_random_read_floor": round(rate["stream"] / rate["random_reads"], 4),
            "random_read_floor_over_byte_floor": round(rate["random_reads"] / rate["bytes"], 4),
            "reader_floor_over_byte_floor": round(rate["reader"] / rate["bytes"], 4),
        },
        "headroom": headroom(rate["stream"], statistics.mean(lengths)),
        "seed_path": seed_accounting(
            runs["seed_path"]["cpu_s"] / args.seed_samples,
            runs["shard_build"]["cpu_s"] / args.seed_samples,
            runs["stream"]["cpu_s"] / streamed,
        ),
        "padding": pad,
        "passes_wall_s": {k: v["passes_wall_s"] for k, v in runs.items()},
        "notes": NOTES,
    }
    if "stream_boson_collator" in runs:
        result["stream"]["boson_collator_samples_per_s_per_core"] = round(
            streamed / runs["stream_boson_collator"]["wall_s"], 1
        )
    result["goals"] = {
        "stream_over_byte_floor_ge_0.20": result["ratios"]["stream_over_byte_floor"] >= 0.20,
        "stream_per_core_over_one_gpu_ge_100": result["headroom"]["stream_per_core_over_one_gpu"] >= 100,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
