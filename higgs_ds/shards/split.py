"""A held-out split for evaluation, decided per sample from the manifest alone (deterministic).

    --split 0.05                 about 5% of the samples, chosen by a hash of the sample id
    --split speakers=alice,bob   every sample of these speakers (a voice the fine-tune never heard)

A sample's part depends only on its id (or speaker) and the spec: not on the order of the manifest, the
other samples, the number of build slices or workers, so two builds of the two parts (`shards build --split
SPEC --heldout-out DIR` builds both) partition the accepted samples exactly, and adding lines to a manifest
moves no existing sample. A line that cannot be parsed belongs to no part: both builds reject it, named.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from higgs_ds.errors import UserError

TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class Split:
    fraction: float | None = None
    speakers: frozenset[str] = frozenset()

    def part_of(self, sample_id: str, speaker: str | None) -> str:
        if self.fraction is not None:
            digest = hashlib.sha256(f"higgs-ds split:{sample_id}".encode()).digest()
            return HELDOUT if int.from_bytes(digest[:8], "big") / 2**64 < self.fraction else TRAIN
        return HELDOUT if speaker in self.speakers else TRAIN

    def spec(self) -> str:
        return f"{self.fraction!r}" if self.fraction is not None else "speakers=" + ",".join(sorted(self.speakers))


def parse_split(spec: str) -> Split:
    """'0.05' or 'speakers=a,b' -> Split; UserError saying the two forms otherwise."""
    forms = "--split FRACTION (0 < FRACTION < 1, e.g. 0.05) or --split speakers=NAME[,NAME...]"
    text = spec.strip()
    if text.startswith("speakers="):
        names = frozenset(s.strip() for s in text[len("speakers=") :].split(",") if s.strip())
        if not names:
            raise UserError(f"--split {spec!r} names no speaker: {forms}")
        return Split(speakers=names)
    try:
        fraction = float(text)
    except ValueError:
        raise UserError(f"--split {spec!r}: use {forms}") from None
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise UserError(f"--split {spec!r}: the fraction must be between 0 and 1 (exclusive): {forms}")
    return Split(fraction=fraction)
