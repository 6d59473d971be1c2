"""One shard set, exact lengths for two families: `shards build --tokenizer V2 --tokenizer V3` stores the
Higgs TTS 3 ("v3") expanded lengths and clone parts beside the v2 ones (issue #14).

The v3 lengths are counted here by hand from the manifest texts, the v3 tokenizer and the frames: the
prompt is <|tts|> [<|ref_text|> ref <|ref_audio|> Tref + 7 slots] <|text|> text <|audio|> T + 7 slots."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from higgs_ds.errors import UserError
from higgs_ds.shards.build import BuildConfig, build_fingerprint, build_shards, fingerprint_changes, merge_slices
from higgs_ds.shards.verify import verify_shards
from higgs_ds.stream.reader import ShardError, lengths_tokenizer, load_index, read_shard, shard_refs
from higgs_ds.stream.tokens import tokenizer_fingerprint

from .conftest import demo_lines, write_manifest

PLAIN = ["alice_001", "alice_004", "bob_002"]
CLONE = "clone_alice_003"
DIALOGUE = "dialogue_1"
OLD_ROW = [("shard", "<i4"), ("length", "<i4"), ("speaker", "<i4"), ("clone_parts", "<i4", (2,))]
V3_ROW = OLD_ROW + [("v3_length", "<i4"), ("v3_clone_parts", "<i4", (2,))]


def ceil8(n: int) -> int:
    return (n + 7) // 8 * 8


def _lines() -> list[dict]:
    lines = demo_lines(set(PLAIN) | {CLONE})
    lines.sort(key=lambda line: line["misc"]["id"])
    dialogue = json.loads(json.dumps(lines[0]))  # v2 trains it, v3 does not ([SPEAKERn] tags)
    dialogue["messages"][1]["content"] = "[SPEAKER0] The birch canoe. [SPEAKER1] Slid on the planks."
    dialogue["misc"]["id"] = DIALOGUE
    return lines + [dialogue]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_codec, tiny_model_dir):
    from higgs_ds.models.v3.tokenizer import build_tiny_v3_tokenizer

    root = tmp_path_factory.mktemp("v3-lengths")
    v3_dir = root / "v3-tokenizer"
    v3_tok = build_tiny_v3_tokenizer()
    v3_tok.save_pretrained(v3_dir)
    manifest = write_manifest(root / "in", _lines())
    both = (str(tiny_model_dir), str(v3_dir))
    for name, tokenizer in (("v2", str(tiny_model_dir)), ("both", both)):
        cfg = BuildConfig(shard_samples=3, tokenizer=tokenizer)
        build_shards([str(manifest)], str(root / name), tiny_codec, cfg, progress=False)
    return {"root": root, "manifest": manifest, "v3_dir": v3_dir, "v3_tok": v3_tok, "both": both}


def _samples(shard_dir: Path) -> dict[str, dict]:
    index = load_index(shard_dir)
    return {r["json"]["id"]: r for s in index["shards"] for _, r in read_shard(str(shard_dir / s["file"]))}


def _rows(shard_dir: Path) -> np.ndarray:
    return np.load(shard_dir / "index.samples.npy", allow_pickle=False)


def _by_hand(built) -> dict[str, tuple]:
    """id -> (v3 length, v3 clone parts), counted from the manifest's texts and the samples' frames."""
    tok, samples = built["v3_tok"], _samples(built["root"] / "both")

    def n_text(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    out = {}
    for line in _lines():
        sid, texts = line["misc"]["id"], [m["content"] for m in line["messages"] if m["role"] == "user"]
        frames = [a["frames"] for a in samples[sid]["json"]["audio"]]
        if sid == DIALOGUE:
            out[sid] = (None, None)
        elif sid == CLONE:  # <|tts|>, the reference's bracket, the target's
            ref, target = (2 + n_text(t) + f + 7 for t, f in zip(texts, frames))
            out[sid] = (ceil8(1 + ref + target), None)
        else:
            pair = 2 + n_text(texts[0]) + frames[0] + 7  # <|text|> text <|audio|> T + 7 slots
            out[sid] = (ceil8(1 + pair), [1, pair])
    return out


# ---------------------------------------------------------------- what is stored


def test_v2_columns_and_fields_are_those_of_a_v2_only_build(built):
    v2, both = built["root"] / "v2", built["root"] / "both"
    old, new = _rows(v2), _rows(both)
    assert old.dtype == np.dtype(OLD_ROW) and new.dtype == np.dtype(V3_ROW)
    for field in ("shard", "length", "speaker", "clone_parts"):
        assert new[field].tolist() == old[field].tolist(), field
    plain, with_v3 = _samples(v2), _samples(both)
    assert set(plain) == set(with_v3) == {*PLAIN, CLONE, DIALOGUE}
    for sid, record in with_v3.items():
        meta = dict(record["json"])
        assert "v3" in meta and "v3" not in plain[sid]["json"]
        del meta["v3"]
        assert meta == plain[sid]["json"], sid
        assert np.array_equal(record["codes"], plain[sid]["codes"])
    index = json.loads((v2 / "index.json").read_text())  # a v2-only build's index has no v3 keys
    assert not [k for k in json.dumps(index).split('"') if k.startswith("v3")]


def test_v3_lengths_and_clone_parts_equal_a_hand_count(built):
    hand, samples = _by_hand(built), _samples(built["root"] / "both")
    for sid, (length, parts) in hand.items():
        assert samples[sid]["json"]["v3"] == {"expanded_length": length, "clone_parts": parts}, sid
    order = [r["json"]["id"] for r in samples.values()]  # shard order
    rows = _rows(built["root"] / "both")
    assert rows["v3_length"].tolist() == [-1 if hand[s][0] is None else hand[s][0] for s in order]
    assert rows["v3_clone_parts"].tolist() == [hand[s][1] or [-1, -1] for s in order]
    build = json.loads((built["root"] / "both" / "index.json").read_text())["build"]
    assert build["v3_unsupported"] == 1 and build["v3_unsupported_ids"] == [DIALOGUE]
    assert build["v3_tokenizer_fingerprint"] == tokenizer_fingerprint(built["v3_tok"])


def test_clone_parts_add_up_to_the_cloning_prompt(built):
    """head + pair + the reference's pair is the length of the v3 cloning prompt, by hand and as the
    trainer's encoder builds it."""
    from higgs_ds.models.v3.prompt import V3SampleEncoder

    samples, tok = _samples(built["root"] / "both"), built["v3_tok"]
    target, ref = samples["alice_001"], samples["alice_004"]
    (t_text,), (r_text,) = ([m["content"] for m in s["json"]["messages"] if m["role"] == "user"] for s in (target, ref))
    t_frames, r_frames = target["json"]["audio"][0]["frames"], ref["json"]["audio"][0]["frames"]
    n_ref, n_target = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in (r_text, t_text))
    by_hand = 1 + (2 + n_ref + r_frames + 7) + (2 + n_target + t_frames + 7)
    head, pair = target["json"]["v3"]["clone_parts"]
    _, ref_pair = ref["json"]["v3"]["clone_parts"]
    assert head + pair + ref_pair == by_hand
    assert len(V3SampleEncoder(tok).with_reference(target, ref).input_ids) == by_hand


