"""Evaluation audio: a shard record's prompt -> the model family's own generation loop -> codes -> codec waveform.

The prompt is the record's conversation up to (not including) its last assistant audio turn, followed by
`<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`, which is what boson's serve engine
builds with `force_audio_gen=True`. Audio already in the prompt (a voice-cloning reference) goes in as the
record's own codes: nothing is decoded or re-encoded. One prompt for both families (prompt_from_record);
each family lays it out and generates its own way:

* boson (HiggsAudioModel): `HiggsAudioModel.generate` (boson's `_sample`: audio/text mode switching, delay
  pattern, repetition-aware sampling) with a StaticCache bucket as the serve engine does;
* native (HiggsAudioV2ForConditionalGeneration): transformers' own `generate()` on the native layout of the
  same prompt (higgs_ds.models.native.generate). Greedy codes equal boson's on the same weights
  (tests/test_native_generate.py); sampled ones are repeatable per family;
* v3 (Higgs TTS 3): its own prompt (the training prompt's prefix, higgs_ds.models.v3.prompt) and loop with
  v3's delay rules (higgs_ds.models.v3.generate); no repetition-aware sampling (v3 has none).

    prompt = prompt_from_record(record, tokenizer)     # record from read_shard / read_positions
    wave, codes = generate_audio(model, tokenizer, codec, record, max_new_frames=250, seed=0)
    codes = generate_codes(model, tokenizer, record, max_new_frames=250, seed=0)   # without the codec

Under DeepSpeed ZeRO-3 call it on every rank with the same record and seed: see `generate_codes`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch

from higgs_ds.models.family import MODEL_TYPES, NATIVE, V3
from higgs_ds.stream.tokens import chatml_tokens

# The serve engine's forced-audio suffix (serve_engine.py, _prepare_inputs with force_audio_gen=True).
AUDIO_GEN_POSTFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"


@dataclass
class Prompt:
    """What the model is asked to continue: token ids (ending in the forced-audio suffix), the codes of
    the audio items already in the conversation, in order, with their frame counts, and the text the
    generated audio should say (the user turn before the target, for logging)."""

    sample_id: str | None
    input_ids: list[int]
    codes: np.ndarray  # (num_codebooks, sum(frames)), int64
    frames: list[int]
    text: str


def has_audio(content) -> bool:
    items = content if isinstance(content, list) else [content]
    return any(isinstance(c, dict) and c.get("type") == "audio" for c in items)


def _text_of(content) -> str:
    items = content if isinstance(content, list) else [content]
    parts = [
        c if isinstance(c, str) else c.get("text", "") for c in items if isinstance(c, str) or c.get("type") == "text"
    ]
    return " ".join(p for p in parts if p)


def prompt_from_record(record: dict, tokenizer) -> Prompt:
    """The record's conversation before its last assistant audio turn, tokenized as boson's
    prepare_chatml_sample does (higgs_ds.stream.tokens.chatml_tokens), plus the forced-audio suffix; the
    prompt's audio items take the first len(items) of the record's codes (the shard keeps them in order of
    appearance). The same prompt for both families: their token ids are the same Llama-3 ids."""
    meta = record["json"]
    messages = meta["messages"]
    targets = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and has_audio(m.get("content"))]
    if not targets:
        raise ValueError(f"sample {meta.get('id')!r} has no assistant audio turn to generate")
    turns = messages[: targets[-1]]
    input_ids, _, num_audio = chatml_tokens({"messages": turns}, tokenizer, meta.get("id"))
    input_ids = list(input_ids) + tokenizer.encode(AUDIO_GEN_POSTFIX, add_special_tokens=False)
    frames = [int(item["frames"]) for item in meta["audio"][:num_audio]]
    codes = np.asarray(record["codes"][:, : sum(frames)], dtype=np.int64)
    users = [m for m in turns if m.get("role") == "user"]
    return Prompt(meta.get("id"), input_ids, codes, frames, _text_of(users[-1]["content"]) if users else "")


def prepare_inputs(prompt: Prompt, model_config, device=None) -> dict:
    """The keyword arguments of `model.generate` for one prompt, made by boson's HiggsAudioSampleCollator
    as the serve engine makes them (round_to=1: no padding after `<|audio_out_bos|>`), except that
    audio-in codes are kept when the model reads them (the serve engine drops them)."""
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    from higgs_ds.stream.collate import make_collator

    collator = make_collator(model_config, round_to=1)
    starts = np.cumsum([0] + prompt.frames[:-1]) if prompt.frames else None
    sample = ChatMLDatasetSample(
        input_ids=torch.tensor(prompt.input_ids, dtype=torch.long),
        label_ids=None,
        audio_ids_concat=torch.from_numpy(prompt.codes) if prompt.frames else None,
        audio_ids_start=torch.tensor(starts, dtype=torch.long) if prompt.frames else None,
        audio_waveforms_concat=None,
        audio_waveforms_start=None,
        audio_sample_rate=None,
        audio_speaker_indices=None,
    )
    batch = collator([sample])
    return {k: (v.to(device) if device is not None and torch.is_tensor(v) else v) for k, v in vars(batch).items()}


def _static_cache_bucket(model, length: int) -> OrderedDict:
    """One StaticCache bucket `{length: cache}` built like the serve engine's: the text config with a
    cache layer added per dual-FFN layer (an upper bound that also covers audio self-attention layers)."""
    from transformers.cache_utils import StaticCache

    cache_config = deepcopy(model.config.text_config)
    cache_config.num_hidden_layers += len(model.config.audio_dual_ffn_layers or [])
    cache = StaticCache(config=cache_config, batch_size=1, max_cache_len=length, device=model.device, dtype=model.dtype)
    return OrderedDict([(length, cache)])


def _cache_length(inputs: dict, max_new_tokens: int) -> int:
    """Positions the cache must hold: the prompt with its audio expanded (bounded by text tokens + audio
    columns) plus one per generation step; a rank that finished first under synced_gpus also adds one
    per step, for no more than max_new_tokens steps in all. Rounded up to 64."""
    keys = ("input_ids", "audio_in_ids", "audio_out_ids")
    prompt = sum(inputs[k].shape[-1] for k in keys if inputs.get(k) is not None)
    return -(-(prompt + max_new_tokens) // 64) * 64


def codes_from_generated(sequence: torch.Tensor, model_config) -> np.ndarray:
    """A generated audio stream (num_codebooks, columns, delayed, starting with the BOS column) -> codes
    (num_codebooks, T) in [0, codebook_size): the delay reverted, the BOS frame dropped, cut at the first
    frame holding an EOS (the serve engine always drops the last frame, assuming it is the EOS; a stream
    cut by max_new_frames ends on a real frame), then clipped as the serve engine does (a sampled BOS id
    mid-stream)."""
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    seq = sequence.detach().long().cpu()
    frames = (revert_delay_pattern(seq) if model_config.use_delay_pattern else seq)[:, 1:]
    ended = (frames == model_config.audio_stream_eos_id).any(dim=0).nonzero()
    if len(ended):
        frames = frames[:, : int(ended[0])]
    return frames.clip(0, model_config.audio_codebook_size - 1).numpy()


def _unwrap(model):
    """The HiggsAudioModel / HiggsAudioV2ForConditionalGeneration inside a DeepSpeed engine / DDP (`.module`)
    or a PEFT model (LoRA layers are injected into the base model's modules, so its generate runs the adapted
    weights)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _eval_mode(model):
    """model.eval() for the duration, then every submodule's own training flag back. Eval matters under
    ZeRO-3: its parameter coordinator is chosen by the training flag (DeepSpeed issue #4922)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _family_of(config) -> str:
    """NATIVE, BOSON or V3, from the loaded model's config (the directory's config.json said the same)."""
    family = MODEL_TYPES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"not a Higgs-Audio v2 model: config model_type {getattr(config, 'model_type', None)!r}")
    return family


def _sampling(temperature: float, top_k: int | None, top_p: float) -> dict:
    """Generation-config sampling arguments: temperature 0 is greedy (as in the serve engine)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


