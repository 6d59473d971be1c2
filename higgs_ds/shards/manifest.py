"""Stage 1 of the data flow: manifest lines -> validated samples, or named rejects.

Two line formats are read (JSON Lines, UTF-8; blank lines are ignored and not counted):

* ChatML, boson's native format:
  {"messages": [{"role": "system"|"user"|"assistant", "content": str | item | [str | item, ...]}, ...],
   "speaker": str?, "start_index": int?, "misc": {"id": str?, ...}?}
  with items {"type": "text", "text": str} or {"type": "audio", "audio_url": "relative/or/absolute.wav"}.
* Plain TTS: {"audio": path, "text": str, "speaker": str?, "id": str?}, turned into a ChatML sample
  (system instruction, user text, assistant audio).

Audio paths are relative to the manifest's folder; absolute paths are accepted only inside it, and no
path may leave it (`..`, symlinks). URLs are refused: nothing is downloaded. Every non-blank line yields
exactly one ManifestSample or one Reject, so accepted + rejected = lines. Sample ids are only stored in
the sample's json: shard member names are ordinals, so any id is safe.
"""

from __future__ import annotations

import codecs
import json
import os
import re
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
    """This line cannot be used; str(err) is the reason written to the rejects file."""


class BadManifest(UserError):
    """The manifest file itself cannot be read."""


def audio_items(messages: list) -> Iterator[tuple[int, dict]]:
    """(message index, audio item) in the order prepare_chatml_sample appends them to audio_contents."""
    for i, message in enumerate(messages):
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and item.get("type") == "audio":
                yield i, item


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:", re.IGNORECASE)


def _check_audio_url(url, where: str) -> None:
    if url is None:
        raise BadSample(f"{where}: audio item has no 'audio_url'")
    if not isinstance(url, str):
        raise BadSample(f"{where}: 'audio_url' must be a file path string, got {type(url).__name__}")
    if not url.strip():
        raise BadSample(f"{where}: 'audio_url' is empty")
    if "\0" in url:
        raise BadSample(f"{where}: 'audio_url' contains a NUL character")
    if _URL_SCHEME.match(url):  # nothing is downloaded: a build reads local files only
        raise BadSample(
            f"{where}: 'audio_url' {url[:80]!r} is a URL; only local files are read "
            "(download it and give its path relative to the manifest)"
        )


def _check_content_item(item, where: str) -> None:
    if isinstance(item, str):
        return
    if not isinstance(item, dict):
        raise BadSample(f"{where}: content must be a string or an object with a 'type', got {type(item).__name__}")
    if "type" not in item:
        raise BadSample(f"{where}: content object has no 'type' (expected 'text' or 'audio')")
    kind = item["type"]
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise BadSample(f"{where}: text item needs a string 'text'")
    elif kind == "audio":
        _check_audio_url(item.get("audio_url"), where)
        unknown = set(item) - {"type", "audio_url", "raw_audio", "offset", "duration", "row_id"}
        if unknown:
            raise BadSample(f"{where}: audio item has unknown keys {sorted(unknown)}")
        if item.get("raw_audio") or item.get("offset") is not None or item.get("duration") is not None:
            raise BadSample(f"{where}: inline raw_audio, offset and duration are not supported; cut the clip to a file")
    else:
        raise BadSample(f"{where}: unknown content type {kind!r} (expected 'text' or 'audio')")


