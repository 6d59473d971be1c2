"""An evaluation set: held-out shard samples, or an external JSONL set -> items (prompt record, text,
language, speaker, recordings).

Each shard sample that ends in an assistant audio turn is one item: its prompt is the conversation before
that turn (the very prompt training would see, higgs_ds.eval.generate.prompt_from_record), its text the last
user turn's, its recording the codes of that audio turn. What SIM is judged against: the voice reference in
the prompt when it clones one (Seed-TTS-eval's protocol), else the speaker's own recording of this text.
Recordings are the shards' codes decoded by the codec, so the "reference" system is the codec's
resynthesis of the recordings (its ceiling includes the codec's own loss), the fair ceiling for a model that
can only speak through that codec.

An external set (SET.jsonl, e.g. Seed-TTS-eval's lists) is the prompts JSONL of `higgs-ds synthesize`, read
by the same parser (synth_request), plus `language`, `speaker` and `target` (the recording of the text); its
item's record is the one synthesize builds (prompt_record with the references encoded by the codec). Its
recordings are judged as the files hold them (resampled to the codec's rate), as Seed-TTS-eval judges
against the prompt's and the ground truth's WAV files: there, `reference` is the human recordings, not a
codec's resynthesis (a shard set holds codes only). The format: `higgs-ds evaluate --help`
(higgs_ds.eval.evaluate_cli.JSONL_SET_HELP).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.eval.generate import has_audio, prompt_from_record
from higgs_ds.eval.synth_request import LINE_FIELDS, Defaults, Refusal, RequestError, _request, prompt_record


@dataclass
class EvalItem:
    name: str
    text: str
    language: str | None
    speaker: str | None
    record: dict  # the shard-style record generation continues (prompt_from_record)
    target_codes: np.ndarray | None  # the recording of this text, (num_codebooks, T)
    reference_codes: np.ndarray | None  # the prompt's voice reference, when it clones one
    seed: int | None = None  # the set's own seed for this item (a JSONL line's), else --seed + k
    target_wave: np.ndarray | None = None  # a JSONL set's recordings as the files hold them (codec's rate)
    reference_wave: np.ndarray | None = None

    @property
    def recorded(self) -> bool:
        """Whether the set has this text's recording (the `reference` system judges it)."""
        return self.target_codes is not None or self.target_wave is not None

    @property
    def clones(self) -> bool:
        return self.reference_codes is not None or self.reference_wave is not None


@dataclass
class EvalSet:
    """The items of every --set, in order, and the JSONL lines refused (items from JSONL + refused = lines)."""

    sources: list[str]
    items: list[EvalItem]
    refused: list[Refusal]
    jsonl_lines: int


def is_jsonl(source: str) -> bool:
    return str(source).lower().endswith(".jsonl")


