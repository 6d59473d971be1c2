"""Stage 6 of the data flow: a shard record -> an EncodedSample (token ids, labels, codes per audio item).

Text goes through boson's own `prepare_chatml_sample` (Llama-3 headers, label masking by role and
start_index), or the ids stored at build time by the same tokenizer; the codes stay one (K, sum T_i)
array with the frame count of each audio item, in the order prepare_chatml_sample lists the items.
Waveforms are not needed: the released model reads audio in and out as codes only
(encode_whisper_embed=False).
"""

from __future__ import annotations

import contextlib
import hashlib
import io

import numpy as np

from higgs_ds.errors import UserError


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
    """boson's prepare_chatml_sample -> (input_ids, label_ids, number of audio items), or EncodingError."""
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    # prepare_chatml_sample prints and returns Nones on error; keep its chatter out of the logs
    # and raise a named error instead.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        input_ids, label_ids, audio_contents, _ = prepare_chatml_sample(chatml, tokenizer)
    if input_ids is None:
        raise EncodingError(f"sample {sample_id!r}: boson could not encode it: {chatter.getvalue().strip()[:500]}")
    return input_ids, label_ids, len(audio_contents)


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

    def __call__(self, record: dict) -> EncodedSample:
        meta = record["json"]
        if self.stored_tokens and "input_ids" in meta:
            input_ids, label_ids, num_audio = meta["input_ids"], meta["label_ids"], len(meta["audio"])
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
