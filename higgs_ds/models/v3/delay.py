"""Higgs TTS 3's delay pattern: codes (K, T) -> delayed rows (T + K - 1, K), and back.

Codes come as the shard record stores them, codebook-major (K, T) with K = 8; delayed rows are
time-major, one row per sequence position. Codebook c holds BOC in rows r < c, its frames in rows
c .. c + T - 1 and EOC after (docs/research/higgs-tts-3-facts.md, section 5): row 0 is
[c0_0, BOC x 7], row T + 6 is [EOC x 7, c7_{T-1}]; no all-BOC or all-EOC row (unlike v2, no stream
BOS/EOS frames).

Labels of a target's rows: BOC cells are structural (generation forces them), so they are -100; EOC
cells are trained, they teach the model where the audio ends. Raw codec codes are < 1024 (the encoder
checks), so a BOC value in a delayed block is exactly a ramp-in cell.
"""

from __future__ import annotations

import numpy as np

NUM_CODEBOOKS, CODEBOOK_SIZE = 8, 1026  # 1024 codes, then BOC and EOC
BOC, EOC = 1024, 1025
IGNORE = -100


def apply_v3_delay(codes: np.ndarray, boc: int = BOC, eoc: int = EOC) -> np.ndarray:
    """(K, T) codes -> (T + K - 1, K) int64 delayed rows."""
    k, frames = codes.shape
    rows = np.full((frames + k - 1, k), eoc, np.int64)
    rows[np.arange(frames + k - 1)[:, None] < np.arange(k)] = boc
    # codebook c's frame t goes to row c + t: one fancy-indexed copy of the whole block
    rows[np.arange(k)[:, None] + np.arange(frames), np.arange(k)[:, None]] = codes
    return rows


def undo_v3_delay(rows: np.ndarray) -> np.ndarray:
    """(T + K - 1, K) delayed rows -> (K, T) codes: codebook c's frames are rows c .. c + T - 1."""
    length, k = rows.shape
    frames = max(length - (k - 1), 0)
    return rows[np.arange(k)[:, None] + np.arange(frames), np.arange(k)[:, None]].astype(np.int64)


def v3_labels(rows: np.ndarray, boc: int = BOC) -> np.ndarray:
    """Training targets of delayed target rows (any shape): BOC cells -> -100, codes and EOC kept."""
    return np.where(rows == boc, IGNORE, rows).astype(np.int64)