def test_shard_refs_give_the_lengths_of_the_family_asked(built):
    both, v2 = str(built["root"] / "both"), str(built["root"] / "v2")
    hand = _by_hand(built)
    order = list(_samples(Path(both)))
    refs = shard_refs([both], lengths_for="v3")
    assert np.concatenate([r.lengths for r in refs]).tolist() == [hand[s][0] or -1 for s in order]
    assert np.concatenate([r.clone_parts for r in refs]).tolist() == [hand[s][1] or [-1, -1] for s in order]
    for new, old in zip(shard_refs([both]), shard_refs([v2]), strict=True):  # the default: v2, as before
        assert new.lengths.tolist() == old.lengths.tolist() and new.clone_parts.tolist() == old.clone_parts.tolist()
    index, v2_index = load_index(both), load_index(v2)
    assert lengths_tokenizer(index, "v3") == tokenizer_fingerprint(built["v3_tok"])
    assert (
        lengths_tokenizer(index, "v2") == lengths_tokenizer(v2_index, "v2") == index["build"]["tokenizer_fingerprint"]
    )
    assert lengths_tokenizer(v2_index, "v3") is None
    with pytest.raises(ValueError, match="lengths_for"):
        shard_refs([both], lengths_for="v4")


def test_a_set_without_v3_columns_reads_as_v3_lengths_unknown(built):
    refs = shard_refs([str(built["root"] / "v2")], lengths_for="v3")
    assert all(r.lengths is None for r in refs)
    order = list(_samples(built["root"] / "v2"))
    parts = np.concatenate([r.clone_parts for r in refs]).tolist()
    assert parts == [[-2, -2] if s in PLAIN else [-1, -1] for s in order]  # plain, not sized
    assert verify_shards(str(built["root"] / "v2"), progress=False)["bad_shards"] == {}


