"""What one evaluation item costs, part by part, printed as one JSON object (so users can size eval.steps).

    python bench/evaluate.py [--device cpu|cuda] [--items 2] [--seconds 5] [--sizes tiny,real]
                             [--whisper small|large-v3] [--real-generation] [--eval-generate 8]

An item of `higgs-ds evaluate` (and of every `[eval]` step with eval.generate prompts) pays, in order:

* generate: the family's generation loop (higgs_ds.eval.generate.generate_codes) on a cloning prompt
  (a --reference-seconds voice prompt, then the text) for N = 25 x --seconds frames. Sizes: the tiny model
  of the tests; with --real-generation the release's width (Llama-3.2-3B text backbone, dual FFN on every
  layer, 8 x 1026 audio head): on a GPU the whole 28-layer model, on this CPU (5.8B parameters do not fit the
  box in float32 beside other work) 1 and 2 of its layers, extrapolated linearly to 28 (every layer costs
  the same; the embeddings and heads are the intercept);
* decode: the codec's decode of N frames (higgs_ds.eval.generate.decode). The tiny codec has the released
  geometry and decoder; only its HuBERT teacher, which decoding never runs, is shallow: its cost is the
  release's;
* asr: AsrJudge.transcribe (resampling to 16 kHz, log-mel, Whisper's generate) of the item;
* speaker: SpeakerJudge.embed of the item and of its voice prompt (SIM embeds both; evaluate embeds a
  reference once per distinct array, and Seed-TTS-eval's items each have their own);
* mos: MosJudge.score of the item;
* measures: higgs_ds.eval.scoring.score_waves with no judge: speech seconds, speaking and syllable rate,
  duration ratio, the rows (the audio measures every item gets).

Judges come in two sizes: `tiny` (higgs_ds.eval.tiny_judges, the tests' judges) and `real`, the released
checkpoints' architectures with seeded random weights, built offline from their published config numbers
(constants below, each naming its checkpoint): cost does not depend on the weights' values. Both are written
to directories and loaded by higgs_ds.eval.judges exactly as a user's judge is. Random weights would
transcribe until Whisper's limit, so the ASR decoder is held to a real transcript's length
(TRANSCRIPT_TOKENS_PER_SECOND, forced with min_new_tokens = max_new_tokens); Whisper large-v3's geometry
costs ~6x whisper-small's on a 2-core CPU (12.5 s against 2.1 s an item, README), so the CPU default is
whisper-small's geometry (--whisper large-v3 to measure it; the default on cuda). The script runs in either
environment and times that environment's family (`.venv-boson/bin/python bench/evaluate.py`: boson's).

Timing (bench/common.py, every part alike): models, directories, prompts and waves built before the clock,
1 untimed warm-up pass, then the median of --repeats timed passes over --items items; on cuda each pass ends
with torch.cuda.synchronize(). seconds_per_item = pass / items; rtf = seconds_per_item / --seconds (seconds of
compute per second of generated audio: a judge runs over the audio at least once, so rtf is its floor per
second of evaluated speech).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, timing_settings  # noqa: E402  (bench/common.py)

FRAME_RATE = 25  # codec frames per second of 24 kHz audio: every Higgs-Audio v2 checkpoint
RELEASED_LAYERS = 28  # bosonai/higgs-audio-v2-generation-3B-base: Llama-3.2-3B's 28 decoder layers
# Read English speech runs at ~2.7 words/s (LibriSpeech) and Whisper's GPT-2 BPE spends ~1.3 tokens a word:
# a real judge decodes ~3.5 tokens per second of audio, plus its end-of-text.
TRANSCRIPT_TOKENS_PER_SECOND = 3.5

# openai/whisper-large-v3 config.json
WHISPER_LARGE_V3 = dict(
    vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
    encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
    max_source_positions=1500, max_target_positions=448,
)  # fmt: skip
# openai/whisper-small config.json
WHISPER_SMALL = dict(
    vocab_size=51865, num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
    max_source_positions=1500, max_target_positions=448,
)  # fmt: skip
WHISPERS = {"large-v3": WHISPER_LARGE_V3, "small": WHISPER_SMALL}
# microsoft/wavlm-base-plus-sv config.json (WavLM base+ encoder and the x-vector TDNN head)
WAVLM_BASE_PLUS_SV = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
    feat_extract_norm="layer", num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    num_buckets=320, max_bucket_distance=800, tdnn_dim=(512, 512, 512, 512, 1500),
    tdnn_kernel=(5, 3, 3, 1, 1), tdnn_dilation=(1, 2, 3, 1, 1), xvector_output_dim=512,
    apply_spec_augment=False, layerdrop=0.0,
)  # fmt: skip
# facebook/wav2vec2-base config.json: the SSL encoder of UTMOS22 strong (fairseq wav2vec 2.0 base)
WAV2VEC2_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
    feat_extract_norm="group", num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    apply_spec_augment=False, layerdrop=0.0,
)  # fmt: skip
# UTMOS22 strong learner's head (sarulab-speech/UTMOS22 strong checkpoint; higgs_ds.eval.judges.MosHead)
UTMOS22_HEAD = dict(ssl_dim=768, domain_dim=128, judge_dim=128, rnn_hidden=512, projection_hidden=2048)
SENTENCE = "the quick brown fox jumps over the lazy dog while seven bright birds sing near old stone walls"


# ------------------------------------------------------------------------------------------ judges


def transcript_tokens(seconds: float) -> int:
    return math.ceil(TRANSCRIPT_TOKENS_PER_SECOND * seconds) + 1


def write_whisper(out: Path, sizes: dict) -> Path:
    """A WhisperForConditionalGeneration directory of `sizes` (random weights) with the tiny judge's
    byte-level Whisper tokenizer (its ids fit any Whisper vocabulary) and generation config."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    from higgs_ds.eval.tiny_judges import _whisper_generation_config, build_tiny_whisper_tokenizer

    out.mkdir(parents=True)
    tok = build_tiny_whisper_tokenizer(out)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    start = tok.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(**sizes, decoder_start_token_id=start, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = _whisper_generation_config(tok, sizes["vocab_size"])
    model.generation_config.max_length = sizes["max_target_positions"]
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]), tok).save_pretrained(out)
    return out


