"""Expanded lengths per model family, stored at build time: `--tokenizer` names up to two tokenizers.

One shard set trains a Higgs-Audio v2 family (Llama-3 tokenizer, boson's ChatML prompt) and the Higgs TTS 3
("v3") family (its Qwen-style tokenizer and prompt). Budget batching needs each sample's length in the
family's own positions before the epoch, so the builder computes both and the index keeps both; the plan
never re-reads a shard for them.

* v2 (a tokenizer with <|start_header_id|>): the token ids and labels (the sample's KEY.tokens.npy member,
  written by shards.writer), and the sample json's "expanded_length" and "clone_parts" (higgs_ds.stream.tokens).
* v3 (higgs_ds.models.v3.tokenizer.special_ids succeeds): the sample json's
      "v3": {"expanded_length": L, "clone_parts": [head, pair] or null}
  with L = ceil8(positions of the prompt higgs_ds.models.v3.prompt.V3SampleEncoder gives the record: the
  trainer's own code). A plain single-speaker TTS sample (stream.tokens.plain_tts) has head 1 (<|tts|>)
  and pair = positions - 1 (<|text|> text <|audio|> and T + 7 slots); as a cloning reference its bracket
  <|ref_text|> text <|ref_audio|> + Tref + 7 slots is as long, so ceil8(head + pair + reference's pair)
  is the cloning sample's length (one position over for a reference with an empty transcript, which has
  no <|ref_text|>: budgets err on the safe side). A record v3 does not train (a dialogue: EncodingError)
  stays in the build for the v2 family, with {"expanded_length": null, "clone_parts": null}; the index
  counts them (build.v3_unsupported) so a v3 run can say what it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from higgs_ds.errors import UserError

V2, V3 = "v2", "v3"
FAMILIES = (V2, V3)
V3_KEY = "v3"  # the sample json's field
UNSUPPORTED_IDS_SHOWN = 5  # per shard and in the build summary: enough to find them in the manifests
_V2_HEADER = "<|start_header_id|>"


def ceil8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass(frozen=True)
class Tokenizers:
    """The directories `--tokenizer` named, by family (None: not given)."""

    v2: str | None = None
    v3: str | None = None


def tokenizer_dirs(spec) -> tuple[str, ...]:
    """BuildConfig.tokenizer (None, one directory, or a sequence of them) as a tuple of directories."""
    if not spec:
        return ()
    return (str(spec),) if isinstance(spec, str) else tuple(str(d) for d in spec)


def family_of(tokenizer, where: str) -> str:
    """V2 or V3 by the tokenizer's special tokens; a UserError for neither or both."""
    from higgs_ds.models.v3.tokenizer import REQUIRED, special_ids

    vocab = tokenizer.get_vocab()  # in it, not mapped to an unknown id a tokenizer may not declare
    is_v2 = _V2_HEADER in vocab
    try:
        special_ids(tokenizer)
        is_v3 = all(token in vocab for token in REQUIRED)
    except UserError:
        is_v3 = False
    if is_v2 == is_v3:
        what = "both Higgs-Audio v2's and Higgs TTS 3's" if is_v2 else "neither Higgs-Audio v2's nor Higgs TTS 3's"
        raise UserError(
            f"--tokenizer {where}: its tokenizer has {what} special tokens ({_V2_HEADER}; <|tts|>, <|text|>, "
            "<|audio|>, ...): name a Higgs-Audio v2 or a Higgs TTS 3 model (or tokenizer) directory"
        )
    return V2 if is_v2 else V3


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    from higgs_ds.models.family import register_auto_classes

    register_auto_classes()  # a v3 config.json is read by our class, not guessed at
    return AutoTokenizer.from_pretrained(directory)


def resolve_tokenizers(spec) -> tuple[Tokenizers, dict[str, str]]:
    """(directories by family, {family: tokenizer fingerprint}) of BuildConfig.tokenizer: at most one
    tokenizer of each family, else a UserError saying which."""
    from higgs_ds.stream.tokens import tokenizer_fingerprint

    dirs = tokenizer_dirs(spec)
    if len(dirs) > len(FAMILIES):
        raise UserError(
            f"--tokenizer is given {len(dirs)} times: at most twice, one Higgs-Audio v2 and one Higgs TTS 3 "
            "model directory"
        )
    found: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    for directory in dirs:
        tokenizer = load_tokenizer(directory)
        family = family_of(tokenizer, directory)
        if family in found:
            name = "Higgs-Audio v2" if family == V2 else "Higgs TTS 3"
            raise UserError(
                f"--tokenizer {found[family]} and --tokenizer {directory} are both {name} tokenizers: give at "
                "most one per family (a shard set stores one set of lengths per family)"
            )
        found[family] = directory
        fingerprints[family] = tokenizer_fingerprint(tokenizer)
    return Tokenizers(found.get(V2), found.get(V3)), fingerprints


# ---------------------------------------------------------------- per sample (in the build's workers)


def v3_encoder(directory: str):
    from higgs_ds.models.v3.prompt import V3SampleEncoder

    return V3SampleEncoder(load_tokenizer(directory))


def _v3_positions(record: dict, encoder) -> int:
    """Positions of the record's v3 training prompt (text tokens and audio slots): the trainer's encoder."""
    return len(encoder(record).input_ids)


def v3_fields(record: dict, encoder) -> dict:
    """The sample json's "v3" entry for a shard record {"json": ..., "codes": (8, sum T)}."""
    from higgs_ds.stream.tokens import EncodingError, plain_tts

    try:
        positions = _v3_positions(record, encoder)
    except EncodingError:  # not a sample v3 trains: the v2 family still does
        return {"expanded_length": None, "clone_parts": None}
    parts = [1, positions - 1] if plain_tts(record["json"]) else None
    return {"expanded_length": ceil8(positions), "clone_parts": parts}


def v3_summary(shards: list[dict]) -> dict:
    """The build summary's count of samples v3 does not train, and the first few ids, from the shard
    entries (their per-sample v3 lengths, written by shards.writer)."""
    count = sum(sum(1 for v in e.get("v3_lengths") or () if v is None) for e in shards)
    ids = [i for e in shards for i in e.get("v3_unsupported_ids", ())][:UNSUPPORTED_IDS_SHOWN]
    return {"v3_unsupported": count, "v3_unsupported_ids": ids}