def test_verify_checks_the_v3_lengths_against_the_samples(built, tmp_path):
    good = built["root"] / "both"
    assert verify_shards(str(good), progress=False) == {"shards": 2, "samples_checked": 5, "bad_shards": {}}
    bad = tmp_path / "set"
    shutil.copytree(good, bad)
    rows = _rows(bad).copy()
    clone = list(_samples(bad)).index(CLONE)
    rows["v3_length"][clone] += 8  # still a valid value: only the sample itself tells
    _plant(bad, rows)
    problems = verify_shards(str(bad), progress=False)["bad_shards"]
    shard = f"shard-{int(rows['shard'][clone]):06d}.tar"
    assert list(problems) == [str(bad / shard)] and "v3 lengths" in problems[str(bad / shard)]


# ---------------------------------------------------------------- untrusted values


def _plant(shard_dir: Path, rows: np.ndarray) -> None:
    """A changed sidecar that index.json vouches for (size and sha256): only its values can tell."""
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    (shard_dir / "index.samples.npy").write_bytes(buf.getvalue())
    index = json.loads((shard_dir / "index.json").read_text())
    index["sample_table"].update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (shard_dir / "index.json").write_text(json.dumps(index))


def _negative_length(rows):
    rows["v3_length"][0] = -5


def _parts_not_adding_up(rows):
    rows["v3_clone_parts"][0] = [1, 500]


def _parts_without_a_length(rows):
    rows["v3_length"][0] = -1


def _half_known_parts(rows):
    rows["v3_clone_parts"][0] = [-1, 3]


@pytest.mark.parametrize("tamper", [_negative_length, _parts_not_adding_up, _parts_without_a_length, _half_known_parts])
def test_a_tampered_v3_column_is_refused_naming_the_sidecar(tamper, built, tmp_path):
    bad = tmp_path / "set"
    shutil.copytree(built["root"] / "both", bad)
    rows = _rows(bad).copy()
    assert rows["v3_clone_parts"][0].tolist()[0] == 1  # row 0 is a plain sample v3 trains
    tamper(rows)
    _plant(bad, rows)
    with pytest.raises(ShardError, match=r"index\.samples\.npy row 0 has v3_"):
        shard_refs([str(bad)], lengths_for="v3")


def test_a_sidecar_changed_after_the_build_is_refused(built, tmp_path):
    bad = tmp_path / "set"
    shutil.copytree(built["root"] / "both", bad)
    data = bytearray((bad / "index.samples.npy").read_bytes())
    data[-4] ^= 1  # the last row's v3_clone_parts
    (bad / "index.samples.npy").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"index\.samples\.npy differs from its sha256"):
        shard_refs([str(bad)], lengths_for="v3")


# ---------------------------------------------------------------- which tokenizers


