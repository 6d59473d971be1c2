"""A ChatML conversation -> Llama-3 token ids, labels and audio items, as boson's prepare_chatml_sample gives them.

Written from boson_multimodal 0.1.1 (dataset/chatml_dataset.py `prepare_chatml_sample`, data_types.py) so that
the native environment, which cannot import boson, tokenizes exactly as boson's training does; the two are
compared on every demo manifest line and on hand-made edge cases (tests/test_chatml.py).

Per turn: `<|begin_of_text|>` (first turn only) `<|start_header_id|>ROLE<|end_header_id|>\\n\\n`, untrained; an
assistant's `RECIPIENT<|recipient|>`, always trained; each content part: text, or an audio item as
`<|audio_bos|><|AUDIO|><|audio_eos|>` (system/user, untrained) or `<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>`
(assistant); then `<|eom_id|>` when an assistant turn follows an assistant turn, else `<|eot_id|>`. Text, audio
and the end token are trained in assistant turns at or after `start_index` (every assistant turn without one).
Each piece is encoded on its own, as boson does, so the ids are the same for any tokenizer.

boson first checks the sample against its dataclasses with dacite (strict keys, checked types); what it refuses
(it prints and returns Nones, or raises) is refused here with a ChatMLError naming the sample and the field.
Its quirks are kept where they change a result: an audio item with a `text` and no `audio_url` is read as text
whose `type` says audio, a part whose `type` is neither text nor audio is dropped, audio in a turn of another
role is listed but gets no tokens, NaN counts as missing, ints count as floats and bools as ints.
"""

from __future__ import annotations

import math

from higgs_ds.errors import UserError

IGNORE_INDEX = -100
SAMPLE_KEYS = ("messages", "start_index", "misc", "speaker")  # ChatMLSample's fields; other keys are dropped
MESSAGE_KEYS = ("role", "content", "recipient")
AUDIO_FIELDS = ("audio_url", "raw_audio", "offset", "duration", "row_id", "type")  # AudioContent, in order
TEXT_FIELDS = ("text", "type")  # TextContent

AUDIO_IN = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_OUT = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
END_OF_TURN, END_OF_MESSAGE = "<|eot_id|>", "<|eom_id|>"


class ChatMLError(UserError):
    """A sample boson's prepare_chatml_sample refuses; the message names the sample and the field."""


class _Refused(Exception):
    """Internal: why the sample is refused, before the sample's name is added."""


def prepare_chatml(sample: dict, tokenizer, sample_id=None) -> tuple[list[int], list[int], list[dict]]:
    """(input_ids, label_ids, audio items in order) of a ChatML sample (JSON data: messages, start_index, misc,
    speaker), equal to boson's prepare_chatml_sample. Audio items are AudioContent's fields as a dict (or
    TextContent's, for a text part typed "audio"), defaults filled in. Raises ChatMLError for what boson refuses.
    The sample is not modified."""
    try:
        messages, start_index = _checked(sample)
        return _tokenize(messages, start_index, tokenizer)
    except _Refused as why:
        name = sample_id if sample_id is not None else _name_of(sample)
        raise ChatMLError(
            f"sample {name!r}: {why}; boson's prepare_chatml_sample refuses this ChatML (fix the manifest line)"
        ) from None


def _name_of(sample) -> str | None:
    misc = sample.get("misc") if isinstance(sample, dict) else None
    name = misc.get("id") if isinstance(misc, dict) else None
    return name if name is not None else (sample.get("id") if isinstance(sample, dict) else None)


# ------------------------------------------------------------------ the checks boson makes before tokenizing


def _checked(sample) -> tuple[list[tuple[str, str | None, list[dict]]], int | None]:
    """[(role, recipient, parts)] and start_index, or _Refused. Mirrors boson's NaN cleaning and dacite's
    from_dict(ChatMLSample, strict=True, check_types=True)."""
    if not isinstance(sample, dict):
        raise _Refused(f"a sample must be a JSON object, got {type(sample).__name__}")
    sample = dict(sample)
    for key in ("speaker", "start_index", "content"):  # boson's `if key in sample and pd.isna(sample[key])`
        if key in sample and _pandas_isna(sample[key], key) and key != "content":
            sample[key] = None
    sample = {k: _nan_to_none(sample[k]) for k in SAMPLE_KEYS if k in sample}
    if "messages" not in sample:
        raise _Refused("no 'messages'")
    messages = sample["messages"]
    if not isinstance(messages, list):
        raise _Refused(f"'messages' must be a list, got {type(messages).__name__}")
    start_index = sample.get("start_index")
    if start_index is not None and not isinstance(start_index, int):  # bool passes, as in dacite
        raise _Refused(f"'start_index' must be an integer, got {type(start_index).__name__}")
    if sample.get("misc") is not None and not isinstance(sample["misc"], dict):
        raise _Refused(f"'misc' must be an object, got {type(sample['misc']).__name__}")
    if sample.get("speaker") is not None and not isinstance(sample["speaker"], str):
        raise _Refused(f"'speaker' must be a string, got {type(sample['speaker']).__name__}")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)], start_index


def _pandas_isna(value, key: str) -> bool:
    """The truth of boson's `pd.isna(value)` for JSON data: None and NaN are missing; a list is an array whose
    truth exists only when it holds exactly one element (nested lists of one); anything else is not missing."""
    while isinstance(value, list):
        if len(value) != 1:
            raise _Refused(f"{key!r} is a list of {len(value)} items (boson's NaN check cannot tell if it is missing)")
        value = value[0]
    return value is None or (isinstance(value, float) and math.isnan(value))


