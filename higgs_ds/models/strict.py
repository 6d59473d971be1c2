"""Strict weights: the tensors a model directory holds are exactly the ones its model class expects.

transformers' from_pretrained only warns about a missing weight (and initialises it at random) and drops an
unexpected one; a checkpoint of the wrong family, a truncated download or a hand-edited index would then
train from partly random weights. Both families' loaders and `higgs-ds convert` call
`check_state_dict_matches` first: it reads the safetensors headers only (names, shapes, dtypes; no tensor
data), from `model.safetensors` or from the shards a `model.safetensors.index.json` names, and raises a
UserError naming the directory and the first missing, unexpected or mis-shaped keys.

    headers = read_headers(model_dir)          # {key: TensorHeader(shape, dtype, file)}
    check_state_dict_matches(model_dir, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "HiggsAudioModel")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from higgs_ds.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # the release's index is ~60 kB
SHOWN = 5  # keys named per kind of mismatch


class TensorHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16 ...
    file: str  # the file (name inside the directory) that holds it


class WeightsError(UserError):
    """A model directory's weights are missing, unreadable, or not the ones its model class expects."""


def _index_weight_map(model_dir: Path) -> dict[str, str]:
    path = model_dir / INDEX_FILE
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise WeightsError(f"{path} is over {MAX_INDEX_BYTES >> 20} MiB: not a safetensors index; replace it")
        index = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not readable JSON ({err}): replace it with the model's own index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightsError(f"{path} has no weight_map of key -> file names: replace it with the model's own index")
    for name in set(weight_map.values()):  # a shard is a file beside the index, never a path elsewhere
        if Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
            raise WeightsError(f"{path} names {name!r} as a shard: shards must be .safetensors files beside it")
    return weight_map


def _weight_files(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and the index's key -> file map when the checkpoint is sharded."""
    if (model_dir / INDEX_FILE).is_file():
        weight_map = _index_weight_map(model_dir)
        return sorted(set(weight_map.values())), weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        raise WeightsError(
            f"{model_dir} holds {', '.join(others[:SHOWN])} but no {INDEX_FILE} saying which keys each holds: "
            f"restore the index (or a single {SINGLE_FILE})"
        )
    pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    why = f" (only {', '.join(pickled[:SHOWN])}: pickles, which higgs-ds does not load)" if pickled else ""
    raise WeightsError(
        f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE}{why}: point at a model directory with safetensors "
        "weights (a training checkpoint becomes one with `higgs-ds export`)"
    )


def _file_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import SafetensorError, safe_open

    try:  # safe_open parses the header and maps the file; get_slice reads no tensor data
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}): download or export it again") from None


def read_headers(model_dir: str | os.PathLike, unlisted_ok=frozenset()) -> dict[str, TensorHeader]:
    """Every tensor's name, shape, dtype and file, from the headers only. A key in two files, a shard the
    index names but that is missing, or an index that disagrees with its shards is a WeightsError; keys in
    `unlisted_ok` may be in a shard without an index entry (Higgs TTS 3's release leaves its tied copies out)."""
    model_dir = Path(model_dir)
    files, weight_map = _weight_files(model_dir)
    headers: dict[str, TensorHeader] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise WeightsError(f"{model_dir / INDEX_FILE} names {name}, which is not in {model_dir}: download it")
        for key, (shape, dtype) in _file_headers(path).items():
            if key in headers:
                raise WeightsError(f"{model_dir}: weight {key} is in both {headers[key].file} and {name}")
            headers[key] = TensorHeader(shape, dtype, name)
    if weight_map is not None:
        misplaced = sorted(k for k, v in weight_map.items() if k not in headers or headers[k].file != v)
        unlisted = sorted(k for k in headers if k not in weight_map and k not in unlisted_ok)
        if misplaced or unlisted:
            key = (misplaced or unlisted)[0]
            where = headers[key].file if key in headers else "no shard"
            raise WeightsError(
                f"{model_dir / INDEX_FILE} does not match its shards: {key} is listed in "
                f"{weight_map.get(key, 'no entry')} but found in {where}: restore the model's own index"
            )
    return headers


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def mismatch_message(found: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """What differs between two key -> shape maps (None when they are equal), first keys of each kind."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"missing {_shown(missing)}")
    if unexpected:
        parts.append(f"unexpected {_shown(unexpected)}")
    if shapes:
        k = shapes[0]
        parts.append(
            f"shape of {k} is {list(found[k])} in the checkpoint, the model expects {list(expected[k])}"
            + (f" (and {len(shapes) - 1} more mis-shaped)" if len(shapes) > 1 else "")
        )
    return "; ".join(parts) or None


def check_state_dict_matches(
    model_dir: str | os.PathLike, state_dict_shapes: dict[str, tuple], what: str
) -> dict[str, TensorHeader]:
    """Raise a WeightsError unless the directory's tensors are exactly `state_dict_shapes` (key -> shape, as
    `{k: tuple(v.shape) for k, v in model.state_dict().items()}` of the class that will load it, `what`).
    Returns the headers read."""
    headers = read_headers(model_dir)
    problem = mismatch_message({k: h.shape for k, h in headers.items()}, state_dict_shapes)
    if problem:
        raise WeightsError(
            f"{model_dir}: its weights are not the ones {what} expects ({problem}); the directory is "
            "incomplete, edited, or of another model: download or export it again (a model of the other family: "
            "`higgs-ds convert`)"
        )
    return headers