def test_two_tokenizers_of_one_family_or_of_neither_are_refused(built, tiny_codec, tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = tmp_path / "plain-tokenizer"  # neither family's special tokens
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    ).save_pretrained(plain)
    cases = {
        "both Higgs TTS 3 tokenizers": (str(built["v3_dir"]), str(built["v3_dir"])),
        "both Higgs-Audio v2 tokenizers": (str(tiny_model_dir), str(tiny_model_dir)),
        "neither Higgs-Audio v2's nor Higgs TTS 3's": (str(plain),),
        "at most twice": (str(tiny_model_dir), str(built["v3_dir"]), str(plain)),
    }
    for k, (what, tokenizers) in enumerate(cases.items()):
        out = tmp_path / f"out{k}"
        with pytest.raises(UserError, match=what):
            build_shards(
                [str(built["manifest"])], str(out), tiny_codec, BuildConfig(tokenizer=tokenizers), progress=False
            )
        assert not list(out.glob("shard-*")) and not (out / "index.json").exists()


def test_a_resume_with_another_tokenizer_set_is_refused(built, tiny_codec):
    """The v3 tokenizer is part of what a resume must match; without one the fingerprint is as before."""
    manifests, cfg = [str(built["manifest"])], BuildConfig()
    v2_only = build_fingerprint(manifests, tiny_codec.provenance, cfg, 5, "v2-fp")
    with_v3 = build_fingerprint(manifests, tiny_codec.provenance, cfg, 5, "v2-fp", "v3-fp")
    assert "v3_tokenizer" not in v2_only
    assert fingerprint_changes(v2_only, with_v3) == ["v3_tokenizer: (none) -> v3-fp"]


def test_the_cli_takes_tokenizer_twice():
    from higgs_ds.cli import parser

    args = parser().parse_args(
        ["shards", "build", "m.jsonl", "--out", "o", "--codec", "tiny"] + ["--tokenizer", "a", "--tokenizer", "b"]
    )
    assert args.tokenizer == ["a", "b"]


@pytest.mark.timeout(300)
def test_slices_merge_to_the_single_build(built, tiny_codec, tmp_path):
    """A job-array build keeps the v3 lists in its slice indexes (schema 1); the merge gives the sidecar
    and the build summary of the single-process build."""
    out = tmp_path / "sliced"
    for i in range(2):
        cfg = BuildConfig(shard_samples=3, slice_index=i, num_slices=2, tokenizer=built["both"])
        build_shards([str(built["manifest"])], str(out), tiny_codec, cfg, progress=False)
    slice_index = json.loads((out / "index.slice-0001-of-0002.json").read_text())
    assert slice_index["schema_version"] == 1 and "v3_lengths" in slice_index["shards"][0]
    summary = merge_slices(str(out))
    single = json.loads((built["root"] / "both" / "index.json").read_text())["build"]
    for key in ("v3_tokenizer_fingerprint", "v3_unsupported", "v3_unsupported_ids", "tokenizer_fingerprint"):
        assert summary[key] == single[key], key
    merged, rows = _rows(out), _rows(built["root"] / "both")
    for field in ("length", "speaker", "clone_parts", "v3_length", "v3_clone_parts"):
        assert merged[field].tolist() == rows[field].tolist(), field
    assert verify_shards(str(out), progress=False)["bad_shards"] == {}


def test_a_bare_tokenizer_directory_is_checked_as_data(built, tmp_path):
    import os

    from higgs_ds.cli import _check_tokenizer_dir

    _check_tokenizer_dir(str(built["v3_dir"]))  # save_pretrained's files only: accepted
    with pytest.raises(UserError, match="is not a directory"):
        _check_tokenizer_dir(str(built["v3_dir"] / "tokenizer.json"))
    planted = tmp_path / "tok"
    shutil.copytree(built["v3_dir"], planted)
    (planted / "tokenizer.json").unlink()
    os.mkfifo(planted / "tokenizer.json")  # reading it would never end
    with pytest.raises(UserError, match="tokenizer.json is not a regular file"):
        _check_tokenizer_dir(str(planted))
