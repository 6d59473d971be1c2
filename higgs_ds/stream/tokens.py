"""Stage 6 of the data flow: a shard record -> an EncodedSample (token ids, labels, codes per audio item).

Text goes through higgs_ds.stream.chatml.prepare_chatml, which gives boson's `prepare_chatml_sample` ids
(Llama-3 headers, label masking by role and start_index) without importing boson, or the ids stored at
build time by the same tokenizer; the codes stay one (K, sum T_i) array with the frame count of each audio
item, in the order prepare_chatml_sample lists the items.
Waveforms are not needed: the released model reads audio in and out as codes only
(encode_whisper_embed=False).
"""

from __future__ import annotations

import hashlib

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.stream.chatml import ChatMLError, prepare_chatml


class EncodingError(UserError):
    pass


def expanded_length(num_text_tokens: int, frames: list[int]) -> int:
    """Positions the model sees after expanding each audio placeholder to T_i + 9 positions (one of
    which was the placeholder itself), rounded up to the collator's multiple of 8."""
    n = num_text_tokens + sum(t + 8 for t in frames)
    return -(-n // 8) * 8


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a fast tokenizer (vocabulary, merges, added tokens): token ids stored in shards are
    used only by a tokenizer with the same fingerprint."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def chatml_tokens(chatml: dict, tokenizer, sample_id=None) -> tuple[list[int], list[int], int]:
    """boson's prepare_chatml_sample ids -> (input_ids, label_ids, number of audio items), or EncodingError."""
    try:
        input_ids, label_ids, audio = prepare_chatml(chatml, tokenizer, sample_id)
    except ChatMLError as err:
        raise EncodingError(str(err)) from None
    return input_ids, label_ids, len(audio)


def speaker_of(chatml: dict) -> str | None:
    """The sample's speaker where prepare_chatml_sample looks for it: "speaker", else misc["speaker"]."""
    speaker = chatml.get("speaker")
    if speaker is None:
        speaker = (chatml.get("misc") or {}).get("speaker")
    return speaker if isinstance(speaker, str) and speaker else None


def plain_tts(chatml: dict) -> bool:
    """A plain single-speaker TTS sample, usable as a cloning target or reference: [system text, user
    text, assistant audio], a speaker, every turn trained as is (no start_index), no recipient, and no
    [SPEAKERn] dialogue tags."""
    messages = chatml.get("messages") or []
    if [m.get("role") for m in messages] != ["system", "user", "assistant"] or chatml.get("start_index"):
        return False
    system, user, assistant = (m.get("content") for m in messages)
    return (
        speaker_of(chatml) is not None
        and isinstance(system, str)
        and isinstance(user, str)
        and "[SPEAKER" not in system + user
        and isinstance(assistant, dict)
        and assistant.get("type") == "audio"
        and not any(m.get("recipient") for m in messages)
    )


def clone_parts(input_ids: list[int], frames: list[int], header_id: int) -> list[int] | None:
    """[head, pair] of a plain TTS sample's tokens: the system turn's positions, and the user + assistant
    turns' expanded positions (text + frames + 8), unrounded; their sum rounded up to 8 is its
    expanded_length, and head + pair + another sample's pair is the length with that sample as reference.
    None when the tokens do not split into exactly three turns (a header token typed inside the text)."""
    starts = [k for k, t in enumerate(input_ids) if t == header_id]
    if len(starts) != 3:
        return None
    return [starts[1], len(input_ids) - starts[1] + sum(t + 8 for t in frames)]


def clone_chatml(target: dict, reference: dict) -> dict:
    """The voice-cloning sample: the target's system turn, the reference's user text and assistant audio,
    then the target's user text and assistant audio; start_index 3 trains only the target's turn."""
    system, user, assistant = target["messages"]
    _, ref_user, ref_assistant = reference["messages"]
    out = {"messages": [system, ref_user, ref_assistant, user, assistant], "start_index": 3}
    if speaker_of(target):
        out["speaker"] = speaker_of(target)
    return out


class EncodedSample:
    """One training sample as plain arrays: token ids, labels, and the (K, sum T_i) codes of its audio
    items in order. `to_chatml()` gives boson's ChatMLDatasetSample for boson's own collator."""

    __slots__ = ("sample_id", "input_ids", "label_ids", "codes", "frames")

    def __init__(self, sample_id, input_ids: np.ndarray, label_ids: np.ndarray, codes: np.ndarray, frames: list[int]):
        self.sample_id, self.input_ids, self.label_ids = sample_id, input_ids, label_ids
        self.codes, self.frames = codes, frames

    def to_chatml(self):
        import torch
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

        n = len(self.frames)
        starts = np.concatenate([[0], np.cumsum(self.frames)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
        return ChatMLDatasetSample(
            input_ids=torch.tensor(self.input_ids, dtype=torch.long),  # copies: boson's collator edits labels in place
            label_ids=torch.tensor(self.label_ids, dtype=torch.long),
            audio_ids_concat=torch.from_numpy(self.codes.astype(np.int64)),
            audio_ids_start=torch.from_numpy(starts),
            audio_waveforms_concat=torch.zeros(0),
            audio_waveforms_start=torch.zeros(n, dtype=torch.long),
            audio_sample_rate=torch.zeros(n),
            audio_speaker_indices=torch.full((n,), -1, dtype=torch.long),
        )


class SampleEncoder:
    """Shard record -> EncodedSample. Token ids stored at build time (--tokenizer) are used when
    `stored_tokens` is true (the shards' tokenizer fingerprint equals this tokenizer's)."""

    def __init__(self, tokenizer, stored_tokens: bool = False):
        self.tokenizer = tokenizer
        self.stored_tokens = stored_tokens
        self._header = None

    def with_reference(self, record: dict, ref_record: dict) -> EncodedSample:
        """The cloning sample of clone_chatml(target, reference), with the token ids prepare_chatml_sample
        gives it: each turn's tokens depend only on that turn (its role, its text, whether it is first,
        whether an assistant turn follows, whether it is trained), so they are composed from the two
        samples' own tokens; labels of the reference's turns become -100 (start_index 3). The reference's
        codes come first, in the order of its audio in the messages."""
        if self._header is None:
            self._header = self.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
        target, ref = self(record), self(ref_record)
        t = np.flatnonzero(target.input_ids == self._header)
        r = np.flatnonzero(ref.input_ids == self._header)
        sample_id = f"{target.sample_id} ref={ref.sample_id}"
        if len(t) != 3 or len(r) != 3:  # a header token inside the text: tokenize the whole sample
            meta = clone_chatml(record["json"], ref_record["json"])
            input_ids, label_ids, _ = chatml_tokens(meta, self.tokenizer, sample_id)
            input_ids, label_ids = np.asarray(input_ids, np.int64), np.asarray(label_ids, np.int64)
        else:
            cut, ref_turns = t[1], ref.input_ids[r[1] :]
            input_ids = np.concatenate([target.input_ids[:cut], ref_turns, target.input_ids[cut:]])
            untrained = np.full(len(ref_turns), -100, np.int64)
            label_ids = np.concatenate([target.label_ids[:cut], untrained, target.label_ids[cut:]])
        codes = np.concatenate([ref.codes, target.codes], axis=1)
        return EncodedSample(sample_id, input_ids, label_ids, codes, ref.frames + target.frames)

    def __call__(self, record: dict) -> EncodedSample:
        meta = record["json"]
        stored = record.get("token_ids")  # the reader's checked arrays: a tokens.npy member or the JSON's lists
        if self.stored_tokens and (stored is not None or "input_ids" in meta):
            input_ids, label_ids = stored or (meta["input_ids"], meta["label_ids"])
            num_audio = len(meta["audio"])
        else:
            chatml = {k: meta[k] for k in ("messages", "speaker", "start_index", "misc") if k in meta}
            input_ids, label_ids, num_audio = chatml_tokens(chatml, self.tokenizer, meta.get("id"))
        frames = [item["frames"] for item in meta["audio"]]
        codes = record["codes"]
        if num_audio != len(frames) or codes.shape[1] != sum(frames) or len(input_ids) != len(label_ids):
            raise EncodingError(
                f"sample {meta.get('id')!r}: {num_audio} audio items in the messages, "
                f"{len(frames)} in the shard record, codes hold {codes.shape[1]} frames"
            )
        return EncodedSample(
            meta.get("id"), np.asarray(input_ids, dtype=np.int64), np.asarray(label_ids, dtype=np.int64), codes, frames
        )