def write_speaker(out: Path) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    WavLMForXVector(WavLMConfig(**WAVLM_BASE_PLUS_SV)).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)  # fmt: skip
    return out


def write_mos(out: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from higgs_ds.eval.judges import MosHead, save_mos_head

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_BASE)).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=False).save_pretrained(out)  # fmt: skip
    head = MosHead(**UTMOS22_HEAD)
    for p in head.parameters():  # the head's parameters start as torch.empty: give them values
        torch.nn.init.normal_(p, std=0.02)
    save_mos_head(head, out)
    return out


def judge_dirs(size: str, root: Path, whisper: str) -> dict[str, Path]:
    from higgs_ds.eval.tiny_judges import write_tiny_judges

    if size == "tiny":
        return write_tiny_judges(root / "tiny")
    real = root / "real"
    return {"asr": write_whisper(real / "asr", WHISPERS[whisper]), "speaker": write_speaker(real / "speaker"),
            "mos": write_mos(real / "mos")}  # fmt: skip


def load_judges(dirs: dict[str, Path], device: str, seconds: float) -> tuple[dict, int]:
    """The judges through higgs-ds' own loader; the ASR decoder held to a real transcript's length."""
    from higgs_ds.eval.judges import load_judges as load

    judges = load(**{k: str(v) for k, v in dirs.items()}, device=device)
    config = judges["asr"].model.generation_config
    prompt = 4  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
    tokens = min(transcript_tokens(seconds), judges["asr"].model.config.max_target_positions - prompt)
    config.max_length, config.max_new_tokens, config.min_new_tokens = None, tokens, tokens
    # A trained Whisper asked for no timestamps emits none; a random one does, and transformers then seeks to
    # that time and decodes the window again: text (byte) tokens only, so the window is decoded once.
    config.suppress_tokens = list(range(config.no_timestamps_token_id + 1, judges["asr"].model.config.vocab_size))
    return judges, tokens


# ------------------------------------------------------------------------------------------ generation


def cloning_record(reference_frames: int, frames: int, seed: int) -> dict:
    """A shard record as read_shard returns it: a voice prompt (its text and codes), then the text to say;
    the target's codes are random (the prompt stops before them)."""
    from higgs_ds.models.tiny import CODEBOOK_SIZE, NUM_CODEBOOKS

    def audio(name):
        return {"type": "audio", "audio_url": name}

    messages = [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "a voice to clone speaks these words"},
        {"role": "assistant", "content": audio("ref.wav")},
        {"role": "user", "content": SENTENCE},
        {"role": "assistant", "content": audio("target.wav")},
    ]
    codes = np.random.RandomState(seed).randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, reference_frames + frames))
    meta = {"id": f"item{seed}", "messages": messages, "audio": [{"frames": reference_frames}, {"frames": frames}]}
    return {"json": meta, "codes": codes.astype(np.uint16)}


