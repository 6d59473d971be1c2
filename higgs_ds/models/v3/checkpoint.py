"""Higgs TTS 3 directories in the released layout: loaded strictly, written back the same way.

Every tensor of the release's safetensors is one of three kinds (docs/research/higgs-tts-3-facts.md, section 2):

* a weight of HiggsTTS3ForConditionalGeneration, under the same name (higgs_ds.models.v3.modeling): names and
  shapes must match the class exactly, none missing;
* the bundled codec, `tied.embedding.modality_embeddings.0.model.*`: ignored on purpose (logged). It is
  Higgs-Audio v2's codec, whose config the release does not ship: shards are encoded with the codec directory
  (bosonai/higgs-audio-v2-tokenizer); the export copies these tensors back bit for bit;
* a tied copy, `tied.head.text_head.weight` / `tied.head.modality_heads.0.weight`, of the text embedding /
  the fused table (the release leaves them out of its index): shape-checked and dropped (logged); the export
  writes them again from the trained tensors, so they stay equal.

Anything else, or anything missing, is a UserError naming the directory and the keys. Nothing is unpickled:
config.json is JSON, the weights safetensors, the directory checked by higgs_ds.models.trust first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.strict import INDEX_FILE, SINGLE_FILE, mismatch_message, read_headers
from higgs_ds.models.trust import model_file

log = logging.getLogger(__name__)

CODEC_PREFIX = "tied.embedding.modality_embeddings.0.model."
TEXT_EMBEDDING = "tied.embedding.text_embedding.weight"
FUSED_TABLE = "tied.embedding.modality_embeddings.0.embedding.weight"
TIED_COPIES = {"tied.head.text_head.weight": TEXT_EMBEDDING, "tied.head.modality_heads.0.weight": FUSED_TABLE}
# what an export copies from the base directory as downloaded (besides weights, LICENSE and NOTICE)
CARRIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class V3CheckpointError(UserError):
    """A Higgs TTS 3 directory whose tensors are not exactly the released model's."""


def load_v3_config(model_dir: str | Path):
    """HiggsTTS3Config of config.json (JSON only), its audio geometry checked."""
    from higgs_ds.models.v3.modeling import HiggsTTS3Config, check_v3_config

    path = Path(model_dir) / "config.json"
    try:
        config = HiggsTTS3Config.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise UserError(f"{path}: not a Higgs TTS 3 config ({err})") from None
    check_v3_config(config, path)
    return config


def expected_state_shapes(config) -> dict[str, tuple]:
    """The class's weights, built on the meta device (no memory, no init)."""
    import torch

    from higgs_ds.models.v3.modeling import HiggsTTS3ForConditionalGeneration

    with torch.device("meta"):
        model = HiggsTTS3ForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def split_checkpoint_keys(model_dir: str | Path, expected: dict[str, tuple]) -> dict[str, list[str]]:
    """{"model": [...], "codec": [...], "tied_copies": [...]} of the directory's tensors (headers only), or a
    V3CheckpointError naming what is missing, unexpected or mis-shaped."""
    headers = read_headers(model_dir, unlisted_ok=frozenset(TIED_COPIES))
    codec = sorted(k for k in headers if k.startswith(CODEC_PREFIX))
    copies = sorted(k for k in headers if k in TIED_COPIES)
    for copy in copies:
        source = TIED_COPIES[copy]
        if source in headers and headers[copy].shape != headers[source].shape:
            raise V3CheckpointError(
                f"{model_dir}: {copy} has shape {list(headers[copy].shape)}, its tied source {source} "
                f"{list(headers[source].shape)}: not a tied copy; download the model again"
            )
    own = {k: h.shape for k, h in headers.items() if k not in TIED_COPIES and not k.startswith(CODEC_PREFIX)}
    problem = mismatch_message(own, expected)
    if problem:
        raise V3CheckpointError(
            f"{model_dir}: its weights are not the Higgs TTS 3 model its config.json describes ({problem}); the "
            "directory is incomplete, edited, or of another model: download or export it again"
        )
    return {"model": sorted(own), "codec": codec, "tied_copies": copies}


