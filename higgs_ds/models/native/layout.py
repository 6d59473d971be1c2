"""The files of a transformers-native Higgs-Audio v2 model directory, laid out as Boson's current `main` of
bosonai/higgs-audio-v2-generation-3B-base (the HF converter's output):

    config.json                 HiggsAudioV2Config (model_type "higgs_audio_v2", codebook_size 1026)
    model.safetensors           or model.safetensors.index.json + shards; with text_lm_head.weight
    generation_config.json      bos/eos(<|eot_id|>)/pad, repetition-aware sampling ras_win_len 7,
                                ras_win_max_num_repeat 2, use_text_head
    processor_config.json       HiggsAudioV2Processor: placeholder tokens, stream BOS/EOS ids, the DAC
                                feature extractor's settings, and a *reference* to the audio tokenizer
                                (class + name or path: the codec is a separate directory/repository)
    chat_template.jinja         the prompt format
    tokenizer.json, tokenizer_config.json

`write_native_extras` writes every one of them but config.json and the weights. It writes plain JSON /
text (no transformers 5 class needed), so the boson -> native conversion can call it from either
environment; the tests check the result against what transformers' own save_pretrained writes and that
HiggsAudioV2Processor.from_pretrained reads it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from higgs_ds.models.tiny import CODEBOOK_SIZE
from higgs_ds.safe_io import atomic_write_json, atomic_write_text

PROCESSOR_CLASS = "HiggsAudioV2Processor"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What a native directory must hold besides its weights (one of WEIGHTS_FILE / WEIGHTS_INDEX_FILE).
NATIVE_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, PROCESSOR_CONFIG_FILE, CHAT_TEMPLATE_FILE, *TOKENIZER_FILES)

# The codec Boson's processor refers to; a local codec directory may be named instead.
DEFAULT_AUDIO_TOKENIZER = "bosonai/higgs-audio-v2-tokenizer"

# Repetition-aware sampling of the converted release (generation_higgs_audio_v2.py reads these two).
RAS_WIN_LEN, RAS_WIN_MAX_NUM_REPEAT = 7, 2
STREAM_BOS, STREAM_EOS = CODEBOOK_SIZE, CODEBOOK_SIZE + 1

# The processor's placeholder tokens: one <|AUDIO_OUT|> per framed audio column, then the delay token for
# the K - 1 delay columns, between <|audio_out_bos|> and <|audio_eos|>.
AUDIO_TOKEN, AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>"
AUDIO_DELAY_TOKEN = "<|reserved_special_token_6|>"

# The prompt exactly as boson's prepare_chatml_sample writes it (the text higgs-ds trains on): Llama-3
# headers, <|begin_of_text|> before the first turn, <|eom_id|> after an assistant turn followed by another,
# text kept as written (not trimmed), `recipient`, and a `scene` message (the processor's convention) folded
# into the system turn as boson's scene block. Every audio item is an <|AUDIO_OUT|> placeholder, the one
# token the processor expands: assistant audio after <|audio_out_bos|>, user/system audio (boson's audio-in)
# after <|audio_bos|>, so the processor's expansion equals the native training layout.
CHAT_TEMPLATE = """\
{%- macro render(content, audio) -%}
{%- if content is string -%}{{ content }}
{%- else -%}
{%- if content is mapping -%}{%- set content = [content] -%}{%- endif -%}
{%- for item in content -%}
{%- if item is string -%}{{ item }}
{%- elif item['type'] == 'text' -%}{{ item['text'] }}
{%- elif item['type'] == 'audio' -%}{{ audio }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
{%- set role = message['role'] -%}
{%- if role != 'scene' -%}
{%- if loop.first -%}{{ bos_token }}{%- endif -%}
{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}
{%- if role == 'assistant' -%}{%- set audio = '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -%}
{%- else -%}{%- set audio = '<|audio_bos|><|AUDIO_OUT|><|audio_eos|>' -%}{%- endif -%}
{%- if message['recipient'] is defined and message['recipient'] -%}{{ message['recipient'] + '<|recipient|>' }}
{%- endif -%}
{{- render(message['content'], audio) -}}
{%- set next = messages[loop.index] if not loop.last else none -%}
{%- if role == 'system' and next is not none and next['role'] == 'scene' -%}
{{- '\\n\\n<|scene_desc_start|>\\n' + render(next['content'], audio) + '\\n<|scene_desc_end|>' -}}
{%- endif -%}
{%- if role == 'assistant' and next is not none and next['role'] == 'assistant' -%}{{ '<|eom_id|>' }}
{%- else -%}{{ '<|eot_id|>' }}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' }}
{%- endif -%}
"""

# DacFeatureExtractor settings of the release: raw 24 kHz mono samples, right-padded with zeros.
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "DacFeatureExtractor",
    "feature_size": 1,
    "hop_length": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: not a Higgs-Audio v2 (Llama-3) tokenizer")
    return token_id


def _with_pad(tokenizer):
    """The tokenizer with a pad token (the converter uses <|end_of_text|>, the eos), the caller's untouched."""
    if tokenizer.pad_token is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generation_config(tokenizer) -> dict:
    """generation_config.json: generation stops at <|eot_id|>; RAS as in the converted release."""
    return {
        "_from_model_config": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": _token_id(tokenizer, "<|eot_id|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "ras_win_len": RAS_WIN_LEN,
        "ras_win_max_num_repeat": RAS_WIN_MAX_NUM_REPEAT,
        "use_text_head": True,
    }


def processor_config(audio_tokenizer: str | Path = DEFAULT_AUDIO_TOKENIZER) -> dict:
    """processor_config.json as HiggsAudioV2Processor.save_pretrained writes it. transformers loads the
    audio tokenizer from `audio_tokenizer` with from_pretrained: a hub name, or a local directory (written
    as an absolute path, since transformers resolves a relative one against the working directory)."""
    reference = str(audio_tokenizer)
    if Path(reference).is_dir():
        reference = str(Path(reference).resolve())
    return {
        "audio_bos_token": AUDIO_BOS_TOKEN,
        "audio_delay_token": AUDIO_DELAY_TOKEN,
        "audio_eos_token": AUDIO_EOS_TOKEN,
        "audio_stream_bos_id": STREAM_BOS,
        "audio_stream_eos_id": STREAM_EOS,
        "audio_token": AUDIO_TOKEN,
        "audio_tokenizer": {
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": reference,
        },
        "feature_extractor": dict(FEATURE_EXTRACTOR),
        "processor_class": PROCESSOR_CLASS,
    }


def _mark_processor_tokenizer(path: Path) -> None:
    """The processor_class entry HiggsAudioV2Processor.save_pretrained adds to the tokenizer's config."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["processor_class"] = PROCESSOR_CLASS
    atomic_write_json(path, config, indent=2)


def write_native_extras(out_dir: Path, tokenizer, audio_tokenizer: str | Path = DEFAULT_AUDIO_TOKENIZER) -> None:
    """Write everything of a native model directory but config.json and the weights: the tokenizer,
    generation_config.json, processor_config.json and chat_template.jinja."""
    out_dir = Path(out_dir)
    for token in (AUDIO_TOKEN, AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN, AUDIO_DELAY_TOKEN, "<|audio_bos|>"):
        _token_id(tokenizer, token)
    tokenizer = _with_pad(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    _mark_processor_tokenizer(out_dir / "tokenizer_config.json")
    atomic_write_json(out_dir / GENERATION_CONFIG_FILE, generation_config(tokenizer), indent=2, sort_keys=True)
    atomic_write_json(out_dir / PROCESSOR_CONFIG_FILE, processor_config(audio_tokenizer), indent=2, sort_keys=True)
    atomic_write_text(out_dir / CHAT_TEMPLATE_FILE, CHAT_TEMPLATE)


def missing_native_files(model_dir: str | Path) -> list[str]:
    """The files of NATIVE_FILES and the weights that `model_dir` lacks (empty when it is complete)."""
    model_dir = Path(model_dir)
    missing = [name for name in NATIVE_FILES if not (model_dir / name).is_file()]
    if not (model_dir / WEIGHTS_FILE).is_file() and not (model_dir / WEIGHTS_INDEX_FILE).is_file():
        missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})")
    return missing