def tiny_generator(root: Path, device: str):
    from higgs_ds.eval.synthesize import checked_model_dir, load_model, load_tokenizer, torch_dtype
    from higgs_ds.models.tiny import write_tiny

    path, family = checked_model_dir(write_tiny(root / "tiny-model"))
    return load_model(path, family, torch_dtype("auto", device), device), load_tokenizer(path)


def released_width_generator(layers: int, device: str):
    """This environment's model class at the release's sizes with `layers` decoder layers, random weights,
    built in memory (the byte-level tiny tokenizer drives it: its special-token ids are the config's)."""
    import torch

    from higgs_ds.eval.synthesize import torch_dtype
    from higgs_ds.models.family import NATIVE, environment_family
    from higgs_ds.models.tiny import RELEASED_TEXT, build_tiny_tokenizer, model_config

    tok, text = build_tiny_tokenizer(), dict(RELEASED_TEXT, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        if environment_family() == NATIVE:
            from transformers import HiggsAudioV2ForConditionalGeneration

            from higgs_ds.models.native.tiny import native_config

            model = HiggsAudioV2ForConditionalGeneration(native_config(tok, text), use_text_head=True)
        else:
            from boson_multimodal.model.higgs_audio import HiggsAudioModel

            model = HiggsAudioModel(model_config(tok, text))
    return model.to(torch_dtype("auto", device)).eval(), tok


def never_ending(model) -> None:
    """Mask the stream-EOS logit of every codebook (a forward hook on the audio head): a random-weight model
    ends its audio at a random frame (3 of 20 seeds ran the tiny model's 125 frames), a model that speaks
    the item's text runs its N frames; the hook's cost is one indexed write a step."""
    import torch

    head = getattr(model, "audio_lm_head", None) or model.audio_decoder_proj.audio_lm_head
    codebooks = getattr(model.config, "num_codebooks", None) or model.config.audio_num_codebooks
    width = head.out_features // codebooks  # 1024 codes + stream BOS + stream EOS per codebook
    eos = torch.arange(codebooks) * width + model.config.audio_stream_eos_id

    def mask(module, inputs, logits):
        logits[..., eos.to(logits.device)] = torch.finfo(logits.dtype).min
        return logits

    head.register_forward_hook(mask)


def generation(model, tok, records: list[dict], frames: int, produced: list):
    from higgs_ds.eval.generate import generate_codes

    def run():
        produced[:] = [generate_codes(model, tok, r, max_new_frames=frames, seed=k, synced_gpus=False).shape[1]
                       for k, r in enumerate(records)]  # fmt: skip

    return run


# ------------------------------------------------------------------------------------------ timing


def timed(fn, device: str, timing: dict) -> dict:
    """measure() of fn, each pass ended by a CUDA synchronize on a GPU (kernels are asynchronous)."""
    import torch

    def run():
        fn()
        if device != "cpu":
            torch.cuda.synchronize()

    return measure(lambda: run, **timing)


def part(name: str, size: str, runs: dict, items: int, seconds: float, **extra) -> dict:
    per_item = runs["wall_s"] / items
    return {"part": name, "size": size, "seconds_per_item": round(per_item, 4), "rtf": round(per_item / seconds, 4),
            "items": items, "repetitions": len(runs["passes_wall_s"]), "passes_wall_s": runs["passes_wall_s"],
            "cpu_s_per_item": round(runs["cpu_s"] / items, 4), **extra}  # fmt: skip


def judge_parts(size: str, judges: dict, waves, refs, seconds: float, device: str, timing: dict) -> list[dict]:
    rate, n = 24000, len(waves)
    fns = {
        "asr": lambda: judges["asr"].transcribe(waves, rate, language="en"),
        "speaker": lambda: (judges["speaker"].embed(waves, rate), judges["speaker"].embed(refs, rate)),
        "mos": lambda: judges["mos"].score(waves, rate),
    }
    return [part(kind, size, timed(fn, device, timing), n, seconds) for kind, fn in fns.items()]


def generation_parts(args, root: Path, timing: dict) -> list[dict]:
    frames, ref_frames = round(args.seconds * FRAME_RATE), round(args.reference_seconds * FRAME_RATE)
    records = [cloning_record(ref_frames, frames, k) for k in range(args.items)]
    builds = [("tiny", lambda: tiny_generator(root, args.device), None)]
    if args.real_generation:
        depths = [RELEASED_LAYERS] if args.device != "cpu" else [1, 2]
        builds += [(f"released-width-{d}-layers", lambda d=d: released_width_generator(d, args.device), d)
                   for d in depths]  # fmt: skip
    out = []
    for size, build, layers in builds:
        model, tok = build()
        never_ending(model)
        produced: list[int] = []
        runs = timed(generation(model, tok, records, frames, produced), args.device, timing)
        if produced != [frames] * len(records):
            raise RuntimeError(f"generate ({size}): {produced} frames, not {frames} each, with the EOS masked")
        out.append(part("generate", size, runs, args.items, args.seconds, frames=frames, layers=layers))
        del model
    return out + extrapolated(out)


def extrapolated(parts: list[dict]) -> list[dict]:
    """The 28-layer release from the 1- and 2-layer models: per-frame cost = intercept + layers x slope."""
    by = {p["layers"]: p for p in parts if p["layers"] in (1, 2)}
    if len(by) != 2:
        return []
    frames = by[1]["frames"]
    per_frame = {d: p["seconds_per_item"] / frames for d, p in by.items()}
    slope = per_frame[2] - per_frame[1]
    per_item = (per_frame[1] + slope * (RELEASED_LAYERS - 1)) * frames
    return [{"part": "generate", "size": f"released-{RELEASED_LAYERS}-layers-extrapolated",
             "seconds_per_item": round(per_item, 3), "rtf": round(per_item * FRAME_RATE / frames, 3),
             "items": by[1]["items"], "repetitions": by[1]["repetitions"], "layers": RELEASED_LAYERS,
             "per_frame_s_by_layers": {str(d): round(v, 5) for d, v in per_frame.items()},
             "per_layer_per_frame_s": round(slope, 5)}]  # fmt: skip


def codec_parts(args, timing: dict) -> tuple[list[dict], list, list]:
    """The codec's decode of N frames; its output is the audio the judges hear (exactly --seconds long)."""
    from higgs_ds.eval.generate import decode
    from higgs_ds.shards.codec import resolve_codec

    codec = resolve_codec("tiny", device=args.device)
    rng = np.random.RandomState(0)
    frames, ref_frames = round(args.seconds * FRAME_RATE), round(args.reference_seconds * FRAME_RATE)
    codes = [rng.randint(0, 1024, (8, frames)) for _ in range(args.items)]
    ref_codes = [rng.randint(0, 1024, (8, ref_frames)) for _ in range(args.items)]
    runs = timed(lambda: [decode(codec, c) for c in codes], args.device, timing)
    waves, refs = [decode(codec, c) for c in codes], [decode(codec, c) for c in ref_codes]
    return [part("decode", "released-geometry", runs, args.items, args.seconds)], waves, refs


def measures_part(waves, seconds: float, timing: dict) -> dict:
    from higgs_ds.eval.scoring import score_waves

    n = len(waves)
    fn = lambda: score_waves(waves, 24000, [SENTENCE] * n, ["en"] * n, {}, target_seconds=[seconds] * n)  # noqa: E731
    return part("measures", "-", measure(lambda: fn, **timing), n, seconds)


# ------------------------------------------------------------------------------------------ report


def summary(parts: list[dict], eval_generate: int) -> tuple[str, dict]:
    """Per item: the largest size measured of each part (generation + decode + ASR + speaker + MOS + measures)."""
    order = ["tiny", "real", "released-width-1-layers", "released-width-2-layers",
             f"released-{RELEASED_LAYERS}-layers-extrapolated", f"released-width-{RELEASED_LAYERS}-layers"]  # fmt: skip
    chosen = {}
    for p in parts:
        rank = order.index(p["size"]) if p["size"] in order else 0
        if p["part"] not in chosen or rank >= chosen[p["part"]][0]:
            chosen[p["part"]] = (rank, p)
    picked = {k: (p["size"], p["seconds_per_item"]) for k, (_, p) in chosen.items()}
    total = sum(s for _, s in picked.values())
    used = ", ".join(f"{k} {s:.2f} s ({size})" for k, (size, s) in picked.items())
    line = (f"eval cost per item at eval.generate={eval_generate}: ~{total:.1f} s ({used}); "
            f"one evaluation ~{total * eval_generate:.0f} s")  # fmt: skip
    return line, {"seconds_per_item": round(total, 3), "per_evaluation_s": round(total * eval_generate, 1),
                  "parts_used": picked}  # fmt: skip


NOTES = {
    "seconds_per_item": "median pass wall time / items (1 warm-up pass, then --repeats timed; builds outside)",
    "rtf": "seconds_per_item / seconds of audio per item",
    "generate": "generate_codes on a cloning prompt (voice prompt of --reference-seconds codes), N frames, the "
    "stream EOS masked so a random model speaks them all (never_ending); released-28-layers-extrapolated: "
    "per-frame cost of 1 and 2 released-width layers extrapolated linearly to 28 layers",
    "decode": "higgs_ds.eval.generate.decode with the tiny codec (released geometry and decoder) on N frames",
    "asr": "AsrJudge.transcribe: resample, log-mel (Whisper always encodes its 30 s window), decoder held to "
    "TRANSCRIPT_TOKENS_PER_SECOND x seconds + 1 tokens (asr_tokens_forced)",
    "speaker": "SpeakerJudge.embed of the item and of its voice prompt (2 waves an item)",
    "mos": "MosJudge.score (wav2vec2 SSL encoder + UTMOS-style BLSTM head)",
    "measures": "score_waves without judges: speech seconds, speaking/syllable rate, duration ratio",
    "summary": "generation on every rank in lockstep, then decode and judges on rank 0: an item costs their sum",
}


def arguments():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--items", type=int, default=2, help="items per timed pass")
    p.add_argument("--seconds", type=float, default=5.0, help="audio per item, (0, 30]")
    p.add_argument("--reference-seconds", type=float, default=3.0, help="the voice prompt of each item")
    p.add_argument("--sizes", default="tiny,real", help="judge sizes: tiny, real or both")
    p.add_argument("--whisper", choices=sorted(WHISPERS), help="real ASR geometry (default: small on cpu, "
                   "large-v3 on cuda)")  # fmt: skip
    p.add_argument("--real-generation", action="store_true", help="also time the release's width (see above)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per part (after 1 warm-up); median")
    p.add_argument("--eval-generate", type=int, default=8, help="prompts per evaluation, for the summary line")
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or set(sizes) - {"tiny", "real"}:
        p.error(f"--sizes {args.sizes!r}: a comma-separated list of tiny and real")
    if not 0 < args.seconds <= 30 or not 0 < args.reference_seconds <= 30:
        p.error("--seconds and --reference-seconds must be in (0, 30]: long-form ASR (> 30 s) is not modelled")
    if args.items < 1 or args.repeats < 1 or args.eval_generate < 1:
        p.error("--items, --repeats and --eval-generate must be positive")
    args.sizes, args.whisper = sizes, args.whisper or ("small" if args.device == "cpu" else "large-v3")
    return args


def main() -> None:
    args = arguments()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import higgs_ds.eval.judges  # noqa: F401  (the judges' and scorers' imports before any clock)
    import higgs_ds.eval.scoring  # noqa: F401
    from higgs_ds.eval.synthesize import check_device
    from higgs_ds.models.family import environment_family

    args.device = check_device(args.device)
    timing = dict(warmup=1, repeats=args.repeats)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        decoded, waves, refs = codec_parts(args, timing)
        parts += generation_parts(args, root, timing) + decoded
        forced = {}
        for size in args.sizes:
            judges, forced[size] = load_judges(judge_dirs(size, root, args.whisper), args.device, args.seconds)
            parts += judge_parts(size, judges, waves, refs, args.seconds, args.device, timing)
            del judges
        parts.append(measures_part(waves, args.seconds, timing))
    line, total = summary(parts, args.eval_generate)
    result = {
        "settings": {
            "device": args.device, "items": args.items, "seconds": args.seconds,
            "reference_seconds": args.reference_seconds, "frames": round(args.seconds * FRAME_RATE),
            "sizes": args.sizes, "real_whisper": args.whisper, "asr_tokens_forced": forced,
            "real_generation": args.real_generation, "family": environment_family(),
            "torch_threads": torch.get_num_threads(), **timing_settings(1, args.repeats),
        },
        "machine": machine(),
        "configs": {"whisper-large-v3": WHISPER_LARGE_V3, "whisper-small": WHISPER_SMALL,
                    "wavlm-base-plus-sv": WAVLM_BASE_PLUS_SV, "wav2vec2-base": WAV2VEC2_BASE,
                    "utmos22-head": UTMOS22_HEAD},
        "parts": parts,
        "summary": {"line": line, **total},
        "notes": NOTES,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