def wav_name(sample_id: str) -> str:
    """The WAV file name of an item: a shard's sample id is data, never a path (no '/', no leading dot)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id).lstrip(".")[:100] or "item"


def load_set(sources: list[str], tokenizer, codec, *, limit=None, max_reference_seconds=30.0) -> EvalSet:
    """Each --set in turn: a .jsonl file is an external set (jsonl_items), anything else a held-out shard
    directory (shard_items); `limit` counts the items of all of them. Ids are unique across the set: each
    names a WAV file."""
    items, refused, lines, names = [], [], 0, {}
    for source in sources:
        left = None if limit is None else limit - len(items)
        if left == 0:
            break
        if is_jsonl(source):
            part = jsonl_items(source, tokenizer, codec, limit=left, max_reference_seconds=max_reference_seconds,
                               names=names)  # fmt: skip
            items, refused, lines = items + part.items, refused + part.refused, lines + part.lines
            continue
        if Path(source).is_file():
            raise UserError(f"--set {source}: a file is read as an external set when it is named .jsonl; a "
                            "held-out set is a shard directory (index.json)")  # fmt: skip
        for item in shard_items([source], tokenizer, left):
            if wav_name(item.name) in names:
                raise UserError(f"{source}: sample id {item.name!r} is also at {names[wav_name(item.name)]}: ids "
                                "name the WAV files, evaluate each set on its own or rename one")  # fmt: skip
            names[wav_name(item.name)] = source
            items.append(item)
    return EvalSet(list(sources), items, refused, lines)


def shard_items(shard_dirs: list[str], tokenizer, limit: int | None = None) -> list[EvalItem]:
    """Every sample of the shard directories that ends in an assistant audio turn, in index order."""
    from higgs_ds.stream.reader import load_index, read_shard

    items = []
    for d in shard_dirs:
        for shard in load_index(d)["shards"]:
            for _, record in read_shard(str(Path(d) / shard["file"])):
                last = record["json"]["messages"][-1]
                if last["role"] == "assistant" and has_audio(last["content"]):
                    items.append(shard_item(record, tokenizer))
                if limit is not None and len(items) == limit:
                    return items
    if not items:
        raise UserError(f"{', '.join(shard_dirs)}: no sample ends in an assistant audio turn, nothing to evaluate")
    return items


def shard_item(record: dict, tokenizer) -> EvalItem:
    """One shard record (ending in an assistant audio turn) as an evaluation item."""
    meta = record["json"]
    prompt = prompt_from_record(record, tokenizer)
    frames = [int(a["frames"]) for a in meta["audio"]]
    used = sum(prompt.frames)
    target = record["codes"][:, sum(frames[:-1]) :] if frames else None
    misc = meta.get("misc") or {}
    return EvalItem(
        name=str(meta.get("id")),
        text=prompt.text,
        language=misc.get("language") if isinstance(misc, dict) else None,
        speaker=meta.get("speaker"),
        record=record,
        target_codes=None if target is None else np.asarray(target, dtype=np.int64),
        reference_codes=np.asarray(record["codes"][:, :used], dtype=np.int64) if used else None,
    )


def recordings(items: list[EvalItem], codec) -> tuple[list, list]:
    """(target waves, SIM references): the prompt's voice reference when it clones, else the recording."""
    from higgs_ds.eval.generate import decode

    def wave(given, codes):
        return given if given is not None else None if codes is None else decode(codec, codes)

    targets = [wave(i.target_wave, i.target_codes) for i in items]
    refs = [wave(i.reference_wave, i.reference_codes) if i.clones else t for i, t in zip(items, targets)]
    return targets, refs


# ------------------------------------------------------------------ external sets: a JSONL of prompts

EVAL_FIELDS = ("language", "speaker", "target")
JSONL_FIELDS = LINE_FIELDS + EVAL_FIELDS
LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*")  # "en", "zh", "en-US", "yue"


@dataclass
class JsonlSet:
    """One JSONL file's items and refusals: every non-blank line read is one or the other."""

    path: str
    items: list[EvalItem] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return len(self.items) + len(self.refused)


def jsonl_items(path: str, tokenizer, codec, *, limit=None, max_reference_seconds=30.0, names=None) -> JsonlSet:
    """Each non-blank line of a JSONL set -> an EvalItem or a Refusal naming the line, until `limit` items.
    `names` (id -> where it was taken) is shared across the sets of one evaluation: an id names a WAV file."""
    from higgs_ds.shards.manifest import _parse, check_manifest_path, manifest_lines

    try:
        check_manifest_path(path)
    except UserError as err:
        raise UserError(str(err).replace("manifest", "evaluation set", 1)) from None
    out, names = JsonlSet(str(path)), {} if names is None else names
    audio, read = _Recordings(codec, max_reference_seconds), 0
    for number, raw in manifest_lines(path):
        if limit is not None and len(out.items) >= limit:
            break
        read += 1
        source, name = f"{path} line {number}", None
        try:
            obj = _parse(raw)
            name = obj.get("id", f"line-{number}")
            name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
            if isinstance(name, str) and name in names:
                raise RequestError(f"id {name!r} is used twice (first at {names[name]})")
            item = _jsonl_item(obj, name, Path(path).parent, source, number, tokenizer, audio)
            names[item.name] = source
            out.items.append(item)
        except UserError as err:
            out.refused.append(Refusal(source, number, name if isinstance(name, str) else None, str(err)))
    if out.lines != read:  # every line read is an item or a refusal, or this is a bug
        raise RuntimeError(f"{path}: {read} lines read, {len(out.items)} items and {len(out.refused)} refused")
    return out


