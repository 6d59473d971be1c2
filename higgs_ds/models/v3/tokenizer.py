"""Higgs TTS 3's special tokens and a tiny tokenizer with them, built offline.

The released tokenizer is Qwen3's with the TTS specials in place of Qwen's tail (<think> ... ) and the
inline control tags as added tokens. Code never hard-codes their ids: it asks the tokenizer
(`special_ids`), so the released tokenizer and the tiny one drive the same code.

The tiny tokenizer is byte-level (one token per UTF-8 byte) with the specials after the 256 byte tokens in
the released id order: tiny id = 256 + (released id - 151643) for every named special; the ids between
them that no public source names are reserved placeholders.
"""

from __future__ import annotations

from higgs_ds.errors import UserError

# released id -> token, from the public inference sources (facts doc, section 4)
_RELEASED_SPECIALS = {
    151643: "<|endoftext|>",  # eos and pad
    151667: "<|tts|>",
    151670: "<|audio|>",
    151671: "<|audio_end|>",
    151672: "<|text|>",
    151673: "<|text_end|>",
    151674: "<|eoc|>",
    151679: "<|ref_audio|>",
    151680: "<|ref_text|>",
}
FIRST_SPECIAL, LAST_SPECIAL = 151643, 151680
EOS = "<|endoftext|>"
# what prompt building and generation need by name
TTS, TEXT, AUDIO, REF_AUDIO, REF_TEXT = "<|tts|>", "<|text|>", "<|audio|>", "<|ref_audio|>", "<|ref_text|>"
REQUIRED = (EOS, TTS, TEXT, AUDIO, REF_AUDIO, REF_TEXT)

# inline control tags `<|category:value|>` of the released vocabulary (facts doc, section 4)
CONTROL_TAGS = tuple(
    f"<|{category}:{value}|>"
    for category, values in (
        (
            "emotion",
            "affection amusement anger arousal awe bitterness confusion contemplation contentment "
            "determination disgust elation enthusiasm fear helplessness longing pride relief sadness shame surprise",
        ),
        ("env", "music noise"),
        (
            "prosody",
            "expressive_high expressive_low long_pause pause pitch_high pitch_low speed_fast speed_slow "
            "speed_very_fast speed_very_slow",
        ),
        ("sfx", "burping cough crying humming laughter screaming sigh sneeze sniff"),
        ("style", "shouting singing whispering"),
    )
    for value in values.split()
)
NUM_BYTE_TOKENS = 256


def _tiny_specials() -> list[str]:
    return [_RELEASED_SPECIALS.get(i, f"<|v3_reserved_{i}|>") for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)]


TINY_V3_VOCAB_SIZE = -(-(NUM_BYTE_TOKENS + len(_tiny_specials()) + len(CONTROL_TAGS)) // 8) * 8


def special_ids(tokenizer) -> dict[str, int]:
    """{token: id} of the tokens v3 prompts and generation use; a UserError naming the missing ones when
    the tokenizer is not Higgs TTS 3's."""
    ids, missing = {}, []
    for token in REQUIRED:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            missing.append(token)
        ids[token] = token_id
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)}: not a Higgs TTS 3 tokenizer")
    return ids


def build_tiny_v3_tokenizer():
    """A byte-level Qwen-style fast tokenizer with the Higgs TTS 3 specials and control tags (no BOS, as
    Qwen's; eos = pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == NUM_BYTE_TOKENS
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = _tiny_specials()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[t for t in specials if t != EOS],
    )
    fast.add_tokens(list(CONTROL_TAGS))  # plain added tokens: kept when decoding, like the release's
    for i, token in enumerate(specials):
        assert fast.convert_tokens_to_ids(token) == NUM_BYTE_TOKENS + i, token
    assert len(fast) <= TINY_V3_VOCAB_SIZE
    return fast
