"""Shard records -> Higgs TTS 3 training prompts (V3Sample), the v3 counterpart of higgs_ds.stream.tokens.

The prompt is not a chat template (docs/research/higgs-tts-3-facts.md, section 4): specials and text ids
are concatenated, the text encoded with add_special_tokens=False (no BOS, no spaces or newlines):

    zero-shot   <|tts|><|text|>TEXT<|audio|>[slot] x (T + 7)
    cloning     <|tts|><|ref_text|>REF TEXT<|ref_audio|>[slot] x (Tref + 7)<|text|>TEXT<|audio|>[slot] x (T + 7)

A slot is a position whose input is the fused embedding of one delayed row (higgs_ds.models.v3.delay): the
reference's Tref + 7 rows are input only; the target's T + 7 rows are input and target: <|audio|>'s
position predicts row 0, the slot holding row k predicts row k + 1. A reference without a transcript (empty user
text) has no <|ref_text|>, as in the public inference code.

What becomes which prompt:
  * a plain TTS record, [system,] user text, assistant audio: zero-shot;
  * a cloning record, [system,] user ref text, assistant ref audio, user text, assistant audio with
    start_index on the target's turns (clone_chatml's form), or `with_reference(target, reference)` of two
    plain records: cloning, the reference from the first pair;
  * anything else (dialogue, [SPEAKERn] tags, a recipient, audio in a user turn, several trained audio
    turns, no audio): EncodingError naming the sample.
The system turn has no place in a v3 prompt and is not used: a scene description in it is lost. Control
tags <|category:value|> in the text are the tokenizer's added tokens and pass through as text; a prompt
special (<|audio|>, <|tts|>, ...) typed inside a text would break the layout and is refused.
"""

from __future__ import annotations

import numpy as np

from higgs_ds.models.v3.delay import BOC, IGNORE, NUM_CODEBOOKS, apply_v3_delay
from higgs_ds.models.v3.tokenizer import AUDIO, REF_AUDIO, REF_TEXT, TEXT, TTS, special_ids
from higgs_ds.stream.tokens import EncodingError

# specials of the release that no prompt text may contain (besides those special_ids names)
_OTHER_STRUCTURAL = ("<|audio_end|>", "<|text_end|>", "<|eoc|>")
_WHAT_V3_TRAINS = (
    "v3 (Higgs TTS 3) trains single-speaker TTS samples ([system,] user text, assistant audio) and voice-cloning "
    "samples (a reference's user text and assistant audio, then the target's, start_index on the target's turn)"
)


class V3Sample:
    """One v3 training sample as plain arrays.

    input_ids   (L,) int64: the prompt's token ids, -100 at every audio slot (reference and target)
    slot_rows   (M, 8) int64: the delayed rows of those slots, in position order (values 0..1025)
    out_start   position of <|audio|>, the first of the trained segment's T + 8 positions
    out_frames  T, the target's frames; its T + 7 slots end the sample (L = out_start + T + 8)
    """

    __slots__ = ("sample_id", "input_ids", "slot_rows", "out_start", "out_frames")

    def __init__(self, sample_id, input_ids: np.ndarray, slot_rows: np.ndarray, out_start: int, out_frames: int):
        self.sample_id, self.input_ids, self.slot_rows = sample_id, input_ids, slot_rows
        self.out_start, self.out_frames = out_start, out_frames


def v3_length(text_tokens: int, frames: int, ref_text_tokens: int | None = None, ref_frames: int | None = None) -> int:
    """Positions of a v3 prompt (unrounded): 3 + text + T + 7, plus 2 + ref text + Tref + 7 with a reference
    (1 + Tref + 7 when its transcript is empty: no <|ref_text|>)."""
    n = 3 + text_tokens + frames + NUM_CODEBOOKS - 1
    if ref_frames is not None:
        n += (2 + ref_text_tokens if ref_text_tokens else 1) + ref_frames + NUM_CODEBOOKS - 1
    return n


