"""`higgs-ds evaluate` end to end on tiny models (the real classes, random weights), the tiny codec and the
tiny judges: every system's audio is what a direct generate_codes call gives for the same prompt and seed,
the reference system is the held-out recordings through the codec, and the table's numbers equal those
computed here from the judges' own outputs (edit distance by hand, corpus WER, cosine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_voice_metrics import _levenshtein

pytestmark = pytest.mark.timeout(600)
FRAMES = 12


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    """The tiny random-weight judges (real Whisper, WavLM x-vector, MOS classes), built once for the module."""
    from higgs_ds.eval.judges import load_judges
    from higgs_ds.eval.tiny_judges import write_tiny_judges

    dirs = write_tiny_judges(tmp_path_factory.mktemp("judges") / "judges")
    return load_judges(dirs["asr"], dirs["speaker"], dirs["mos"])


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_model_dir, small_shards, judges):
    from higgs_ds.eval.evaluate import evaluate
    from higgs_ds.eval.synthesize import Sampling
    from higgs_ds.models.tiny import write_tiny

    root = tmp_path_factory.mktemp("evaluate")
    other = write_tiny(root / "other-model", seed=1)  # another "checkpoint": other weights, same shapes
    out = root / "out"
    report = evaluate(
        [str(tiny_model_dir), str(other)],
        [str(small_shards)],
        str(out),
        base=str(tiny_model_dir),
        judges=judges,
        codec_spec="tiny",
        sampling=Sampling(temperature=0.7, max_new_frames=FRAMES),
        limit=None,
        seed=5,
        say=lambda *_: None,
    )
    return report, out, judges, other


@pytest.mark.both_envs  # each environment's family (boson's classes in .venv-boson)
def test_every_system_is_judged_on_the_same_items(judged, tiny_model_dir):
    report, out, _, other = judged
    names = [s["name"] for s in report["systems"]]
    assert names == ["reference", tiny_model_dir.name, other.name, "base"]
    assert report["set"]["items"] == 8
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4  # every held-out item has its recording: the reference system judges all 8
    for system in names:
        ids = [r["id"] for r in rows if r["system"] == system]
        assert len(ids) == 8 and len(set(ids)) == 8
        assert all((out / system / f"{i}.wav").is_file() for i in ids)
    table = (out / "evaluation.md").read_text()
    assert all(f"| {n} (" in table for n in names) and (out / "evaluation.png").stat().st_size > 1000


@pytest.mark.both_envs  # each environment's family (boson's classes in .venv-boson)
def test_generated_audio_is_generate_codes_on_the_items_prompts(judged, tiny_model_dir, small_shards, tiny_codec):
    import soundfile as sf
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import decode, generate_codes
    from higgs_ds.eval.synthesize import checked_model_dir, load_model, torch_dtype
    from higgs_ds.eval.validation import prompt_records

    _, out, _, _ = judged
    path, family = checked_model_dir(tiny_model_dir)
    model = load_model(path, family, torch_dtype("float32", "cpu"), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for k, record in enumerate(prompt_records([str(small_shards)], 8)):
        codes = generate_codes(model, tokenizer, record, max_new_frames=FRAMES, seed=5 + k, temperature=0.7)
        wave, rate = sf.read(out / tiny_model_dir.name / f"{record['json']['id']}.wav", dtype="float32")
        assert rate == tiny_codec.provenance["sample_rate"]
        np.testing.assert_array_equal(wave, decode(tiny_codec, codes))
        # the base is the same directory, prompted the same way: the same audio
        base, _ = sf.read(out / "base" / f"{record['json']['id']}.wav", dtype="float32")
        np.testing.assert_array_equal(base, wave)


@pytest.mark.both_envs  # each environment's family (boson's classes in .venv-boson)
def test_the_numbers_are_the_judges_outputs_counted_by_hand(judged):
    import soundfile as sf

    from higgs_ds.eval import metrics as M

    report, out, judges, other = judged
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for system in report["systems"]:
        mine = [r for r in rows if r["system"] == system["name"]]
        waves = [sf.read(r["wav"], dtype="float32")[0] for r in mine]
        heard = judges["asr"].transcribe(waves, 24000, language="en")
        errors = words = 0
        for row, text in zip(mine, heard):
            ref = M.normalize_text(row["text"], "en", judges["asr"].spelling).split()
            hyp = M.normalize_text(text, "en", judges["asr"].spelling).split()
            assert row["transcript"] == text
            errors, words = errors + _levenshtein(ref, hyp), words + len(ref)
        summary = system["summary"]["all"]
        assert summary["wer"]["value"] == pytest.approx(errors / words)  # corpus WER: sum of edits / words
        assert summary["wer"]["low"] <= summary["wer"]["value"] <= summary["wer"]["high"]
        mos = judges["mos"].score(waves, 24000)
        assert summary["mos"]["value"] == pytest.approx(float(np.mean(mos)), abs=1e-5)
        if system["name"] == "reference":  # SIM only for the cloning items, against their prompt's voice
            assert [r["sim"] is None for r in mine] == ["clone" not in r["id"] for r in mine]
            assert sum(r["sim"] is not None for r in mine) == 2  # the two cloning samples of the set
            assert [r["duration_ratio"] for r in mine] == [1.0] * len(mine)
        else:
            assert all(r["sim"] is not None and -1 <= r["sim"] <= 1 for r in mine)
    model, ref = report["systems"][1]["summary"]["all"], report["systems"][0]["summary"]["all"]
    assert model["speaking_rate"]["value"] != pytest.approx(ref["speaking_rate"]["value"])  # not a constant


# ------------------------------------------------------------------ an external set: a JSONL of prompts

JSONL_FRAMES = 6
REF = {"audio": "audio/alice_002.flac", "text": "Glue the sheet to the dark blue background."}
GOOD = [  # (line, the seed its item is generated with: --seed 3 + its index k, or the line's own)
    ({"id": "clone_en", "text": "The birch canoe slid on the smooth planks.", "language": "en", "reference": REF}, 3),
    (
        {
            "id": "plain_en",
            "text": "Rice is often served in round bowls.",
            "language": "en",
            "speaker": "bob",
            "seed": 41,
            "target": {"audio": "audio/bob_002.flac"},
        },
        41,
    ),  # fmt: skip
    ({"id": "plain_zh", "text": "今天天气很好。", "language": "zh", "target": {"audio": "audio/carol_003.flac"}}, 5),
]
BAD = [  # (line, what its refusal must say)
    ({"id": "bad_field", "text": "Hello there.", "voice": "alice"}, "unknown field(s) ['voice']"),
    (
        {"id": "bad_audio", "text": "Hello there.", "reference": {"audio": "audio/missing.flac", "text": "Hi."}},
        "missing.flac",
    ),  # fmt: skip
    ({"id": "bad_text", "text": "   ", "language": "en"}, "the text is empty"),
]
# file lines 1..7: good, bad, good, blank (not a line of the set), bad, good, bad
LINES = [GOOD[0][0], BAD[0][0], GOOD[1][0], "", BAD[1][0], GOOD[2][0], BAD[2][0]]
BAD_LINES = [2, 5, 7]


@pytest.fixture(scope="module")
def jsonl_judged(tmp_path_factory, tiny_model_dir, judges):
    from higgs_ds.eval.evaluate import evaluate
    from higgs_ds.eval.synthesize import Sampling

    from .conftest import write_manifest

    root = tmp_path_factory.mktemp("evaluate-jsonl")
    path = write_manifest(root / "set", LINES, "set.jsonl")
    said = []
    report = evaluate(
        [str(tiny_model_dir)],
        [str(path)],
        str(root / "out"),
        judges=judges,
        codec_spec="tiny",
        sampling=Sampling(temperature=0.7, max_new_frames=JSONL_FRAMES),
        seed=3,
        say=said.append,
    )
    rows = [json.loads(line) for line in (root / "out" / "items.jsonl").read_text().splitlines()]
    return report, root / "out", path, said, rows


def test_jsonl_set_refuses_bad_lines_by_number_and_evaluates_the_others(jsonl_judged):
    report, out, path, said, _ = jsonl_judged
    refused = report["set"]["refused"]
    assert [r["line"] for r in refused] == BAD_LINES
    assert [r["id"] for r in refused] == [line["id"] for line, _ in BAD]
    for r, (_, reason) in zip(refused, BAD):
        assert r["source"] == f"{path} line {r['line']}" and reason in r["reason"], r
        assert f"{path} line {r['line']}: refused: {r['reason']}" in said
    assert report["set"]["items"] == 3 and report["set"]["jsonl_lines"] == 6  # items + refused = lines
    assert any("3 items, 3 refused" in line for line in said)
    on_disk = json.loads((out / "evaluation.json").read_text())["set"]
    assert on_disk["refused"] == refused and on_disk["sources"] == [str(path)]


def test_jsonl_table_counts_recorded_items_for_the_reference_row(jsonl_judged, tiny_model_dir):
    _, out, _, _, rows = jsonl_judged
    table = (out / "evaluation.md").read_text().splitlines()
    n = {
        line.split("|")[1].strip(): int(line.split("|")[-2]) for line in table if line.startswith("| ") and "(" in line
    }
    assert n == {"reference (reference)": 2, f"{tiny_model_dir.name} (model)": 3}  # no target, no reference row
    model = {r["id"]: r for r in rows if r["system"] == tiny_model_dir.name}
    assert sorted(r["id"] for r in rows if r["system"] == "reference") == ["plain_en", "plain_zh"]
    assert model["clone_en"]["duration_ratio"] is None and model["plain_en"]["duration_ratio"] is not None
    assert model["plain_en"]["speaker"] == "bob" and model["clone_en"]["speaker"] is None
    assert [model[line["id"]]["seed"] for line, _ in GOOD] == [seed for _, seed in GOOD]


def _hand_record(item_id: str, text: str, reference: dict | None, codec, folder) -> dict:
    """The prompt record of a line, built here from boson's conversation layout and the codec (not eval_set)."""
    from higgs_ds.shards.audio import load_audio

    messages = [{"role": "system", "content": "Generate audio following instruction."}]
    codes, audio = np.zeros((8, 0), np.uint16), []
    if reference:
        wave = load_audio(folder / reference["audio"], 24000)
        codes = codec.encode(wave)
        audio = [{"url": reference["audio"], "frames": int(codes.shape[1])}]
        messages += [
            {"role": "user", "content": reference["text"]},
            {"role": "assistant", "content": {"type": "audio", "audio_url": reference["audio"]}},
        ]
    messages += [
        {"role": "user", "content": text},
        {"role": "assistant", "content": {"type": "audio", "audio_url": f"{item_id}.wav"}},
    ]
    return {"json": {"id": item_id, "messages": messages, "audio": audio}, "codes": codes}


