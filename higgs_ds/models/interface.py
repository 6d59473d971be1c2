"""The one small interface the trainer sees of a model family (native, boson or v3; see models.family).

Everything family-specific that training, evaluation and export need goes through here:

    geometry(config)                 codebooks, code vocabulary and stream ids, whatever the config calls them
    make_collator(config, tok, mode) EncodedSamples -> this family's batch layout (+ labels with boson's semantics)
    logits_for_loss(model, batch)    (text logits, text labels on the same positions, audio logits of the
                                     audio-out positions): what higgs_ds.train.loss.higgs_loss takes

Both v2 families see the same positions: boson expands one placeholder per audio item inside its forward,
the native layout has one placeholder per delayed frame in the batch itself (T + K + 1 either way), so the
loss code is one. Higgs TTS 3 (v3) lays its prompt out differently (higgs_ds.models.v3.batch) but gives the
loss the same thing: the audio-out positions' logits and labels whose column j + 1 is predicted by column j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from higgs_ds.models.family import BOSON, MODEL_TYPES, NATIVE, V3


@dataclass(frozen=True)
class Geometry:
    num_codebooks: int
    code_vocab: int  # codes a codec emits per codebook (1024); stream BOS/EOS come after
    stream_bos: int  # v3: BOC, the delay pattern's fill before a codebook starts
    stream_eos: int  # v3: EOC, the fill after it ends (codebook 0's EOC ends generation)


def config_family(config) -> str:
    family = MODEL_TYPES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"not a Higgs-Audio config: model_type {getattr(config, 'model_type', None)!r}")
    return family


def geometry(config) -> Geometry:
    family = config_family(config)
    if family == V3:  # codebook_size counts BOC/EOC (1026)
        size = config.codebook_size
        return Geometry(config.num_codebooks, size - 2, size - 2, size - 1)
    if family == NATIVE:  # codebook_size counts the stream BOS/EOS ids (1026)
        return Geometry(
            config.num_codebooks, config.codebook_size - 2, config.audio_stream_bos_id, config.audio_stream_eos_id
        )
    return Geometry(
        config.audio_num_codebooks, config.audio_codebook_size, config.audio_stream_bos_id, config.audio_stream_eos_id
    )


def text_config(config):
    """The Llama backbone's settings: boson nests them in text_config, the native config is flat."""
    return getattr(config, "text_config", None) or config


def make_collator(config, tokenizer, mode: str = "fast"):
    """The batch maker of the config's family. `mode` ("fast" | "boson") chooses boson's own collator or
    ours for the boson family; the native family has one layout (checked against boson's in the tests)."""
    family = config_family(config)
    if family == V3:
        from higgs_ds.models.v3.batch import V3Collator

        return V3Collator(config, tokenizer)
    if family == NATIVE:
        from higgs_ds.models.native.batch import NativeCollator

        return NativeCollator(config, tokenizer)
    from higgs_ds.stream.collate import BatchCollator

    return BatchCollator(config, mode)


class LossInputs(NamedTuple):
    text_logits: object  # (B, S, V)
    text_labels: object  # (B, S), the same positions
    audio_logits: object  # (N, K, V_audio), the audio-out positions in order
    attended: int  # positions the model attended to (after expansion), for throughput metrics


def logits_for_loss(model, batch: dict, family: str) -> LossInputs:
    if family == V3:
        from higgs_ds.models.v3.logits import v3_logits

        text_logits, audio_logits = v3_logits(model, batch)
        return LossInputs(text_logits, batch["label_ids"], audio_logits, int(batch["attention_mask"].sum()))
    if family == NATIVE:
        from higgs_ds.models.native.logits import native_logits

        text_logits, audio_logits = native_logits(model, batch)
        return LossInputs(text_logits, batch["label_ids"], audio_logits, int(batch["attention_mask"].sum()))
    from higgs_ds.stream.collate import model_inputs

    out = model(**model_inputs(batch))
    return LossInputs(out.logits, out.expanded_labels, out.audio_logits, int(out.attention_mask.sum()))


__all__ = [
    "BOSON",
    "NATIVE",
    "V3",
    "Geometry",
    "LossInputs",
    "geometry",
    "make_collator",
    "logits_for_loss",
    "text_config",
]