def log_ignored(model_dir, keys: dict[str, list[str]]) -> None:
    if keys["codec"]:
        log.info(
            "%s: %d bundled codec tensors (%s*) ignored on purpose: shards are encoded with the Higgs-Audio v2 codec "
            "directory, the same codec",
            model_dir,
            len(keys["codec"]),
            CODEC_PREFIX,
        )
    if keys["tied_copies"]:
        log.info("%s: tied copies %s dropped: the model ties them", model_dir, ", ".join(keys["tied_copies"]))


def load_v3_model(model_dir: str | Path, dtype=None, device: str | None = "cpu"):
    """HiggsTTS3ForConditionalGeneration of a released-layout directory, strictly (see the module doc). `dtype`
    None keeps the checkpoint's; `device` None leaves the weights where from_pretrained put them (ZeRO-3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from higgs_ds.models.family import V3, model_family
    from higgs_ds.models.native.load import _torch_dtype
    from higgs_ds.models.trust import check_model_dir
    from higgs_ds.models.v3.modeling import HiggsTTS3ForConditionalGeneration

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if model_family(model_dir) != V3:
        raise UserError(f"{model_dir} is not a Higgs TTS 3 model directory (config.json model_type)")
    config = load_v3_config(model_dir)
    keys = split_checkpoint_keys(model_dir, expected_state_shapes(config))
    kwargs = {} if dtype is None else {"dtype": _torch_dtype(dtype)}
    model, info = HiggsTTS3ForConditionalGeneration.from_pretrained(
        str(model_dir), config=config, output_loading_info=True, **kwargs
    )
    check_loading_info(model_dir, info, keys)
    log_ignored(model_dir, keys)
    if device is not None and not is_deepspeed_zero3_enabled():
        model = model.to(device)
    return model


def check_loading_info(model_dir, info: dict, keys: dict[str, list[str]]) -> None:
    """transformers' own account of the load: only the codec and the tied copies may be left over."""
    ignored = set(keys["codec"]) | set(keys["tied_copies"])
    leftovers = {k: sorted(set(v) - ignored) for k, v in info.items() if k != "error_msgs" and v}
    leftovers = {k: v for k, v in leftovers.items() if v}
    if leftovers or info.get("error_msgs"):
        raise V3CheckpointError(f"{model_dir}: transformers did not load the checkpoint exactly: {leftovers or info}")


# ---------------------------------------------------------------- writing the released layout


def _base_tensors(base_dir: Path, names: list[str]) -> dict:
    """The named tensors of the base directory's safetensors, bit for bit."""
    from safetensors import safe_open

    headers = read_headers(base_dir, unlisted_ok=frozenset(TIED_COPIES))
    out = {}
    for file in sorted({headers[n].file for n in names}):
        with safe_open(str(base_dir / file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in names if headers[n].file == file})
    return out


def _base_index_lists_copies(base_dir: Path) -> bool:
    path = base_dir / INDEX_FILE
    if not path.is_file():
        return True
    weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
    return any(k in weight_map for k in TIED_COPIES)


def save_released_state(state: dict, out_dir: str | Path, base_dir: str | Path, max_shard_size: str = "5GB") -> None:
    """Write `state` (HiggsTTS3ForConditionalGeneration's weights, release names) in the released layout into
    `out_dir`: plus the base's codec tensors (copied bit for bit) and tied copies (recomputed from `state`) when
    the base has them; the base's config, tokenizer and generation files as downloaded; an index like the
    base's (listing the tied copies only if the base's does)."""
    from huggingface_hub import save_torch_state_dict

    out, base = Path(out_dir), Path(base_dir)
    keys = split_checkpoint_keys(base, {k: tuple(v.shape) for k, v in state.items()})
    tensors = dict(state)
    tensors.update(_base_tensors(base, keys["codec"]))
    for copy in keys["tied_copies"]:
        tensors[copy] = state[TIED_COPIES[copy]].clone()
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size)
    _write_index(out, tensors, listed_copies=_base_index_lists_copies(base))
    for name in CARRIED_FILES:  # a Hugging Face cache snapshot's links into its blobs are followed
        real = model_file(base / name)
        if real is not None:
            shutil.copyfile(real, out / name)


def _write_index(out: Path, tensors: dict, listed_copies: bool) -> None:
    """model.safetensors.index.json of what save_torch_state_dict wrote (one file or shards), as the release's."""
    if (out / INDEX_FILE).is_file():
        index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    else:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": size}, "weight_map": dict.fromkeys(tensors, SINGLE_FILE)}
    if not listed_copies:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in TIED_COPIES}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
