"""Generation for the native family: a prompt -> transformers' own HiggsAudioV2 `generate()` -> codes (K, T).

The prompt is what higgs_ds.eval.generate builds for both families: boson's prepare_chatml_sample tokens of
the conversation before the target turn, ending in `...assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`,
with ONE placeholder per audio item already in it (a cloning reference, audio-in), and those items' codes.
NativeCollator (round_to=1: nothing after <|audio_out_bos|>) turns it into the native layout, the one training
uses: each item of T frames -> (T + 2) x audio_token_id + (K - 1) x audio_delay_token_id, and its codes framed
[stream BOS, codes, stream EOS] and delayed in audio_input_ids (1, F, K).

transformers' loop (generation_higgs_audio_v2.py) then does what boson's `_sample` does in audio mode: one
delayed column per step; its delay-pattern logits processor forces stream BOS on codebooks k >= s at step s
(s < K) after <|audio_out_bos|> and, once a stream EOS appears, EOS on codebook 0 the next step, on 0-1 the
step after, one more per step; it stops after a column that is all EOS. Boson forces the same cells when
the first EOS comes on codebook 0 (what training teaches: codebook k's EOS target is k columns after
codebook 0's), so greedy codes are equal then
(tests/test_native_generate.py, on converted weights). When a later codebook k ends first, boson also ends
codebooks 0..k-1 in that column and transformers does not: the loops diverge (measured on a tiny model made
to end on codebook 3: the same lengths, other codes).

Repetition-aware sampling differs between the two loops (native: a window over all audio columns, prompt
included, BOS/EOS not counted; boson: the audio-out columns, BOS/EOS counted) and so do the random streams:
sampled codes are repeatable per family, not equal across families.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from higgs_ds.models.native.batch import NativeCollator
from higgs_ds.stream.tokens import EncodedSample

IGNORE = -100


def prompt_inputs(config, tokenizer, input_ids: list[int], codes: np.ndarray, frames: list[int], device=None) -> dict:
    """`generate()`'s keyword arguments for one prompt (boson's tokens, one placeholder per audio item, and the
    items' codes (K, sum(frames))): input_ids and attention_mask (1, S) in the native layout, and for a prompt
    with audio audio_input_ids (1, F, K) + audio_input_ids_mask (1, F). A prompt without audio gets none: the
    loop starts its own audio stream (an empty (1, 0, K) one would put its first step in decoding mode)."""
    ids = np.asarray(input_ids, np.int64)
    sample = EncodedSample("prompt", ids, np.full_like(ids, IGNORE), np.asarray(codes, np.int64), list(frames))
    batch = NativeCollator(config, tokenizer, round_to=1)([sample])
    keys = ("input_ids", "attention_mask") + (("audio_input_ids", "audio_input_ids_mask") if frames else ())
    return {k: batch[k].to(device) if device is not None else batch[k] for k in keys}


def generation_config(
    config,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    ras_win_len: int | None,
    ras_win_max_num_repeat: int,
):
    """A GenerationConfig saying everything the loop reads. generate() fills every field left None from the
    model's generation_config.json and then transformers' defaults (top_k 50, the release's ras_win_len 7), so
    "off" has to be a value: top_k 0, top_p 1.0, and for repetition-aware sampling a window of 1 that needs 2
    repeats, which never triggers. Stop at the text token the loop appends after an all-EOS column
    (config.eos_token_id; the release's generation_config says <|eot_id|>, the same id there)."""
    from transformers import GenerationConfig

    ras = (ras_win_len, ras_win_max_num_repeat) if ras_win_len and ras_win_len > 0 else (1, 2)
    sampling = (
        {"do_sample": True, "temperature": float(temperature), "top_k": int(top_k or 0), "top_p": float(top_p)}
        if temperature > 0
        else {"do_sample": False}  # warpers are not applied without sampling
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        use_cache=True,
        num_beams=1,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        ras_win_len=ras[0],
        ras_win_max_num_repeat=ras[1],
        **sampling,
    )


def codes_from_audio_ids(generated: torch.Tensor, config) -> np.ndarray:
    """The generated columns (L, K), delayed, starting with the all-BOS column -> codes (K, T) in
    [0, audio_stream_bos_id): the delay undone (codebook k's frames start k columns later), the BOS frame
    dropped, cut at the first frame holding a stream EOS (a stream cut by max_new_frames ends on a real
    frame), a stream BOS sampled mid-stream clipped to the last code, as boson's serve engine and the native
    processor's batch_decode do."""
    seq = generated.detach().long().cpu().T  # (K, L)
    k, length = seq.shape
    if length < k:  # not even the delay tail of the BOS frame
        return np.zeros((k, 0), np.int64)
    frames = torch.stack([seq[i, i : length - k + 1 + i] for i in range(k)])[:, 1:]
    ended = (frames == config.audio_stream_eos_id).any(dim=0).nonzero()
    if len(ended):
        frames = frames[:, : int(ended[0])]
    return frames.clip(0, config.audio_stream_bos_id - 1).numpy()  # codes are the ids below the stream ids


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """transformers samples from the global torch RNG: seed it for this call only, so the same seed gives the
    same codes on every rank and training's own random stream (dropout, data order) is left as it was."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_native_codes(
    model,
    tokenizer,
    input_ids: list[int],
    codes: np.ndarray,
    frames: list[int],
    *,
    max_new_frames: int,
    seed: int = 0,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float = 0.95,
    ras_win_len: int | None = 7,
    ras_win_max_num_repeat: int = 2,
    synced_gpus: bool | None = None,
) -> np.ndarray:
    """Codes (K, T), T <= max_new_frames, of the audio a HiggsAudioV2ForConditionalGeneration (unwrapped: the
    caller's _eval_mode / no_grad apply) generates after the prompt. One step per column: the BOS column, T
    frames, the K - 1 delay columns. synced_gpus None lets transformers decide (on under ZeRO-3 with world
    size > 1), as for boson's loop."""
    config = model.config
    inputs = prompt_inputs(config, tokenizer, input_ids, codes, frames, model.device)
    prompt_columns = inputs["audio_input_ids"].shape[1] if "audio_input_ids" in inputs else 0
    max_new_tokens = max_new_frames + config.num_codebooks  # 1 + T + (K - 1)
    gen_config = generation_config(
        config,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        ras_win_len=ras_win_len,
        ras_win_max_num_repeat=ras_win_max_num_repeat,
    )
    with _seeded(seed, model.device):
        audio = model.generate(**inputs, generation_config=gen_config, synced_gpus=synced_gpus)
    return codes_from_audio_ids(audio[0, prompt_columns:], config)