def test_jsonl_audio_is_generate_codes_on_a_record_built_by_hand(jsonl_judged, tiny_model_dir, tiny_codec):
    import soundfile as sf
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import decode, generate_codes
    from higgs_ds.eval.synthesize import checked_model_dir, load_model, torch_dtype

    _, out, path, _, _ = jsonl_judged
    model = load_model(*checked_model_dir(tiny_model_dir), torch_dtype("float32", "cpu"), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    waves = []
    for line, seed in GOOD:
        record = _hand_record(line["id"], line["text"], line.get("reference"), tiny_codec, path.parent)
        codes = generate_codes(model, tokenizer, record, max_new_frames=JSONL_FRAMES, seed=seed, temperature=0.7)
        waves.append(sf.read(out / tiny_model_dir.name / f"{line['id']}.wav", dtype="float32")[0])
        np.testing.assert_array_equal(waves[-1], decode(tiny_codec, codes))
    assert len({w.tobytes() for w in waves}) == 3


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_jsonl_sim_is_against_the_files_and_languages_are_grouped(jsonl_judged, judges, tiny_model_dir, tiny_codec):
    import soundfile as sf

    from higgs_ds.eval import metrics as M
    from higgs_ds.eval.generate import decode
    from higgs_ds.shards.audio import load_audio

    report, out, path, _, rows = jsonl_judged
    voice = {  # SIM's reference: the cloning line's reference file, else its target file (as the files hold them)
        "clone_en": load_audio(path.parent / REF["audio"], 24000),
        "plain_en": load_audio(path.parent / GOOD[1][0]["target"]["audio"], 24000),
        "plain_zh": load_audio(path.parent / GOOD[2][0]["target"]["audio"], 24000),
    }
    model = {r["id"]: r for r in rows if r["system"] == tiny_model_dir.name}
    ids, embed = list(voice), judges["speaker"].embed  # batched as evaluate batches them (padding moves digits)
    generated = embed([sf.read(model[i]["wav"], dtype="float32")[0] for i in ids], 24000)
    files = embed([voice[i] for i in ids], 24000)
    resynthesized = embed([decode(tiny_codec, tiny_codec.encode(voice[i])) for i in ids], 24000)
    for k, item_id in enumerate(ids):
        assert model[item_id]["sim"] == pytest.approx(_cosine(generated[k], files[k]), abs=1e-6)
        assert model[item_id]["sim"] != pytest.approx(_cosine(generated[k], resynthesized[k]), abs=1e-6)  # not a copy
    for item_id in ("plain_en", "plain_zh"):  # the reference row is the target file itself
        recorded = sf.read(out / "reference" / f"{item_id}.wav", dtype="float32")[0]
        np.testing.assert_array_equal(recorded, voice[item_id])
    summary = report["systems"][1]["summary"]
    assert set(summary) == {"all", "en", "zh"} and summary["en"]["wer"]["n"] == 2 and summary["zh"]["wer"]["n"] == 1
    zh = model["plain_zh"]  # a language written without spaces: WER counts characters
    ref = M.normalize_text(GOOD[2][0]["text"], "zh").split()
    hyp = M.normalize_text(zh["transcript"], "zh").split()
    assert ref == list("今天天气很好")
    assert summary["zh"]["wer"]["value"] == pytest.approx(_levenshtein(ref, hyp) / len(ref))


def test_jsonl_lines_are_checked_before_any_model(tmp_path, tiny_model_dir, tiny_codec):
    from transformers import AutoTokenizer

    from higgs_ds.eval.eval_set import jsonl_items

    from .conftest import write_manifest

    lines = [
        {"id": "a", "text": "One.", "target": {"audio": "audio/bob_002.flac"}},
        {"id": "a", "text": "Two."},
        {"text": "Three.", "language": "english!"},
        {"text": "Four.", "target": {"audio": "audio/bob_002.flac", "text": "x"}},
        {"text": "Five.", "target": {"audio": "audio/nothing.wav"}},
        '{"text": "Six."',
        {"text": "Seven.", "speaker": 7},
        {"text": "Eight.", "seed": 9},
    ]
    path = write_manifest(tmp_path, lines, "set.jsonl")
    got = jsonl_items(str(path), AutoTokenizer.from_pretrained(tiny_model_dir), tiny_codec)
    reasons = {r.line: r.reason for r in got.refused}
    assert [i.name for i in got.items] == ["a", "line-8"] and got.items[1].seed == 9 and got.items[0].seed is None
    assert "used twice (first at" in reasons[2] and "not a language code" in reasons[3]
    assert '{"audio": PATH}' in reasons[4] and reasons[5].startswith("target: ") and "nothing.wav" in reasons[5]
    assert "invalid JSON" in reasons[6] and "'speaker' must be a non-empty string" in reasons[7]
    assert got.lines == len(lines) == len(got.items) + len(got.refused)
    limited = jsonl_items(str(path), AutoTokenizer.from_pretrained(tiny_model_dir), tiny_codec, limit=1)
    assert [i.name for i in limited.items] == ["a"] and limited.lines == 1


def test_evaluate_command_exits_2_when_a_jsonl_line_is_refused(tmp_path, tiny_model_dir, capsys):
    from higgs_ds.cli import main

    from .conftest import write_manifest

    path = write_manifest(tmp_path / "set", [{"id": "ok", "text": "Hello there."}, {"text": ""}], "set.jsonl")
    argv = ["evaluate", str(tiny_model_dir), "--set", str(path), "--out", str(tmp_path / "out"), "--codec", "tiny",
            "--max-frames", "3"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 of 2 JSONL lines refused" in err
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["set"]["items"] == 1 and report["set"]["refused"][0]["line"] == 2
    assert (tmp_path / "out" / tiny_model_dir.name / "ok.wav").is_file()


def test_a_set_mixes_shard_directories_and_jsonl_files_with_unique_ids(tmp_path, small_shards, tiny_model_dir,
                                                                        tiny_codec):  # fmt: skip
    from transformers import AutoTokenizer

    from higgs_ds.errors import UserError
    from higgs_ds.eval.eval_set import load_set

    from .conftest import write_manifest

    path = write_manifest(tmp_path, [{"id": "alice_001", "text": "Again."}, {"id": "new", "text": "New."}], "x.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    got = load_set([str(small_shards), str(path)], tokenizer, tiny_codec)
    assert len(got.items) == 9 and got.items[-1].name == "new" and got.jsonl_lines == 2
    assert [r.line for r in got.refused] == [1] and str(small_shards) in got.refused[0].reason  # the shards' id
    assert [i.name for i in load_set([str(path)] * 2, tokenizer, tiny_codec, limit=3).items] == ["alice_001", "new"]
    with pytest.raises(UserError, match="sample id 'alice_001' is also at .*x.jsonl line 1"):
        load_set([str(path), str(small_shards)], tokenizer, tiny_codec)  # the JSONL took the id first
    with pytest.raises(UserError, match="named .jsonl"):
        load_set([str(write_manifest(tmp_path, [{"text": "x"}], "set.json"))], tokenizer, tiny_codec)


def test_a_shard_sample_id_names_a_file_in_out_never_a_path():
    from higgs_ds.eval.eval_set import wav_name

    assert wav_name("alice_001") == "alice_001"
    assert wav_name("../../etc/passwd") == "_.._etc_passwd"  # no separator, no leading dot: stays in --out
    assert wav_name("spk/utt 1") == "spk_utt_1" and wav_name("...") == "item" and len(wav_name("a" * 500)) == 100


def test_a_crafted_shard_sample_id_writes_its_wav_inside_out(tmp_path, tiny_model_dir, tiny_codec, capsys):
    """End to end: a shard set whose sample id is a path (a hostile or careless manifest) evaluates, and every
    file lands inside --out, none beside or above it."""
    from higgs_ds.cli import main
    from higgs_ds.shards.build import BuildConfig, build_shards

    from .conftest import demo_lines, write_manifest

    line = demo_lines({"alice_001"})[0]
    line["misc"]["id"] = "../../escaped"
    manifest = write_manifest(tmp_path / "m", [line])
    build_shards([str(manifest)], str(tmp_path / "shards"), "tiny", BuildConfig(), progress=False)
    out = tmp_path / "deep" / "er" / "out"
    before = {p for p in tmp_path.rglob("*")}
    args = ["evaluate", str(tiny_model_dir), "--set", str(tmp_path / "shards"), "--out", str(out), "--codec", "tiny"]
    assert main(args + ["--max-frames", "4"]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    wavs = sorted(p for p in created if p.suffix == ".wav")
    assert wavs  # the model's and the reference's
    assert all(out in p.parents for p in created if p.is_file()), sorted(map(str, created))
    assert [p.name for p in wavs] == ["_.._escaped.wav"] * len(wavs)
