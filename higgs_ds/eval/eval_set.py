"""An evaluation set: held-out shard samples -> items (prompt record, text, language, speaker, recordings).

Each shard sample that ends in an assistant audio turn is one item: its prompt is the conversation before
that turn (the very prompt training would see, higgs_ds.eval.generate.prompt_from_record), its text the last
user turn's, its recording the codes of that audio turn. What SIM is judged against: the voice reference in
the prompt when it clones one (Seed-TTS-eval's protocol), else the speaker's own recording of this text.
Recordings are the shards' codes decoded by the codec, so the "reference" system is the codec's
resynthesis of the recordings (its ceiling includes the codec's own loss), the fair ceiling for a model that
can only speak through that codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.eval.generate import has_audio, prompt_from_record


@dataclass
class EvalItem:
    name: str
    text: str
    language: str | None
    speaker: str | None
    record: dict  # the shard-style record generation continues (prompt_from_record)
    target_codes: np.ndarray | None  # the recording of this text, (num_codebooks, T)
    reference_codes: np.ndarray | None  # the prompt's voice reference, when it clones one


def shard_items(shard_dirs: list[str], tokenizer, limit: int | None = None) -> list[EvalItem]:
    """Every sample of the shard directories that ends in an assistant audio turn, in index order."""
    from higgs_ds.stream.reader import load_index, read_shard

    items = []
    for d in shard_dirs:
        for shard in load_index(d)["shards"]:
            for _, record in read_shard(str(Path(d) / shard["file"])):
                last = record["json"]["messages"][-1]
                if last["role"] == "assistant" and has_audio(last["content"]):
                    items.append(shard_item(record, tokenizer))
                if limit is not None and len(items) == limit:
                    return items
    if not items:
        raise UserError(f"{', '.join(shard_dirs)}: no sample ends in an assistant audio turn, nothing to evaluate")
    return items


def shard_item(record: dict, tokenizer) -> EvalItem:
    """One shard record (ending in an assistant audio turn) as an evaluation item."""
    meta = record["json"]
    prompt = prompt_from_record(record, tokenizer)
    frames = [int(a["frames"]) for a in meta["audio"]]
    used = sum(prompt.frames)
    target = record["codes"][:, sum(frames[:-1]) :] if frames else None
    misc = meta.get("misc") or {}
    return EvalItem(
        name=str(meta.get("id")),
        text=prompt.text,
        language=misc.get("language") if isinstance(misc, dict) else None,
        speaker=meta.get("speaker"),
        record=record,
        target_codes=None if target is None else np.asarray(target, dtype=np.int64),
        reference_codes=np.asarray(record["codes"][:, :used], dtype=np.int64) if used else None,
    )


def recordings(items: list[EvalItem], codec) -> tuple[list, list]:
    """(target waves, SIM references): the prompt's voice reference when it clones, else the recording."""
    from higgs_ds.eval.generate import decode

    targets = [None if i.target_codes is None else decode(codec, i.target_codes) for i in items]
    refs = [decode(codec, i.reference_codes) if i.reference_codes is not None else t for i, t in zip(items, targets)]
    return targets, refs
