"""Generation for Higgs TTS 3: a prompt -> one delayed row per step -> codes (8, T).

The prompt is the v3 training prompt up to and including <|audio|> (higgs_ds.models.v3.prompt): text ids,
with -100 at the slots of a cloning reference, whose delayed rows come as `ref_rows`. The hidden state at
<|audio|> predicts delayed row 0; the row sampled at step r is fed back as the next position's input (its
fused embedding) and predicts row r + 1 (docs/research/higgs-tts-3-facts.md, sections 5-6).

The delay constraints of row r, with T the frame count once known (the row where codebook 0 emitted EOC):

    codebook c is BOC when r < c (the ramp-in), EOC when T is known and r >= c + T (the wind-down),
    sampled otherwise, never BOC there, and EOC only on codebook 0 (which is how the audio ends).

Generation stops after row T + 6: the T + 7 rows of the delay pattern, no all-BOC or all-EOC row. With no EOC
by row `max_new_frames`, codebook 0 is ended there. The public inference code forces the ramp-in cells after
sampling and masks BOC/EOC on the rest (vllm-omni); the result is the same rows. Sampling defaults are
sglang-omni's (temperature 1, no top-k/top-p); temperature <= 0 is greedy.

Under ZeRO-3 with several ranks every rank must run the same forwards: call it on every rank; a rank whose
audio has ended keeps stepping (its rows discarded) until every rank's has (`synced_gpus`).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CODEBOOKS, CODEBOOK_SIZE = 8, 1026
BOC, EOC = 1024, 1025
IGNORE = -100


def row_constraints(r: int, frames: int | None, k: int = NUM_CODEBOOKS) -> tuple[np.ndarray, np.ndarray]:
    """(forced (k,) int64 with -1 where sampled, eoc_allowed (k,) bool) for delayed row r."""
    c = np.arange(k)
    forced = np.full(k, -1, np.int64)
    forced[r < c] = BOC
    if frames is not None:
        forced[r >= c + frames] = EOC
    eoc_allowed = (c == 0) & (frames is None)
    return forced, eoc_allowed


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose_row(logits, r: int, frames: int | None, *, temperature: float, top_k, top_p, generator) -> np.ndarray:
    """Delayed row r from its logits (8, 1026) under the delay constraints (see the module doc)."""
    forced, eoc_allowed = row_constraints(r, frames, logits.shape[0])
    logits = logits.float().clone()
    logits[:, BOC] = float("-inf")
    logits[~torch.from_numpy(eoc_allowed).to(logits.device), EOC] = float("-inf")
    if temperature <= 0:
        row = logits.argmax(-1)
    else:
        probs = _filter(logits / temperature, top_k, top_p).softmax(-1)
        row = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]
    row = row.cpu().numpy().astype(np.int64)
    return np.where(forced >= 0, forced, row)


def undo_delay(rows: np.ndarray) -> np.ndarray:
    """(T + 7, 8) delayed rows -> (8, T) codes: codebook c's frames are rows c .. c + T - 1."""
    k = rows.shape[1]
    frames = rows.shape[0] - (k - 1)
    if frames <= 0:
        return np.zeros((k, 0), np.int64)
    return np.stack([rows[c : c + frames, c] for c in range(k)])


def record_prompt(record: dict, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids ending in <|audio|> with -100 at reference slots, reference rows (M, 8)) of a shard-style
    record: a training or evaluation record (its target audio listed) or a synthesis request's (only the
    references' audio listed: higgs_ds.eval.synth_request.prompt_record). Through the training encoder, so
    the prompt is the training prompt's prefix and the same records are refused (dialogue, several voices)."""
    from higgs_ds.models.v3.prompt import V3SampleEncoder

    meta = record["json"]
    turns = [m for m in meta.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    items, codes = list(meta.get("audio") or []), np.asarray(record["codes"])
    if len(items) == len(turns) - 1:  # the target is what is generated: a stand-in frame lets it encode
        items.append({"frames": 1})
        codes = np.concatenate([codes[:NUM_CODEBOOKS], np.zeros((NUM_CODEBOOKS, 1), codes.dtype)], axis=1)
    meta = dict(meta, audio=items)
    if not meta.get("start_index"):  # a request's conversation: every turn before the target is prompt
        meta["start_index"] = len(meta.get("messages") or []) - 1
    sample = V3SampleEncoder(tokenizer)(dict(record, json=meta, codes=codes))
    prompt = sample.input_ids[: sample.out_start + 1]
    return prompt, sample.slot_rows[: int((prompt == IGNORE).sum())]


def _all_done(done: bool, synced: bool, device) -> bool:
    if not synced:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def _synced(synced_gpus: bool | None) -> bool:
    if synced_gpus is not None:
        return synced_gpus
    from transformers.integrations import is_deepspeed_zero3_enabled

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return bool(is_deepspeed_zero3_enabled() and dist and torch.distributed.get_world_size() > 1)


def generate_v3_codes(
    model,
    prompt_ids: list[int],
    ref_rows: np.ndarray | None,
    *,
    pad_id: int,
    max_new_frames: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    synced_gpus: bool | None = None,
) -> np.ndarray:
    """Codes (8, T) int64 in [0, 1024) of the audio the prompt asks for, T <= max_new_frames. `model` is the
    v3 model (its forward as higgs_ds.models.v3.model; inside PEFT or DeepSpeed is fine); `prompt_ids` end in
    <|audio|> and hold -100 at the reference slots, whose delayed rows are `ref_rows` (M, 8)."""
    device = next(model.parameters()).device
    synced = _synced(synced_gpus)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    in_mask = ids == IGNORE
    ids = ids.masked_fill(in_mask, pad_id)
    rows_in = torch.as_tensor(np.zeros((0, NUM_CODEBOOKS)) if ref_rows is None else ref_rows, dtype=torch.long)
    out_mask = torch.zeros_like(in_mask)
    out_mask[0, -1] = True
    length = ids.shape[1]
    step_ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    one = torch.ones((1, 1), dtype=torch.bool, device=device)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        audio_in_codes=rows_in.to(device),
        audio_in_mask=in_mask,
        audio_out_mask=out_mask,
        use_cache=True,
    )
    rows, frames, done, r = [], None, False, 0
    while True:
        if not done:
            row = choose_row(
                out.audio_logits[-1], r, frames, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            rows.append(row)
            if frames is None and (row[0] == EOC or r == max_new_frames):
                frames = r
                row[0] = EOC
            done = frames is not None and r == frames + NUM_CODEBOOKS - 2
            r += 1
        if _all_done(done, synced, device):
            break
        fed = torch.as_tensor(rows[-1], dtype=torch.long, device=device)[None]
        length += 1
        out = model(
            input_ids=step_ids,
            attention_mask=torch.ones((1, length), dtype=torch.long, device=device),
            audio_in_codes=fed,
            audio_in_mask=one,
            audio_out_mask=one,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return undo_delay(np.stack(rows))
