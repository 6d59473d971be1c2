"""Stage 1 of the data flow: manifest lines -> validated samples, or named rejects.

Two line formats are read (JSON Lines, UTF-8; blank lines are ignored and not counted):

* ChatML, boson's native format:
  {"messages": [{"role": "system"|"user"|"assistant", "content": str | item | [str | item, ...]}, ...],
   "speaker": str?, "start_index": int?, "misc": {"id": str?, ...}?}
  with items {"type": "text", "text": str} or {"type": "audio", "audio_url": "relative/or/absolute.wav"}.
* Plain TTS: {"audio": path, "text": str, "speaker": str?, "id": str?}, turned into a ChatML sample
  (system instruction, user text, assistant audio).

Audio paths are relative to the manifest's folder and may not leave it (absolute paths are taken as
they are). Every line yields exactly one ManifestSample or one Reject, so accepted + rejected = lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from higgs_ds.errors import UserError

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."


@dataclass(frozen=True)
class ManifestSample:
    sample_id: str
    manifest: str
    line: int
    chatml: dict  # messages / speaker / start_index / misc, as prepare_chatml_sample takes them
    audio_paths: tuple[str, ...] = field(default=())  # resolved, in order of appearance


@dataclass(frozen=True)
class Reject:
    manifest: str
    line: int
    sample_id: str | None
    reason: str

    def to_json(self) -> dict:
        return {"manifest": self.manifest, "line": self.line, "sample_id": self.sample_id, "reason": self.reason}


class BadSample(UserError):
    pass


def audio_items(messages: list) -> Iterator[tuple[int, dict]]:
    """(message index, audio item) in the order prepare_chatml_sample appends them to audio_contents."""
    for i, message in enumerate(messages):
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and item.get("type") == "audio":
                yield i, item


def _check_content_item(item, where: str) -> None:
    if isinstance(item, str):
        return
    if not isinstance(item, dict):
        raise BadSample(f"{where}: content must be a string or an object with a 'type', got {type(item).__name__}")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise BadSample(f"{where}: text item needs a string 'text'")
    elif kind == "audio":
        url = item.get("audio_url")
        if not isinstance(url, str) or not url.strip():
            raise BadSample(f"{where}: audio item has no 'audio_url'")
        unknown = set(item) - {"type", "audio_url", "raw_audio", "offset", "duration", "row_id"}
        if unknown:
            raise BadSample(f"{where}: audio item has unknown keys {sorted(unknown)}")
        if item.get("raw_audio") or item.get("offset") is not None or item.get("duration") is not None:
            raise BadSample(f"{where}: inline raw_audio, offset and duration are not supported; cut the clip to a file")
    else:
        raise BadSample(f"{where}: unknown content type {kind!r} (expected 'text' or 'audio')")


def _check_chatml(obj: dict) -> dict:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadSample("'messages' is missing or empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadSample(f"{where} is not an object")
        if message.get("role") not in ROLES:
            raise BadSample(f"{where}: unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
        if "content" not in message or message["content"] is None:
            raise BadSample(f"{where}: no 'content'")
        content = message["content"]
        items = content if isinstance(content, list) else [content]
        if not items:
            raise BadSample(f"{where}: empty content list")
        for j, item in enumerate(items):
            _check_content_item(item, f"{where}.content" + (f"[{j}]" if isinstance(content, list) else ""))
        if message.get("recipient") is not None and message["role"] != "assistant":
            raise BadSample(f"{where}: 'recipient' is only allowed on assistant messages")
    start = obj.get("start_index")
    if start is not None and (not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < len(messages)):
        raise BadSample(f"'start_index' must be an integer in [0, {len(messages) - 1}], got {start!r}")
    speaker = obj.get("speaker")
    if speaker is not None and not isinstance(speaker, str):
        raise BadSample(f"'speaker' must be a string, got {type(speaker).__name__}")
    misc = obj.get("misc")
    if misc is not None and not isinstance(misc, dict):
        raise BadSample(f"'misc' must be an object, got {type(misc).__name__}")
    trained = [i for i, _ in audio_items(messages) if messages[i]["role"] == "assistant" and i >= (start or 0)]
    if not trained:
        raise BadSample("nothing to train on: no assistant audio at or after start_index")
    return {k: obj[k] for k in ("messages", "speaker", "start_index", "misc") if obj.get(k) is not None}


def _tts_to_chatml(obj: dict) -> dict:
    if not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise BadSample("TTS item has an empty or non-string 'text'")
    if not isinstance(obj.get("audio"), str) or not obj["audio"].strip():
        raise BadSample("TTS item has an empty or non-string 'audio'")
    chatml = {
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": obj["text"]},
            {"role": "assistant", "content": {"type": "audio", "audio_url": obj["audio"]}},
        ],
        "misc": {"id": obj["id"]} if "id" in obj else {},
    }
    if obj.get("speaker") is not None:
        chatml["speaker"] = obj["speaker"]
    return _check_chatml(chatml)


def _resolve(url: str, root: Path) -> str:
    path = Path(url)
    if path.is_absolute():
        return str(path)
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BadSample(f"audio path {url!r} leaves the manifest's folder {root}")
    return str(resolved)


def iter_manifests(paths: list) -> Iterator[tuple[int, ManifestSample | Reject]]:
    """(ordinal, item) over the non-blank lines of several manifests; sample ids must be unique across all."""
    seen_ids: dict[str, str] = {}
    ordinal = 0
    for path in paths:
        for item in read_manifest(path, seen_ids):
            yield ordinal, item
            ordinal += 1


def read_manifest(path: str | os.PathLike, seen_ids: dict | None = None) -> Iterator[ManifestSample | Reject]:
    """Yield one ManifestSample or Reject per non-blank line of the manifest."""
    path = Path(path)
    root = path.parent
    seen_ids = {} if seen_ids is None else seen_ids
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            sample_id = None
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadSample(f"line is not valid UTF-8 ({err.reason} at byte {err.start})") from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise BadSample(f"invalid JSON: {err.msg} at column {err.colno}") from None
                if not isinstance(obj, dict):
                    raise BadSample(f"line is a JSON {type(obj).__name__}, expected an object")
                raw_id = (obj.get("misc") or {}).get("id") if isinstance(obj.get("misc"), dict) else None
                raw_id = raw_id if raw_id is not None else obj.get("id")
                sample_id = str(raw_id) if raw_id is not None else f"{path.stem}:{number}"
                if "messages" in obj:
                    chatml = _check_chatml(obj)
                elif "audio" in obj or "text" in obj:
                    chatml = _tts_to_chatml(obj)
                else:
                    raise BadSample("line is neither ChatML ('messages') nor a TTS item ('audio' and 'text')")
                if sample_id in seen_ids:
                    raise BadSample(f"duplicate sample id {sample_id!r} (first at {seen_ids[sample_id]})")
                seen_ids[sample_id] = f"{path.name} line {number}"
                audio_paths = tuple(_resolve(item["audio_url"], root) for _, item in audio_items(chatml["messages"]))
                yield ManifestSample(sample_id, str(path), number, chatml, audio_paths)
            except BadSample as err:
                yield Reject(str(path), number, sample_id, str(err))