def _check_chatml(obj: dict) -> dict:
    messages = obj.get("messages")
    if messages is None or messages == []:
        raise BadSample("'messages' is missing or empty")
    if not isinstance(messages, list):
        raise BadSample(f"'messages' must be a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadSample(f"{where} is not an object (a JSON {type(message).__name__})")
        role = message.get("role")
        if role is None:
            raise BadSample(f"{where}: no 'role' (expected one of {', '.join(ROLES)})")
        if role not in ROLES:
            raise BadSample(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if message.get("content") is None:
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
        raise BadSample(f"'start_index' must be an integer in [0, {len(messages) - 1}] (got {start!r})")
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


def _tts_field(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise BadSample(f"TTS item has no '{key}'")
    if not isinstance(value, str):
        raise BadSample(f"TTS item '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadSample(f"TTS item '{key}' is empty")
    return value


def _tts_to_chatml(obj: dict) -> dict:
    text, audio = _tts_field(obj, "text"), _tts_field(obj, "audio")
    chatml = {
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": {"type": "audio", "audio_url": audio}},
        ],
        "misc": {"id": obj["id"]} if "id" in obj else {},
    }
    if obj.get("speaker") is not None:
        chatml["speaker"] = obj["speaker"]
    return _check_chatml(chatml)


def _resolve(url: str, root: Path) -> str:
    """The audio file's real path; it must lie inside the manifest's folder, also after following symlinks."""
    top = root.resolve()
    lexical = Path(os.path.normpath(top / url))  # `..` collapsed, symlinks not followed
    hint = "audio must be inside the manifest folder (put the manifest above the audio, paths relative to it)"
    if not lexical.is_relative_to(top):
        raise BadSample(f"audio path {url!r} leaves the manifest folder ({top}); {hint}")
    try:
        resolved = lexical.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise BadSample(f"audio path {url!r} cannot be resolved ({err})") from None
    if not resolved.is_relative_to(top):
        raise BadSample(f"audio path {url!r} is a symlink leading out of the manifest folder ({top}); {hint}")
    return str(resolved)


def manifest_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines; the one definition of an input line (the builder counts
    these). A UTF-8 byte-order mark at the start (Windows editors write one) is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if raw.strip():
                yield number, raw


def check_manifest_path(path: str | os.PathLike) -> None:
    """A manifest that cannot be read at all has no lines to reject: the build stops before it starts."""
    if not os.path.exists(path):
        raise BadManifest(f"manifest not found: {path}")
    if os.path.isdir(path):
        raise BadManifest(f"manifest {path} is a directory; pass the .jsonl files inside it")
    if not os.path.isfile(path):
        raise BadManifest(f"manifest {path} is not a regular file (a FIFO or device?)")
    if not os.access(path, os.R_OK):
        raise BadManifest(f"manifest {path} cannot be read (permission denied)")


def _no_constant(name: str):
    raise BadSample(f"invalid JSON: {name} is not a JSON value")


def _parse(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample(
            f"line is not valid UTF-8 ({err.reason} at byte {err.start}); save the manifest as UTF-8 "
            "(a compressed or binary file?)"
        ) from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise BadSample(f"invalid JSON: {err.msg} at column {err.colno} (one JSON object per line)") from None
    except RecursionError:
        raise BadSample("invalid JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise BadSample(f"invalid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BadSample(f"line is a JSON {type(obj).__name__}, expected an object")
    try:  # "\ud800" escapes decode to lone surrogates, which no UTF-8 writer (shards, rejects) accepts
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("line holds an unpaired UTF-16 surrogate escape (\\udXXX); fix the text's encoding") from None
    return obj


def _sample_id(obj: dict, path: Path, number: int) -> str:
    misc = obj.get("misc")
    raw_id = misc.get("id") if isinstance(misc, dict) else None
    raw_id = raw_id if raw_id is not None else obj.get("id")
    if raw_id is None:
        return f"{path.stem}:{number}"
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise BadSample(f"sample id must be a string or an integer, got {type(raw_id).__name__}")
    if not str(raw_id).strip():
        raise BadSample("sample id is empty (leave it out to get MANIFEST:LINE)")
    return str(raw_id)


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
    check_manifest_path(path)
    root = path.parent
    seen_ids = {} if seen_ids is None else seen_ids
    for number, raw in manifest_lines(path):
        sample_id = None
        try:
            obj = _parse(raw)
            sample_id = _sample_id(obj, path, number)
            if "messages" in obj:
                chatml = _check_chatml(obj)
            elif "audio" in obj or "text" in obj:
                chatml = _tts_to_chatml(obj)
            else:
                raise BadSample("line is neither ChatML ('messages') nor a TTS item ('audio' and 'text')")
            audio_paths = tuple(_resolve(item["audio_url"], root) for _, item in audio_items(chatml["messages"]))
            if sample_id in seen_ids:
                raise BadSample(f"duplicate sample id {sample_id!r} (first at {seen_ids[sample_id]})")
            seen_ids[sample_id] = f"{path.name} line {number}"
            yield ManifestSample(sample_id, str(path), number, chatml, audio_paths)
        except BadSample as err:
            yield Reject(str(path), number, sample_id, str(err))
