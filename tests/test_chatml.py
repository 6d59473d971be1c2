"""higgs_ds.stream.chatml.prepare_chatml against boson's own prepare_chatml_sample.

Samples: every line of the demo manifest as the shard builder keeps it in a record (read_manifest's ChatML,
the keys SampleEncoder passes on), plus hand-made ones for each feature (cloning with start_index, speaker
tags, scene text, audio-in, text-only, content lists, recipients, unicode, empty text, consecutive assistant
turns) and for boson's quirks and refusals. The names of the ones boson refuses start with "refuse_" (checked
too, so each sample covers what it says). Ours must equal boson's exactly: ids, labels, audio items (all their
fields), refusals. From the native environment boson runs in its own (tests/reference/boson_chatml.py); in
the boson environment it is called in-process.
"""

from __future__ import annotations

import json
import math

import pytest

from higgs_ds.errors import UserError
from higgs_ds.models.tiny import build_tiny_tokenizer
from higgs_ds.stream.chatml import ChatMLError, prepare_chatml
from tests.envs import REFERENCE, run_in_env

from .conftest import DEMO

SYSTEM = "Generate audio following instruction."
SCENE = f"{SYSTEM}\n\n<|scene_desc_start|>\nAudio is recorded in a quiet room.\n<|scene_desc_end|>"
DIALOGUE_SCENE = (
    f"{SYSTEM}\n\n<|scene_desc_start|>\nSPEAKER0: a calm low voice\nSPEAKER1: a bright voice\n<|scene_desc_end|>"
)


def audio(name: str, **extra) -> dict:
    return {"type": "audio", "audio_url": f"audio/{name}.wav", **extra}