def _nan_to_none(obj):
    """boson's convert_nan_to_none on JSON data: NaN -> None, tuples -> lists, recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _message(message, where: str) -> tuple[str, str | None, list[dict]]:
    if not isinstance(message, dict):
        raise _Refused(f"{where} must be an object, got {type(message).__name__}")
    _no_unknown_keys(message, MESSAGE_KEYS, where)
    role, recipient = message.get("role"), message.get("recipient")
    if not isinstance(role, str):
        raise _Refused(f"{where}: 'role' must be a string" + ("" if "role" in message else " (it is missing)"))
    if recipient is not None and not isinstance(recipient, str):
        raise _Refused(f"{where}: 'recipient' must be a string, got {type(recipient).__name__}")
    if recipient and role != "assistant":  # boson asserts this while tokenizing
        raise _Refused(f"{where}: a 'recipient' is only allowed on an assistant message, not {role!r}")
    if "content" not in message:
        raise _Refused(f"{where}: no 'content'")
    content = message["content"]
    if isinstance(content, str | dict):
        parts = [_part(content, f"{where}.content")]
    elif isinstance(content, list):
        parts = [_part(item, f"{where}.content[{j}]") for j, item in enumerate(content)]
    else:
        raise _Refused(f"{where}: 'content' must be a string, an object or a list, got {type(content).__name__}")
    return role, recipient, parts


def _part(item, where: str) -> dict:
    """A content part as the dataclass dacite builds: AudioContent if it fits, else TextContent, else refused.
    The result carries its class in "kind" (audio/text), its fields, and its own "type"."""
    if isinstance(item, str):
        return {"kind": "text", "text": item, "type": "text"}
    if not isinstance(item, dict):
        raise _Refused(f"{where}: a content part must be a string or an object, got {type(item).__name__}")
    if set(item) <= set(AUDIO_FIELDS) and _audio_types_ok(item):
        return {"kind": "audio", **{k: item.get(k) for k in AUDIO_FIELDS}, "type": item.get("type", "audio")}
    if set(item) <= set(TEXT_FIELDS) and isinstance(item.get("text"), str) and isinstance(item.get("type", ""), str):
        return {"kind": "text", "text": item["text"], "type": item.get("type", "text")}
    raise _Refused(
        f"{where}: {sorted(item)} is neither an audio part (audio_url: str; raw_audio, offset, duration, row_id, "
        "type) nor a text part (text: str; type), with those types"
    )


def _audio_types_ok(item: dict) -> bool:
    def number(v):  # dacite's numeric tower: an int (or bool) is a float
        return v is None or isinstance(v, int | float)

    return (
        isinstance(item.get("audio_url"), str)
        and (item.get("raw_audio") is None or isinstance(item["raw_audio"], str))
        and number(item.get("offset"))
        and number(item.get("duration"))
        and (item.get("row_id") is None or isinstance(item["row_id"], int))
        and isinstance(item.get("type", "audio"), str)
    )


def _no_unknown_keys(obj: dict, allowed: tuple, where: str) -> None:
    unknown = set(obj) - set(allowed)
    if unknown:
        raise _Refused(f"{where}: unknown keys {sorted(map(str, unknown))} (allowed: {', '.join(allowed)})")


# ------------------------------------------------------------------ tokens and labels


def _tokenize(messages, start_index, tokenizer) -> tuple[list[int], list[int], list[dict]]:
    encode = _encoder(tokenizer)
    input_ids, label_ids, audio = [], [], []

    def add(text: str, trained: bool) -> None:
        ids = encode(text)
        input_ids.extend(ids)
        label_ids.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    for turn, (role, recipient, parts) in enumerate(messages):
        trained = role == "assistant" and (start_index is None or turn >= start_index)
        begin = "<|begin_of_text|>" if turn == 0 else ""
        add(f"{begin}<|start_header_id|>{role}<|end_header_id|>\n\n", False)
        if recipient:
            add(f"{recipient}<|recipient|>", True)  # boson trains it whatever start_index says
        for j, part in enumerate(parts):
            if part["type"] == "text":
                if part["kind"] != "text":  # an AudioContent typed "text" has no text: boson fails on it
                    raise _Refused(f"messages[{turn}] part {j}: an audio part (it has 'audio_url') typed 'text'")
                add(part["text"], trained)
            elif part["type"] == "audio":
                audio.append({k: v for k, v in part.items() if k != "kind"})
                if role in ("user", "system"):
                    add(AUDIO_IN, False)
                elif role == "assistant":
                    add(AUDIO_OUT, trained)
        next_is_assistant = turn + 1 < len(messages) and messages[turn + 1][0] == "assistant"
        add(END_OF_MESSAGE if role == "assistant" and next_is_assistant else END_OF_TURN, trained)
    return input_ids, label_ids, audio


def _encoder(tokenizer):
    """tokenizer.encode without special tokens added, remembered within one sample (headers and audio markers
    repeat); a tokenizer failure refuses the sample, as boson's does."""
    memo: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in memo:
            try:
                memo[text] = list(tokenizer.encode(text, add_special_tokens=False))
            except Exception as err:  # noqa: BLE001 - text we do not control; boson refuses the sample too
                raise _Refused(f"the tokenizer could not encode {text[:40]!r} ({type(err).__name__}: {err})") from None
        return memo[text]

    return encode