class _Recordings:
    """A set's audio files, each read once (a set usually clones a few voices): codes for the prompt (the
    codec, as synthesize encodes references), waves for the judges (the file itself at the codec's rate)."""

    def __init__(self, codec, max_seconds: float):
        self.codec, self.max_seconds, self._codes, self._waves = codec, max_seconds, {}, {}

    def codes(self, path: str, what: str) -> np.ndarray:
        from higgs_ds.eval.synthesize import encode_reference

        return self._once(self._codes, path, what, lambda: encode_reference(self.codec, path, self.max_seconds))

    def wave(self, path: str, what: str) -> np.ndarray:
        return self._once(self._waves, path, what, lambda: self._load(path))

    def _load(self, path: str) -> np.ndarray:
        from higgs_ds.shards.audio import load_audio

        rate, hop = self.codec.provenance["sample_rate"], self.codec.provenance["hop_length"]
        try:  # the limits encode_reference applies, so a file is usable for both or for neither
            return load_audio(path, rate, max_seconds=self.max_seconds, min_seconds=hop / rate)
        except UserError as err:
            raise UserError(str(err).replace("--max-seconds", "--max-reference-seconds")) from None

    @staticmethod
    def _once(cache: dict, path: str, what: str, make):
        if path not in cache:
            try:
                cache[path] = make()
            except UserError as err:
                cache[path] = err
        if isinstance(cache[path], UserError):
            raise UserError(f"{what}: {cache[path]}")
        return cache[path]


def _jsonl_item(obj: dict, name, root: Path, source: str, number: int, tokenizer, audio: _Recordings) -> EvalItem:
    """One line: synthesize's request (the same parser) + the set's own fields -> the item, its record built as
    synthesize builds it (synth_request.prompt_record with the codec's codes of the references)."""
    unknown = sorted(set(obj) - set(JSONL_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}: a line may hold {', '.join(JSONL_FIELDS)}")
    request = _request({k: v for k, v in obj.items() if k not in EVAL_FIELDS}, name, root, Defaults(), source, number)
    language, speaker = _optional_string(obj, "language"), _optional_string(obj, "speaker")
    if language is not None and not LANGUAGE.fullmatch(language):
        raise RequestError(f"'language' {language!r} is not a language code: use one like 'en', 'zh' or 'en-US'")
    target = _target(obj["target"], root) if "target" in obj else None
    references = [audio.codes(ref.audio, f"reference {i}") for i, ref in enumerate(request.references)]
    voice = audio.wave(request.references[0].audio, "reference 0") if references else None  # SIM's
    target_wave = audio.wave(target, "target") if target else None
    record = prompt_record(request, references, audio.codec.provenance["num_codebooks"])
    prompt_from_record(record, tokenizer)  # a text boson's tokenization refuses is refused here, as synthesize does
    return EvalItem(
        name=request.name,
        text=request.text,
        language=language,
        speaker=speaker,
        record=record,
        target_codes=None,  # the recording is judged as the file holds it: target_wave
        reference_codes=np.asarray(references[0], dtype=np.int64) if references else None,
        seed=request.seed if "seed" in obj else None,
        target_wave=target_wave,
        reference_wave=voice,
    )


def _optional_string(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise RequestError(f"'{key}' must be a non-empty string (or left out), got {value!r}")
    return value


def _target(value, root: Path) -> str:
    if not isinstance(value, dict) or set(value) != {"audio"} or not isinstance(value["audio"], str):
        raise RequestError(f"'target' must be {{\"audio\": PATH}} (the recording of this text), got {value!r}")
    if not value["audio"].strip():
        raise RequestError("'target' has an empty audio path: give the recording of this text, or leave it out")
    return str(root / os.path.expanduser(value["audio"]))
