"""The Higgs TTS 3 stream with everything the v2 streams plan at once: two weighted shard sets, cloning
references and budget batching, on 2 ranks. Every batch fits the budget in v3's own positions (those of the
prompts the encoder builds), each set is seen its weight's times, every reference is another recording of the
target's speaker inside the prompt's reference bracket, and the ranks get the same number of batches."""

import collections
import json

import pytest

from higgs_ds.stream.loader import DataConfig, ShardStream
from higgs_ds.stream.plan import clone_length

BUDGET = 512


@pytest.fixture(scope="module")
def v3_sets(tmp_path_factory, small_manifest, tiny_codec, tiny_model_dir, tiny_v3):
    """The small demo set built twice (two directories, one with its own sample ids), with both tokenizers."""
    from higgs_ds.shards.build import BuildConfig, build_shards

    from .conftest import write_manifest

    lines = [json.loads(x) for x in small_manifest.read_text().splitlines() if x.strip()]
    renamed = [dict(x, misc=dict(x["misc"], id="b_" + x["misc"]["id"])) for x in lines]
    other = write_manifest(tmp_path_factory.mktemp("renamed"), renamed)
    dirs = []
    for manifest in (small_manifest, other):
        out = tmp_path_factory.mktemp("v3-set")
        build_shards([str(manifest)], str(out), "tiny", BuildConfig(shard_samples=3,
                     tokenizer=(str(tiny_model_dir), str(tiny_v3))), progress=False)  # fmt: skip
        dirs.append(str(out))
    speakers = {x["misc"]["id"]: x["speaker"] for x in lines + renamed}
    return dirs, speakers


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def test_weights_cloning_and_budget_batching_together_on_two_ranks(v3_sets, tiny_v3):
    from transformers import AutoTokenizer

    from higgs_ds.models.v3.tokenizer import REF_TEXT, special_ids

    dirs, speakers = v3_sets
    tok = AutoTokenizer.from_pretrained(str(tiny_v3))
    cfg = DataConfig(shards=dirs, weights=[1.5, 0.5], clone_references=1.0, max_tokens=BUDGET, batch_size=8, seed=3)
    streams = [ShardStream(cfg, tok, rank=r, world_size=2, family="v3") for r in (0, 1)]
    per_rank = [list(s) for s in streams]
    assert len(per_rank[0]) == len(per_rank[1]) == streams[0].num_batches() > 0

    samples = [s for batches in per_rank for batch in batches for s in batch]
    for batches in per_rank:
        for batch in batches:  # the budget holds in the positions the collator pads to
            assert len(batch) * max(_ceil8(len(s.input_ids)) for s in batch) <= BUDGET

    plan = streams[0].plan()
    refs = streams[0].refs  # the v3 lengths the plan used: each is the encoded prompt's, rounded up to 8
    planned = [[clone_length(refs, p, plan.references[p]) if p in plan.references else refs[p[0]].lengths[p[1]]
                for p in batch] for batch in plan.batches]  # fmt: skip
    assert planned == [[_ceil8(len(s.input_ids)) for s in batch] for batch in per_rank[0]]
    targets = collections.Counter(s.sample_id.split(" ref=")[0] for s in samples)
    first = sum(n for i, n in targets.items() if not i.startswith("b_"))
    second = sum(n for i, n in targets.items() if i.startswith("b_"))
    n = len(speakers) // 2
    # 1.5 x n of the first set (each sample once, half of them twice), 0.5 x n of the second (half, once
    # each); the samples repeated to give both ranks equal batches come on top
    assert first + second == int(1.5 * n) + int(0.5 * n) + plan.num_repeated
    assert {targets[i] for i in speakers if not i.startswith("b_")} <= {1, 2, 3}
    assert first >= int(1.5 * n) and second >= int(0.5 * n)
    assert min(targets[i] for i in speakers if not i.startswith("b_")) >= 1  # every sample of the first set

    ref_text = special_ids(tok)[REF_TEXT]
    cloned = [s for s in samples if " ref=" in s.sample_id]
    assert cloned, "clone_references=1.0 clones the plain samples whose speaker has another one"
    for s in cloned:
        target, ref = s.sample_id.split(" ref=")
        assert ref != target and speakers[ref] == speakers[target], s.sample_id
        assert target.startswith("b_") == ref.startswith("b_")  # a reference comes from the target's own set
        assert int((s.input_ids == ref_text).sum()) == 1 and s.input_ids[0] != ref_text
    for s in (s for s in samples if " ref=" not in s.sample_id):  # the manifest's own cloning lines keep theirs
        assert (ref_text in s.input_ids) == ("clone" in s.sample_id), s.sample_id