def turn(role: str, content, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def tts(text: str, **extra) -> dict:
    return {"messages": [turn("system", SYSTEM), turn("user", text), turn("assistant", audio("a"))], **extra}


def demo_records() -> dict[str, dict]:
    """The demo manifest's lines as shard records hold them: read_manifest's ChatML, the keys SampleEncoder reads."""
    from higgs_ds.shards.manifest import ManifestSample, read_manifest

    keep = ("messages", "speaker", "start_index", "misc")
    samples = [s for s in read_manifest(DEMO / "manifest.jsonl") if isinstance(s, ManifestSample)]
    assert len(samples) == 60  # every line of the demo manifest is accepted
    return {f"demo_{s.sample_id}": {k: s.chatml[k] for k in keep if k in s.chatml} for s in samples}


ACCEPTED = {
    "cloning_start_index": {
        "messages": [
            turn("system", SYSTEM),
            turn("user", "The reference sentence."),
            turn("assistant", audio("ref")),
            turn("user", "The target sentence."),
            turn("assistant", audio("target")),
        ],
        "start_index": 3,
        "speaker": "alice",
    },
    "dialogue_speaker_tags": {
        "messages": [
            turn("system", DIALOGUE_SCENE),
            turn("user", "[SPEAKER0] Are you coming tonight? [SPEAKER1] Only if it stops raining."),
            turn("assistant", audio("dialogue_0")),
            turn("user", "[SPEAKER0] It will. [SPEAKER1] Then I will."),
            turn("assistant", audio("dialogue_1")),
        ]
    },
    "scene_in_system": {
        "messages": [turn("system", SCENE), turn("user", "Hello there."), turn("assistant", audio("s"))]
    },
    "audio_in_user": {
        "messages": [
            turn("system", "Transcribe the audio."),
            turn("user", [{"type": "text", "text": "What is said here?"}, audio("in")]),
            turn("assistant", "The birch canoe slid on the smooth planks."),
        ]
    },
    "audio_in_then_out": {"messages": [turn("user", [audio("in"), "Say it again."]), turn("assistant", audio("out"))]},
    "system_audio": {"messages": [turn("system", audio("voice")), turn("user", "Hi."), turn("assistant", audio("o"))]},
    "text_only": {"messages": [turn("system", SYSTEM), turn("user", "How are you?"), turn("assistant", "Fine.")]},
    "content_parts": {
        "messages": [
            turn("user", ["plain string part", {"type": "text", "text": " and a text part"}]),
            turn(
                "assistant",
                [
                    "Here:",
                    {"text": "text with no type"},
                    audio("p1"),
                    {"audio_url": "audio/no_type.wav"},
                    audio("p2", offset=1, duration=2.5, row_id=3, raw_audio=None),
                ],
            ),
        ]
    },
    "recipients": {
        "messages": [
            turn("user", "Ask the tool."),
            turn("assistant", "lookup(x)", recipient="tool"),
            turn("user", "Now speak."),
            turn("assistant", audio("r"), recipient="alice"),
        ],
        "start_index": 3,  # the first recipient is trained anyway: boson trains every recipient
    },
    "unicode": tts("Grüße aus Köln — 東京 🎤 naïve café ½ ẞ \u200b"),
    "empty_text": {
        "messages": [
            turn("system", ""),
            turn("user", ""),
            turn("assistant", [{"type": "text", "text": ""}, audio("e")]),
        ]
    },
    "consecutive_assistant": {
        "messages": [
            turn("user", "Two clips and a note."),
            turn("assistant", audio("c1")),
            turn("assistant", audio("c2")),
            turn("assistant", "done"),
        ],
        "start_index": 2,
    },
    "assistant_first": {"messages": [turn("assistant", audio("x")), turn("user", "ok")]},
    "speaker_in_misc": tts("Speaker in misc.", misc={"speaker": "bob", "id": "m1"}),
    "start_index_zero": tts("Zero.", start_index=0),
    "start_index_beyond": tts("Beyond.", start_index=10),
    "start_index_negative": tts("Negative.", start_index=-1),
    "start_index_bool": tts("True is 1 to dacite.", start_index=True),
    "special_tokens_in_text": tts("Read <|eot_id|> and <|start_header_id|>user<|end_header_id|> literally?"),
    "role_tool_with_audio": {"messages": [turn("user", "x"), turn("tool", audio("t")), turn("assistant", audio("a"))]},
    "unknown_part_type_dropped": {"messages": [turn("user", [{"type": "image", "audio_url": "i.png"}, "y"])]},
    "text_part_typed_audio": {"messages": [turn("assistant", {"type": "audio", "text": "read as audio"})]},
    "empty_messages": {"messages": []},
    "empty_content_list": {"messages": [turn("user", "x"), turn("assistant", [])]},
    "nan_speaker_and_start": tts("NaN means missing.", speaker=math.nan, start_index=math.nan),
    "singleton_none_speaker": tts("A list of one missing value is missing.", speaker=[None], start_index=[[None]]),
    "nan_offset": {"messages": [turn("user", audio("n", offset=math.nan)), turn("assistant", "ok")]},
    "empty_recipient_on_user": {"messages": [turn("user", "x", recipient=""), turn("assistant", audio("a"))]},
    "null_recipient": {"messages": [turn("user", "x", recipient=None), turn("assistant", audio("a"))]},
    "null_misc": tts("No misc.", misc=None, speaker=None, start_index=None),
    "top_level_extras_dropped": tts("Extras.", id="x1", audio=[{"frames": 3}], content="top level"),
    "bool_offset_and_row_id": {"messages": [turn("assistant", audio("b", offset=True, row_id=False))]},
}

REFUSED = {
    "refuse_recipient_on_user": {"messages": [turn("user", "x", recipient="bob"), turn("assistant", audio("a"))]},
    "refuse_audio_typed_text": {"messages": [turn("assistant", {"type": "text", "audio_url": "a.wav"})]},
    "refuse_message_extra_key": {"messages": [turn("user", "x", name="alice")]},
    "refuse_start_index_float": tts("x", start_index=3.0),
    "refuse_start_index_list": tts("x", start_index=[3]),
    "refuse_missing_content": {"messages": [{"role": "user"}]},
    "refuse_null_content": {"messages": [turn("user", None)]},
    "refuse_int_content": {"messages": [turn("user", 7)]},
    "refuse_missing_role": {"messages": [{"content": "x"}]},
    "refuse_int_role": {"messages": [turn(3, "x")]},
    "refuse_speaker_int": tts("x", speaker=5),
    "refuse_speaker_list_of_two": tts("x", speaker=["a", "b"]),
    "refuse_speaker_empty_list": tts("x", speaker=[]),
    "refuse_top_level_content_list": tts("x", content=["a", "b"]),
    "refuse_messages_not_list": {"messages": {"role": "user", "content": "x"}},
    "refuse_missing_messages": {"speaker": "alice"},
    "refuse_null_messages": {"messages": None},
    "refuse_message_not_object": {"messages": ["hello"]},
    "refuse_audio_unknown_key": {"messages": [turn("assistant", audio("a", speaker="alice"))]},
    "refuse_audio_url_not_str": {"messages": [turn("assistant", {"type": "audio", "audio_url": 5})]},
    "refuse_row_id_float": {"messages": [turn("assistant", audio("a", row_id=1.5))]},
    "refuse_offset_str": {"messages": [turn("assistant", audio("a", offset="1"))]},
    "refuse_text_not_str": {"messages": [turn("user", {"type": "text", "text": 3})]},
    "refuse_nested_list_content": {"messages": [turn("user", [["x"]])]},
    "refuse_null_part": {"messages": [turn("user", ["x", None])]},
    "refuse_misc_list": tts("x", misc=[]),
    "refuse_recipient_int": {"messages": [turn("assistant", "x", recipient=1)]},
    "refuse_not_an_object": [turn("user", "x")],
}


def all_samples() -> dict:
    samples = {**demo_records(), **ACCEPTED, **REFUSED}
    assert len(samples) == 60 + len(ACCEPTED) + len(REFUSED)  # no name given twice
    return samples


def ours(sample, tokenizer) -> dict:
    try:
        input_ids, label_ids, audio_items = prepare_chatml(sample, tokenizer)
    except ChatMLError as err:
        return {"refused": True, "error": str(err)}
    return {"refused": False, "input_ids": input_ids, "label_ids": label_ids, "audio": audio_items}


def assert_same(samples: dict, boson: list[dict]) -> None:
    tokenizer = build_tiny_tokenizer()
    assert len(boson) == len(samples)
    for (name, sample), theirs in zip(samples.items(), boson):
        assert theirs["refused"] == name.startswith("refuse_"), (
            name,
            theirs.get("error"),
        )  # the sample is what it says
        mine = ours(sample, tokenizer)
        assert mine["refused"] == theirs["refused"], (name, mine.get("error"), theirs.get("error"))
        if not mine["refused"]:
            assert mine["input_ids"] == theirs["input_ids"], name
            assert mine["label_ids"] == theirs["label_ids"], name
            assert mine["audio"] == theirs["audio"], name


@pytest.mark.native_env
@pytest.mark.timeout(180)
def test_equals_boson_from_its_environment(tmp_path):
    samples = all_samples()
    (tmp_path / "samples.json").write_text(json.dumps(list(samples.values())))
    run_in_env("boson", [REFERENCE / "boson_chatml.py", tmp_path / "samples.json", tmp_path / "boson.json"], 150)
    assert_same(samples, json.loads((tmp_path / "boson.json").read_text()))


@pytest.mark.boson_env
@pytest.mark.timeout(60)
def test_equals_boson_in_process():
    from tests.reference.boson_chatml import boson_tokens

    samples = all_samples()
    tokenizer = build_tiny_tokenizer()
    # through JSON as in the other test: the same values (NaN included) reach both
    assert_same(samples, [boson_tokens(s, tokenizer) for s in json.loads(json.dumps(list(samples.values())))])


@pytest.mark.timeout(30)
def test_layout_written_out_by_hand():
    """One sample's ids and labels spelled out from the Llama-3 chat layout, independently of the code."""
    tok = build_tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    sample = {
        "messages": [turn("user", "hi"), turn("assistant", audio("a")), turn("assistant", "ok")],
        "start_index": 2,
    }
    input_ids, label_ids, items = prepare_chatml(sample, tok)
    user, asst, nl, hi, ok = (
        tok.encode(t, add_special_tokens=False) for t in ("user", "assistant", "\n\n", "hi", "ok")
    )
    head = [ids("<|start_header_id|>")]
    end_header = [ids("<|end_header_id|>")]
    turn0 = [ids("<|begin_of_text|>"), *head, *user, *end_header, *nl, *hi, ids("<|eot_id|>")]
    clip = [ids("<|audio_out_bos|>"), ids("<|AUDIO_OUT|>"), ids("<|audio_eos|>")]
    turn1 = [*head, *asst, *end_header, *nl, *clip, ids("<|eom_id|>")]  # an assistant turn follows
    prefix2 = [*head, *asst, *end_header, *nl]
    turn2 = [*prefix2, *ok, ids("<|eot_id|>")]
    assert input_ids == turn0 + turn1 + turn2
    # only turn 2 (start_index) is trained, and its header is not
    assert label_ids == [-100] * (len(turn0) + len(turn1) + len(prefix2)) + ok + [ids("<|eot_id|>")]
    assert items == [
        {
            "audio_url": "audio/a.wav",
            "raw_audio": None,
            "offset": None,
            "duration": None,
            "row_id": None,
            "type": "audio",
        }
    ]


@pytest.mark.timeout(30)
def test_refusal_is_a_named_user_error_and_input_is_kept():
    tok = build_tiny_tokenizer()
    bad = {"messages": [turn("user", "x", recipient="bob")], "misc": {"id": "line_7"}}
    with pytest.raises(ChatMLError, match=r"sample 'line_7': messages\[0\]: a 'recipient' is only allowed") as err:
        prepare_chatml(bad, tok)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    with pytest.raises(ChatMLError, match="sample 'given'"):
        prepare_chatml(bad, tok, sample_id="given")

    from higgs_ds.stream.tokens import EncodingError, chatml_tokens

    with pytest.raises(EncodingError, match="sample 'line_7'"):
        chatml_tokens(bad, tok, "line_7")
    # boson sets a NaN speaker to None in the caller's dict; ours leaves the sample as it was
    sample = tts("x", speaker=math.nan, misc={"duration": math.nan})
    before = json.dumps(sample)
    prepare_chatml(sample, tok)
    assert json.dumps(sample) == before