def generate_codes(
    model,
    tokenizer,
    record: dict,
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
    """Generate the codes (num_codebooks, T) int64 in [0, codebook_size) of the record's last assistant
    audio turn from its prompt; T <= max_new_frames (fewer when the model ends the audio itself).
    Sampling defaults are the serve engine's; temperature 0 is greedy; ras_win_len None (or 0) turns
    repetition-aware sampling off. The same seed gives the same codes (boson draws every sample from its own
    torch.Generator seeded with it; the native loop from the global generator, seeded for this call only).
    `model` is either family's model, possibly inside PEFT, DDP or a DeepSpeed engine.

    ZeRO-3: call on every rank with the same record and seed. `synced_gpus=None` lets transformers turn
    it on when ZeRO-3 is enabled and world size > 1 (both loops take it), so a rank that finishes first
    keeps running forwards, through the same modules, until all have finished. No inference mode: it
    would make ZeRO-3's gathered (persistent) parameters inference tensors and break the next backward."""
    higgs = _unwrap(model)
    if _family_of(higgs.config) == V3:  # its own prompt and rules (no repetition-aware sampling in v3)
        from higgs_ds.models.v3.generate import generate_v3_codes, record_prompt

        prompt_ids, ref_rows = record_prompt(record, tokenizer)
        with _eval_mode(model), torch.no_grad():
            return generate_v3_codes(
                higgs,
                prompt_ids.tolist(),
                ref_rows,
                pad_id=tokenizer.pad_token_id,
                max_new_frames=max_new_frames,
                seed=seed,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                synced_gpus=synced_gpus,
            )
    prompt = prompt_from_record(record, tokenizer)
    options = dict(
        max_new_frames=max_new_frames,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        ras_win_len=ras_win_len,
        ras_win_max_num_repeat=ras_win_max_num_repeat,
        synced_gpus=synced_gpus,
    )
    with _eval_mode(model), torch.no_grad():
        if _family_of(higgs.config) == NATIVE:
            from higgs_ds.models.native.generate import generate_native_codes

            return generate_native_codes(higgs, tokenizer, prompt.input_ids, prompt.codes, prompt.frames, **options)
        return _boson_codes(higgs, tokenizer, prompt, **options)


def _boson_codes(
    higgs,
    tokenizer,
    prompt: Prompt,
    *,
    max_new_frames: int,
    seed: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    ras_win_len: int | None,
    ras_win_max_num_repeat: int,
    synced_gpus: bool | None,
) -> np.ndarray:
    """boson's HiggsAudioModel.generate on the prompt (see generate_codes). Boson's generate is wrapped in
    torch.inference_mode (see generate_codes): it is called unwrapped, under the caller's torch.no_grad."""
    config = higgs.config
    inputs = prepare_inputs(prompt, config, higgs.device)
    delay = config.audio_num_codebooks - 1 if config.use_delay_pattern else 0
    max_new_tokens = max_new_frames + 1 + delay  # one step per column: the BOS column, T frames, the delay tail
    generate = type(higgs).generate
    generate = getattr(generate, "__wrapped__", generate)  # without its torch.inference_mode (see above)
    _, audio = generate(
        higgs,
        **inputs,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        **_sampling(temperature, top_k, top_p),
        # one audio turn: stop at its <|audio_eos|> (forced once every codebook has ended) or a turn end
        eos_token_id=[
            config.audio_eos_token_id,
            *tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"]),
        ],
        pad_token_id=config.pad_token_id,
        past_key_values_buckets=_static_cache_bucket(higgs, _cache_length(inputs, max_new_tokens)),
        ras_win_len=ras_win_len if ras_win_len and ras_win_len > 0 else None,
        ras_win_max_num_repeat=ras_win_max_num_repeat,
        seed=seed,
        synced_gpus=synced_gpus,
    )
    if not audio:
        return np.zeros((config.audio_num_codebooks, 0), np.int64)
    return codes_from_generated(audio[0], config)


def generate_audio(
    model, tokenizer, codec, record: dict, *, max_new_frames: int, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """generate_codes, then the codec: (waveform float32 (T * hop,) at the codec's sample rate, codes
    (num_codebooks, T)). Keyword arguments as generate_codes (seed, temperature, synced_gpus, ...)."""
    codes = generate_codes(model, tokenizer, record, max_new_frames=max_new_frames, **kwargs)
    return decode(codec, codes), codes


def decode(codec, codes: np.ndarray) -> np.ndarray:
    """Codes (num_codebooks, T) -> float32 mono waveform at the codec's sample rate: the codec's own decode
    where it has one (either family's codec), else boson's HiggsAudioTokenizer.decode."""
    if codes.shape[1] == 0:
        return np.zeros(0, np.float32)
    if callable(getattr(codec, "decode", None)):
        return np.asarray(codec.decode(np.ascontiguousarray(codes)), dtype=np.float32).reshape(-1)
    with torch.no_grad():
        wave = codec.model.decode(torch.from_numpy(np.ascontiguousarray(codes))[None])  # numpy (1, 1, n)
    return np.asarray(wave[0, 0], dtype=np.float32)