class _Refused(Exception):
    """Internal: why a record is not a v3 sample, before the sample's name is added."""


class V3SampleEncoder:
    """Shard record -> V3Sample, with the interface of higgs_ds.stream.tokens.SampleEncoder."""

    def __init__(self, tokenizer):
        ids = special_ids(tokenizer)
        self.tokenizer = tokenizer
        self.tts, self.text, self.audio = ids[TTS], ids[TEXT], ids[AUDIO]
        self.ref_text, self.ref_audio = ids[REF_TEXT], ids[REF_AUDIO]
        others = [tokenizer.convert_tokens_to_ids(t) for t in _OTHER_STRUCTURAL]
        self.structural = np.array(
            [*ids.values(), *(i for i in others if isinstance(i, int) and i != tokenizer.unk_token_id)], np.int64
        )

    def __call__(self, record: dict) -> V3Sample:
        meta = record.get("json") or {}
        sample_id = meta.get("id")
        pairs = self._pairs(record, sample_id)
        if len(pairs) == 1:
            (text, codes), ref = pairs[0], None
        else:
            ref, (text, codes) = pairs
        return self._sample(sample_id, text, codes, ref)

    def with_reference(self, record: dict, ref_record: dict) -> V3Sample:
        """The cloning sample of a plain target and a plain reference record (clone_chatml's pairing)."""
        target_id, ref_id = (r.get("json", {}).get("id") for r in (record, ref_record))
        sample_id = f"{target_id} ref={ref_id}"
        target, ref = self._pairs(record, target_id), self._pairs(ref_record, ref_id)
        for name, pairs in ((target_id, target), (ref_id, ref)):
            if len(pairs) != 1:
                raise EncodingError(
                    f"sample {sample_id!r}: {name!r} is already a cloning sample; with_reference pairs two plain "
                    "TTS samples"
                )
        return self._sample(sample_id, *target[0], ref[0])

    def prompt(self, text: str, ref_text: str | None = None, ref_codes: np.ndarray | None = None):
        """A generation prompt: (ids (L,) int64 ending in <|audio|>, -100 at the reference slots; the
        reference's delayed rows (M, 8), M = 0 without one)."""
        try:
            ref = None if ref_codes is None else (ref_text or "", _checked_codes(ref_codes, None))
        except _Refused as why:
            raise EncodingError(f"the reference audio: {why}") from None
        return self._prompt(None, text, ref)

    # ------------------------------------------------------------------ layout

    def _sample(self, sample_id, text: str, codes: np.ndarray, ref) -> V3Sample:
        prompt, ref_rows = self._prompt(sample_id, text, ref)
        rows = apply_v3_delay(codes)
        input_ids = np.concatenate([prompt, np.full(len(rows), IGNORE, np.int64)])
        return V3Sample(sample_id, input_ids, np.concatenate([ref_rows, rows]), len(prompt) - 1, codes.shape[1])

    def _prompt(self, sample_id, text: str, ref) -> tuple[np.ndarray, np.ndarray]:
        parts, ref_rows = [[self.tts]], np.zeros((0, NUM_CODEBOOKS), np.int64)
        if ref is not None:
            ref_text, ref_codes = ref
            ref_rows = apply_v3_delay(ref_codes)
            ref_ids = self._encode(sample_id, ref_text)
            if len(ref_ids):
                parts += [[self.ref_text], ref_ids]
            parts += [[self.ref_audio], np.full(len(ref_rows), IGNORE, np.int64)]
        parts += [[self.text], self._encode(sample_id, text), [self.audio]]
        return np.concatenate([np.asarray(p, np.int64) for p in parts]), ref_rows

    def _encode(self, sample_id, text: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        if np.isin(ids, self.structural).any():
            raise EncodingError(
                f"sample {sample_id!r}: its text {text[:60]!r} contains a Higgs TTS 3 prompt token "
                "(<|tts|>, <|audio|>, <|text|>, ...), which would break the prompt: remove it from the manifest"
            )
        return ids

    # ------------------------------------------------------------------ what the record is

    def _pairs(self, record: dict, sample_id) -> list[tuple[str, np.ndarray]]:
        """[(text, codes (8, T))] of the record's TTS turns: one, or the reference's then the target's."""
        meta = record.get("json") or {}
        try:
            texts = _tts_texts(meta)
            frames = [item.get("frames") for item in meta.get("audio") or []]
            if len(frames) != len(texts) or not all(isinstance(t, int) and t > 0 for t in frames):
                raise _Refused(f"{len(texts)} audio turns in the messages, audio items {frames} in the shard record")
        except _Refused as why:
            raise EncodingError(f"sample {sample_id!r}: {why}; {_WHAT_V3_TRAINS}") from None
        try:
            codes = _checked_codes(record.get("codes"), sum(frames))
        except _Refused as why:
            raise EncodingError(f"sample {sample_id!r}: {why} (a corrupt shard record: rebuild the shard)") from None
        cuts = np.cumsum(frames)[:-1]
        return list(zip(texts, np.split(codes, cuts, axis=1)))


def _checked_codes(codes, frames: int | None) -> np.ndarray:
    if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.shape[0] < NUM_CODEBOOKS:
        raise _Refused(f"codes must be ({NUM_CODEBOOKS}, frames), got {getattr(codes, 'shape', type(codes))}")
    if frames is not None and codes.shape[1] != frames:
        raise _Refused(f"the codes hold {codes.shape[1]} frames, the audio items {frames}")
    codes = codes[:NUM_CODEBOOKS]
    if codes.size and (codes.min() < 0 or codes.max() >= BOC):
        raise _Refused(f"codes outside 0..{BOC - 1} (raw codec codes, not delayed)")
    return codes.astype(np.int64)


def _tts_texts(meta: dict) -> list[str]:
    """The user texts of a plain (one) or cloning (reference, target) record, or _Refused."""
    messages = meta.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Refused("no list of messages")
    if any(m.get("recipient") for m in messages):
        raise _Refused("a message has a recipient (dialogue)")
    first = 1 if messages and messages[0].get("role") == "system" else 0
    if first and not isinstance(_text(messages[0].get("content")), str):
        raise _Refused("the system turn is not text")
    turns = messages[first:]
    roles = [m.get("role") for m in turns]
    if roles not in (["user", "assistant"], ["user", "assistant"] * 2):
        raise _Refused(f"roles {[m.get('role') for m in messages]}")
    texts = [_text(m.get("content")) for m in turns[0::2]]
    if any(t is None for t in texts):
        raise _Refused("a user turn is not text")
    if not all(_is_audio(m.get("content")) for m in turns[1::2]):
        raise _Refused("an assistant turn is not one audio item")
    system = _text(messages[0].get("content")) if first else ""
    if any("[SPEAKER" in t for t in [system, *texts]):
        raise _Refused("[SPEAKERn] tags (dialogue)")
    start = meta.get("start_index") or 0
    if not isinstance(start, int):
        raise _Refused(f"start_index {start!r} is not an integer")
    trained = [first + k for k in range(1, len(turns), 2) if first + k >= start]
    if trained != [first + len(turns) - 1]:  # exactly the last assistant turn is trained
        raise _Refused(f"start_index {meta.get('start_index')} trains assistant turns {trained}, not the last alone")
    return texts


def _text(content) -> str | None:
    """A text content (a string, a text part, or a list of them joined), else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content["text"] if isinstance(content.get("text"), str) and "audio_url" not in content else None
    if isinstance(content, list) and content:
        parts = [_text(p) for p in content]
        return None if any(p is None for p in parts) else "".join(parts)
    return None


def _is_audio(content) -> bool:
    if isinstance(content, list) and len(content) == 1:
        content = content[0]
    return isinstance(content, dict) and (
        "audio_url" in content or (content.get("type") == "audio" and not isinstance(content.get("text"), str))
    )
