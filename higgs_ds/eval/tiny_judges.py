"""Tiny random-weight judges built offline from the real classes, one directory each, loadable by
higgs_ds.eval.judges exactly as the released checkpoints are (same files, same loader):

- ASR: `WhisperForConditionalGeneration` (2-language tiny config, real 80-bin log-mel front end and 30 s
  window) + `WhisperProcessor` (WhisperFeatureExtractor + a byte-level WhisperTokenizer with Whisper's special
  tokens, as higgs_ds.models.tiny builds the Llama-3 one) + a generation config with the language and task
  tokens, and a two-word normalizer.json (Whisper's spelling map).
- Speaker verification: `WavLMForXVector` with the release's conv front end (20 ms frames) at small widths
  + its `Wav2Vec2FeatureExtractor`.
- MOS: a tiny `Wav2Vec2Model` + higgs_ds's UTMOS-style head (higgs_ds.eval.judges.MosHead) in
  mos_head.safetensors / mos_head.json.

Their outputs are meaningless for quality (random weights): they exercise the code, not the voice.

    python -m higgs_ds.eval.tiny_judges OUT_DIR     # writes OUT_DIR/{asr,speaker,mos}
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TINY_LANGUAGES = ("en", "zh")
TINY_SPELLING = {"colour": "color", "centre": "center"}  # a real normalizer.json holds ~1700 such pairs
TINY_MAX_TOKENS = 48  # decoder positions: random weights generate to the limit, so it bounds the test time


def whisper_special_tokens() -> list[str]:
    """Whisper's special tokens in the released order (languages between start-of-transcript and tasks)."""
    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{lang}|>" for lang in TINY_LANGUAGES]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]
        + ["<|notimestamps|>"]
    )


def _vocab_arguments(out: Path, vocab: dict) -> dict:
    """The vocabulary as this transformers' WhisperTokenizer takes it: in memory (5.x), or as the
    vocab.json + merges.txt files that 4.x's slow tokenizer reads (boson's environment)."""
    import inspect

    from transformers import WhisperTokenizer

    if "vocab_file" not in inspect.signature(WhisperTokenizer.__init__).parameters:
        return {"vocab": vocab, "merges": []}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return {"vocab_file": str(out / "vocab.json"), "merges_file": str(out / "merges.txt")}


def build_tiny_whisper_tokenizer(out: Path):
    """A byte-level WhisperTokenizer: one token per byte, then Whisper's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import WhisperTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = whisper_special_tokens()
    normalizer = out / "normalizer.json"
    normalizer.write_text(json.dumps(TINY_SPELLING, indent=1) + "\n")
    # the 1501 timestamps <|0.00|>..<|30.00|> follow <|notimestamps|> as in large-v3: long-form (> 30 s) needs them
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tok = WhisperTokenizer(**_vocab_arguments(out, vocab), normalizer_file=str(normalizer),
                           additional_special_tokens=specials[1:])  # fmt: skip
    tok.add_tokens(timestamps)  # plain added tokens (not special), as in large-v3's tokenizer.json
    for i, t in enumerate(specials + timestamps):
        assert tok.convert_tokens_to_ids(t) == len(alphabet) + i, t
    return tok


def _whisper_generation_config(tok, vocab_size: int):
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    return GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=ids("<|startoftranscript|>"),
        is_multilingual=True,
        lang_to_id={f"<|{lang}|>": ids(f"<|{lang}|>") for lang in TINY_LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[ids("Ġ"), eot],
        suppress_tokens=[],
        max_length=TINY_MAX_TOKENS,
        return_timestamps=False,
    )


def write_tiny_asr(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_whisper_tokenizer(out)
    ids = tok.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s of 10 ms mel frames after the stride-2 conv: Whisper's window
        max_target_positions=TINY_MAX_TOKENS,
        decoder_start_token_id=ids("<|startoftranscript|>"),
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = _whisper_generation_config(tok, len(tok))
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(out)
    return out


def _speech_encoder_sizes() -> dict:
    """Small widths around the release's conv front end (strides 5,2,2,2,2,2,2: 320 samples a frame)."""
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        apply_spec_augment=False,
        layerdrop=0.0,
    )


def write_tiny_speaker(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = WavLMConfig(
        **_speech_encoder_sizes(),
        feat_extract_norm="layer",  # as wavlm-base-plus-sv: per-frame norm, so padded batches are exact
        num_buckets=32,
        max_bucket_distance=64,
        tdnn_dim=(32, 32, 32, 32, 64),
        xvector_output_dim=16,
    )
    torch.manual_seed(seed)
    WavLMForXVector(config).save_pretrained(out)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    extractor.save_pretrained(out)
    return out


def write_tiny_mos(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from higgs_ds.eval.judges import MosHead, save_mos_head

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(**_speech_encoder_sizes(), feat_extract_norm="group")  # as wav2vec2-base
    torch.manual_seed(seed)
    Wav2Vec2Model(config).save_pretrained(out)
    # wav2vec2-base was trained on unnormalised waves and takes no attention mask (group norm over time)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False, return_attention_mask=False
    ).save_pretrained(out)
    head = MosHead(ssl_dim=config.hidden_size, domain_dim=8, judge_dim=8, rnn_hidden=16, projection_hidden=32)
    for p in head.parameters():  # nn.Parameter(torch.empty(...)) in the head: give every tensor a value
        torch.nn.init.normal_(p, std=0.1)
    save_mos_head(head, out)
    return out


def write_tiny_judges(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """OUT/asr, OUT/speaker, OUT/mos."""
    out = Path(out_dir)
    return {
        "asr": write_tiny_asr(out / "asr", seed),
        "speaker": write_tiny_speaker(out / "speaker", seed),
        "mos": write_tiny_mos(out / "mos", seed),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write tiny random-weight ASR, speaker and MOS judges (offline)")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind, path in write_tiny_judges(args.out_dir, args.seed).items():
        print(f"wrote {kind} judge {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
