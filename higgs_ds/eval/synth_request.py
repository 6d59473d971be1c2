"""What `higgs-ds synthesize` is asked for: a request (text, voice references, scene) -> the conversation and
the shard-style record that training and evaluation use, so the prompt goes through the one code path
(higgs_ds.eval.generate.prompt_from_record -> higgs_ds.stream.chatml).

The conversation is the one the shards hold for the same task, in boson's form (its examples/generation.py
builds the same): a system turn (`Generate audio following instruction.` and, with a scene, boson's
`<|scene_desc_start|>` block), per voice reference a user turn with its transcript and an assistant turn with
its audio (`[SPEAKERn] ` before the transcript when there are several, one per speaker of a dialogue), then
the user turn with the text and the assistant audio turn to generate.

Nothing here loads a model or a codec: requests are checked (and refused with a reason) before any is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.shards.manifest import DEFAULT_SYSTEM_PROMPT, _parse, check_manifest_path, manifest_lines

SPEAKER_TAG = re.compile(r"\[SPEAKER(\d+)\]")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a file name in --out, never a path
LINE_FIELDS = ("id", "text", "reference", "references", "scene", "system", "seed")
REFERENCE_FIELDS = ("audio", "text")

JSONL_HELP = """\
Batch mode (--batch PROMPTS.jsonl): one JSON object per line (UTF-8; blank lines are ignored and not
counted), fields:

  text        (required) what to say; a dialogue tags each speaker's part: "[SPEAKER0] Hi. [SPEAKER1] Hello."
  id          the output name: ID.wav and ID.codes.npy in --out (letters, digits, '.', '_', '-'; default
              line-N, N the line number)
  reference   {"audio": PATH, "text": TRANSCRIPT}: the voice to clone (its recording and what it says)
  references  [{"audio": ..., "text": ...}, ...]: one per speaker of a dialogue, the first is SPEAKER0;
              [] for none (a line's reference(s) replace --ref-audio/--ref-text)
  scene       a scene description (boson's <|scene_desc_start|> block), replaces --scene
  system      the system text before the scene block, replaces --system
  seed        an integer, replaces --seed

Paths are relative to the JSONL file's folder. Any other field, a missing or empty text, a reference without
audio or transcript, an audio file that cannot be decoded, a bad or repeated id, or an output that exists
(without --overwrite) refuses that line, named with its reason; the other lines are written. Every line is
either written or refused (written + refused = lines), and the command exits 2 when any was refused."""


class RequestError(UserError):
    """A request that cannot be synthesized; str(err) says why and what to change."""


@dataclass(frozen=True)
class Reference:
    audio: str  # a path (resolved against the JSONL's folder for batch lines)
    text: str  # its transcript


@dataclass(frozen=True)
class SynthRequest:
    name: str  # output file stem
    text: str
    references: tuple[Reference, ...] = ()
    scene: str | None = None
    system: str = DEFAULT_SYSTEM_PROMPT
    seed: int = 0
    source: str = "--text"  # where it came from: "--text" or "FILE line N"
    line: int | None = None

    def check(self) -> None:
        """RequestError unless this request can be synthesized as it is."""
        check_name(self.name)
        if not isinstance(self.text, str) or not SPEAKER_TAG.sub("", self.text).strip():
            raise RequestError("the text is empty: give the words to say")
        if not isinstance(self.system, str) or not self.system.strip():
            raise RequestError("the system text is empty: leave it out for the default, or give one")
        if self.scene is not None and (not isinstance(self.scene, str) or not self.scene.strip()):
            raise RequestError("the scene description is empty: leave it out, or describe the scene")
        for i, ref in enumerate(self.references):
            if not ref.text.strip():
                raise RequestError(f"reference {i} ({ref.audio}) has an empty transcript: give what it says")
            if SPEAKER_TAG.search(ref.text):
                raise RequestError(
                    f"reference {i}'s transcript has a [SPEAKERn] tag: leave it out, it is added from the "
                    "reference's position (the first is SPEAKER0)"
                )
        _check_speakers(self.text, len(self.references))


def check_name(name) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RequestError(
            f"id {name!r} cannot name an output file: use 1-100 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )


def _check_speakers(text: str, references: int) -> None:
    """Several references are the speakers of a dialogue, in order: the text must tag them, and no more."""
    tags = sorted({int(n) for n in SPEAKER_TAG.findall(text)})
    if references > 1 and not tags:
        raise RequestError(
            f"{references} references are the speakers SPEAKER0..SPEAKER{references - 1} of a dialogue, but the "
            "text has no [SPEAKERn] tags: tag each part, or give one reference"
        )
    if references > 1 and tags[-1] >= references:
        raise RequestError(
            f"the text has [SPEAKER{tags[-1]}] but there are only {references} references "
            f"(SPEAKER0..SPEAKER{references - 1}): give one reference per speaker"
        )
    if references == 1 and len(tags) > 1:
        raise RequestError(
            f"a dialogue of {len(tags)} speakers with one reference: give one reference per speaker "
            "(references: [...], or --ref-audio/--ref-text once per speaker), or none"
        )


# ------------------------------------------------------------------ the conversation and record


def system_text(request: SynthRequest) -> str:
    """boson's system turn: the instruction, then the scene block when there is a scene."""
    if request.scene is None:
        return request.system
    return f"{request.system}\n\n<|scene_desc_start|>\n{request.scene}\n<|scene_desc_end|>"


def conversation(request: SynthRequest) -> list[dict]:
    """The ChatML messages a shard sample of this task holds, ending in the assistant audio to generate."""
    messages = [{"role": "system", "content": system_text(request)}]
    several = len(request.references) > 1
    for i, ref in enumerate(request.references):
        messages.append({"role": "user", "content": f"[SPEAKER{i}] {ref.text}" if several else ref.text})
        messages.append({"role": "assistant", "content": {"type": "audio", "audio_url": ref.audio}})
    messages.append({"role": "user", "content": request.text})
    messages.append({"role": "assistant", "content": {"type": "audio", "audio_url": f"{request.name}.wav"}})
    return messages


def prompt_record(request: SynthRequest, reference_codes: list, num_codebooks: int) -> dict:
    """The record read_shard would give for this conversation: its json (messages, id, the audio items with
    their frame counts; the target's codes are what is generated, so only the references are listed) and the
    references' codes (num_codebooks, sum of frames), in order of appearance."""
    import numpy as np

    if len(reference_codes) != len(request.references):
        raise ValueError(f"{len(request.references)} references, {len(reference_codes)} code arrays")
    items = [{"url": ref.audio, "frames": int(c.shape[1])} for ref, c in zip(request.references, reference_codes)]
    codes = np.concatenate(reference_codes, axis=1) if reference_codes else np.zeros((num_codebooks, 0), np.uint16)
    meta = {"id": request.name, "messages": conversation(request), "audio": items}
    return {"json": meta, "codes": codes}


# ------------------------------------------------------------------ batch lines


@dataclass
class Defaults:
    """What the command line gives every batch line that does not say otherwise."""

    references: tuple[Reference, ...] = ()
    scene: str | None = None
    system: str = DEFAULT_SYSTEM_PROMPT
    seed: int = 0


@dataclass(frozen=True)
class Refusal:
    source: str
    line: int | None
    name: str | None
    reason: str

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "id": self.name, "reason": self.reason}


@dataclass
class Batch:
    path: str
    requests: list[SynthRequest] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return len(self.requests) + len(self.refused)


def read_batch(path: str | os.PathLike, defaults: Defaults) -> Batch:
    """Every non-blank line of a prompts JSONL -> a checked SynthRequest or a Refusal naming the line."""
    try:
        check_manifest_path(path)
    except UserError as err:
        raise UserError(str(err).replace("manifest", "prompts file", 1) + ": pass --batch PROMPTS.jsonl") from None
    batch, names = Batch(str(path)), {}
    for number, raw in manifest_lines(path):
        source, name = f"{path} line {number}", None
        try:
            obj = _parse(raw)
            name = obj.get("id", f"line-{number}")
            name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
            request = _request(obj, name, Path(path).parent, defaults, source, number)
            if request.name in names:
                raise RequestError(f"id {request.name!r} is used twice (first at line {names[request.name]})")
            names[request.name] = number
            batch.requests.append(request)
        except UserError as err:
            batch.refused.append(Refusal(source, number, name if isinstance(name, str) else None, str(err)))
    return batch


def _request(obj: dict, name, root: Path, defaults: Defaults, source: str, line: int) -> SynthRequest:
    unknown = sorted(set(obj) - set(LINE_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}: a line may hold {', '.join(LINE_FIELDS)}")
    if "text" not in obj:
        raise RequestError("no 'text': give the words to say")
    for key in ("text", "scene", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise RequestError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    seed = obj.get("seed", defaults.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RequestError(f"'seed' must be an integer from 0 to 2**63 - 1, got {seed!r}")
    request = SynthRequest(
        name=name,
        text=obj["text"],
        references=_line_references(obj, root) if {"reference", "references"} & set(obj) else defaults.references,
        scene=obj.get("scene", defaults.scene),
        system=obj.get("system", defaults.system),
        seed=seed,
        source=source,
        line=line,
    )
    request.check()
    return request


def _line_references(obj: dict, root: Path) -> tuple[Reference, ...]:
    if "reference" in obj and "references" in obj:
        raise RequestError("both 'reference' and 'references': give one of them")
    if "reference" in obj:
        return (_reference(obj["reference"], "reference", root),)
    refs = obj["references"]
    if not isinstance(refs, list):
        raise RequestError(f"'references' must be a list of {{audio, text}} objects, got {type(refs).__name__}")
    return tuple(_reference(r, f"references[{i}]", root) for i, r in enumerate(refs))


def _reference(value, where: str, root: Path) -> Reference:
    if not isinstance(value, dict):
        raise RequestError(f'\'{where}\' must be an object {{"audio": PATH, "text": TRANSCRIPT}}')
    unknown = sorted(set(value) - set(REFERENCE_FIELDS))
    if unknown:
        raise RequestError(f"'{where}' has unknown field(s) {unknown}: it holds audio and text")
    for key in REFERENCE_FIELDS:
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise RequestError(f"'{where}' needs a non-empty '{key}' string (the recording's path and its transcript)")
    return Reference(str(root / os.path.expanduser(value["audio"])), value["text"])
