"""Stage 10 of the data flow: a training checkpoint -> a Hugging Face model directory.

    higgs-ds export OUTPUT_DIR/checkpoint-500 --out exported/   (or OUTPUT_DIR: its newest checkpoint)
    higgs-ds check-export exported/ --probe OUTPUT_DIR/probe.pt

Under ZeRO-3 the weights are partitioned across ranks; export consolidates them on the CPU from the
DeepSpeed partition files (fp32 master weights), so no GPU has to hold the whole model. The result is
safetensors + config + tokenizer + `codec.json` (the codec the shards were encoded with), in one of the two
formats (see higgs_ds.models.family), whichever family was trained:

- `--format native` (default): Boson's current layout, loads with plain transformers >= 5.3:
  `HiggsAudioV2ForConditionalGeneration.from_pretrained(DIR, use_text_head=True)` and
  `HiggsAudioV2Processor.from_pretrained(DIR)`, so `generate` works without higgs-ds;
- `--format boson`: boson_multimodal's `HiggsAudioModel.from_pretrained(DIR)` (boson's serve engine);
- a Higgs TTS 3 checkpoint has one format, the released one (`--format v3`, implied): the base model's
  config.json and tokenizer as downloaded, the release's tensor names, its bundled codec tensors copied
  over, and the licence obligations of a Derivative Work (its LICENSE, a NOTICE, the model card's terms;
  higgs_ds.models.v3.licence), so sglang-omni / vllm-omni serve it as they serve the release.

A checkpoint of the other family is converted exactly (higgs_ds.models.convert: strict keys and shapes).

What export may touch (`--out` names a folder the user chose, so it is treated as someone else's):
- `--out` must be new, empty, or a previous export: a folder holding a valid `higgs_ds_export.json` (the
  marker this module writes, listing the files it wrote) and nothing but those files. Anything else is
  refused, and so is an `--out` equal to, inside or above the checkpoint, its run (output_dir) or the LoRA
  base, compared by real path (symlinks resolved).
- The new export is built in a temp folder beside `--out`, every file and folder fsynced, then swapped in
  by one atomic rename (RENAME_EXCHANGE; where the filesystem lacks it, old -> trash name, new -> out). Only
  then is the old export removed, after checking again that it is one. A crash leaves the old or the new
  export at `--out`, never a mix (in the two-rename fallback, the old one under its trash name for the
  instant between the renames: the next export, holding the same lock, puts it back first). Leftovers of
  interrupted exports that are whole exports are removed then; a build cut short is named, never deleted.
- What export writes itself (README.md, codec.json, higgs_ds_export.json) is redacted (safe_io.redact)
  and holds no absolute path: a path inside the run is shown relative to the run's parent folder
  (`my_run/checkpoint-500`), any other absolute path by its last component (`higgs-audio-v2-tokenizer`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, FAMILIES, NATIVE, V3, model_family, require_model_family
from higgs_ds.models.patches import patch_for_training
from higgs_ds.models.strict import mismatch_message, read_headers
from higgs_ds.models.trust import check_model_dir, forbid_remote_code, model_file
from higgs_ds.safe_io import REDACTED, DirLock, fsync_dir, fsync_tree, is_secret_key, redact
from higgs_ds.train.checkpoint import deepspeed_tag, is_complete, latest_complete

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MARKER = "higgs_ds_export.json"
MARKER_FORMAT = "higgs-ds export"
# What an export written before the marker listed its files held (recognised by its marker's keys).
_LEGACY_EXPORT_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|codec|higgs_ds_export)\.json"
    r"|README\.md|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
)
_MAX_JSON_BYTES = 64 << 20  # a run config, trainer state or marker larger than this is not one


class ExportError(UserError):
    pass


# ---------------------------------------------------------------------------------------------- inputs


def _read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from a file of the checkpoint or run, or an ExportError naming it and `fix`."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ExportError(f"{path} ({what}) is over {_MAX_JSON_BYTES >> 20} MiB: {fix}")
        obj = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} ({what}) cannot be read as JSON ({err}): {fix}") from None
    if not isinstance(obj, dict):
        raise ExportError(f"{path} ({what}) holds a JSON {type(obj).__name__}, not an object: {fix}")
    return obj


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p} is not a directory: pass a run's output_dir or one of its checkpoint-N folders")
    if is_complete(p) and p.name.startswith("checkpoint-"):
        return p
    latest = latest_complete(p)
    if latest is None:
        raise ExportError(
            f"no complete checkpoint in {p} (looked for checkpoint-N with trainer_state.json and "
            "every rank's data state): pass a run's output_dir or a checkpoint-N folder that training finished writing"
        )
    return latest


def consolidated_state_dict(ckpt: Path, merge_lora: bool = False, base: str | None = None) -> tuple[dict, Path]:
    """The full model's weights and the directory its config and tokenizer come from."""
    if (ckpt / "adapter_config.json").is_file():
        if not merge_lora:
            raise ExportError(f"{ckpt} holds LoRA adapters: pass --merge-lora to merge them into the base model")
        base = _lora_base(ckpt, base)
        return _merged_lora(ckpt, base), Path(base)
    if (ckpt / "latest").is_file():  # DeepSpeed partitions: rebuild the fp32 weights on the CPU
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = deepspeed_tag(ckpt)
        with _torch_loads_run_no_code(ckpt):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag), ckpt
    weights = sorted(ckpt.glob("model*.safetensors"))
    if not weights:
        raise ExportError(f"{ckpt} holds neither DeepSpeed partitions (latest + global_step*/) nor model*.safetensors")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for w in weights:
        try:
            state.update(load_file(w))
        except (SafetensorError, OSError) as err:
            raise ExportError(f"{w} is not a readable safetensors file ({err}): export another checkpoint") from None
    return state, ckpt


# What DeepSpeed's partition files hold besides tensors and containers (seen in ZeRO-3 checkpoints): an enum
# and its loss scaler's plain state. Allowed by name for torch.load(weights_only=True); nothing else is.
_DEEPSPEED_DATA_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


@contextlib.contextmanager
def _torch_loads_run_no_code(ckpt: Path):
    """DeepSpeed's consolidation calls torch.load(weights_only=False) (a pickle: it can run any code). While
    it runs, every torch.load is weights_only with the allowlist above, and a file needing more is refused."""
    import importlib
    import pickle

    import torch

    allowed = []
    for module, name in _DEEPSPEED_DATA_CLASSES:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not needed
            pass
    real_load = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "not tensors only")
            raise ExportError(
                f"{f} holds Python objects export does not load ({why[:200]}): loading it could run code. "
                f"Export only checkpoints of your own runs; for one you trust, consolidate it with DeepSpeed's "
                f"zero_to_fp32.py in {ckpt} (which unpickles it) instead"
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def _lora_base(ckpt: Path, base: str | None) -> str:
    if base:
        return base
    adapter = _read_json(ckpt / "adapter_config.json", "the LoRA adapter config", "pass --base DIR")
    named = adapter.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise ExportError(f"{ckpt / 'adapter_config.json'} names no base_model_name_or_path: pass --base DIR")
    return named


def _merged_lora(ckpt: Path, base: str) -> dict:
    """Base model + the checkpoint's (gathered) adapters, merged with PEFT on the CPU."""
    import torch
    from peft import PeftModel

    if not Path(base, "config.json").is_file():
        raise ExportError(f"the LoRA base model {base} is not a model directory: pass --base DIR")
    forbid_remote_code()
    check_model_dir(base)
    family = require_model_family(base)
    if family == V3:
        from higgs_ds.models.v3.checkpoint import load_v3_model

        model = load_v3_model(base, dtype=torch.float32)
    elif family == NATIVE:
        from higgs_ds.models.native.load import load_native_model

        model = load_native_model(base, dtype=torch.float32)
    else:
        import boson_multimodal.model.higgs_audio  # noqa: F401
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        model = patch_for_training(HiggsAudioModel.from_pretrained(base, torch_dtype=torch.float32))  # as trained
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _run_config(ckpt: Path) -> dict:
    path = ckpt.parent / "higgs_ds_config.json"
    if not path.is_file():
        return {}
    return _read_json(path, "the run's config", "restore it from the run, or move it away to export without it")


def _shard_dirs(run_cfg: dict, ckpt: Path) -> list[str]:
    shards = run_cfg.get("data", {}).get("shards", []) if isinstance(run_cfg.get("data"), dict) else []
    if not isinstance(shards, list) or not all(isinstance(d, str) for d in shards):
        raise ExportError(
            f"{ckpt.parent / 'higgs_ds_config.json'}: data.shards is not a list of folders: restore the run's config"
        )
    return shards


def _shard_index(shard_dir: str) -> tuple[dict, Path] | None:
    from higgs_ds.stream.reader import load_index

    path = Path(shard_dir) / "index.json"
    return (load_index(shard_dir, check_files=False), path) if path.is_file() else None


def _codec_note(ckpt: Path, run_dir: Path) -> dict | None:
    run_cfg = _run_config(ckpt)
    if not run_cfg:
        return None
    shards = _shard_dirs(run_cfg, ckpt)
    notes = [found[0].get("codec") for found in map(_shard_index, shards) if found]
    return _clean({"trained_on_shards": shards, "codec": notes[0] if notes else None}, run_dir)


# ------------------------------------------------------------------------------ what export writes


# An absolute path inside a string: after the start, a space, '=', a quote or a bracket, never after a
# word character, '/', '.', ':' (so 'a/b', '../x' and 'https://host/x' are left alone).
_ABS_PATH = re.compile(r"(?<![\w/.:~\\-])(?:~/|/(?=[^\s/])|[A-Za-z]:[\\/])[^\s\"'`<>|,;()\[\]{}]*")


def _display_path(text: str, run_dir: Path) -> str:
    """An absolute path as it appears in an export: relative to the run's parent inside the run,
    else its last component."""
    path = Path(os.path.expanduser(text)) if text.startswith("~") else Path(text)
    if path.is_absolute():
        try:
            return str(Path(os.path.realpath(path)).relative_to(os.path.realpath(run_dir.parent)))
        except ValueError:
            pass
    return re.split(r"[\\/]", text.rstrip("\\/"))[-1] or "/"


def _clean(obj, run_dir: Path):
    """`obj` (dicts, lists, strings) with credentials redacted and absolute paths shortened."""
    if isinstance(obj, dict):  # a credential that is not a string (a number, a list) goes too
        hide = {k for k, v in obj.items() if is_secret_key(str(k)) and v not in (None, "") and not isinstance(v, bool)}
        return redact({str(k): REDACTED if k in hide else _clean(v, run_dir) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return redact([_clean(v, run_dir) for v in obj])
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~/")):  # a whole path, spaces and all
        return redact(_display_path(obj, run_dir))
    if isinstance(obj, str):
        return redact(_ABS_PATH.sub(lambda m: _display_path(m.group(0), run_dir), obj))
    return obj


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def _copy_model_file(src: Path, dst: Path) -> None:
    """Copy a config/tokenizer file of the checkpoint; a symlink out of its folder (say, to a key file)
    is refused. A Hugging Face cache snapshot's links into its `blobs/` folder are followed."""
    real = model_file(src, ExportError)
    if real is None:
        raise ExportError(f"{src} does not exist")
    shutil.copyfile(real, dst)


# ---------------------------------------------------------------------------------------- --out


def _relation(a: Path, b: Path) -> str | None:
    """How folder `a` lies relative to folder `b` when replacing `a` would touch `b`."""
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    return "contains" if b.is_relative_to(a) else None


def _check_out_location(out: Path, protected: dict[str, Path]) -> None:
    for what, path in protected.items():
        relation = _relation(out, Path(os.path.realpath(path)))
        if relation:
            raise ExportError(
                f"--out {out} {relation} {what} {path}: export replaces --out, so it refuses a folder inside or "
                "above the checkpoint, its run or the base model; pass a folder outside the run, e.g. a sibling "
                "of the run's output_dir"
            )


def _previous_export_problem(folder: Path) -> str | None:
    """None when `folder` is a previous export (a valid marker and only the files it lists), else why not."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return f"it holds no {MARKER}"
    try:
        note = json.loads(marker.read_bytes()) if marker.stat().st_size < (1 << 20) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        note = None
    if not isinstance(note, dict):
        return f"its {MARKER} is not an export marker"
    files = note.get("files")
    if note.get("format") == MARKER_FORMAT and isinstance(files, list) and all(isinstance(f, str) for f in files):
        allowed = set(files) | {MARKER}
        is_allowed = allowed.__contains__
    elif note.get("format") is None and {"checkpoint", "dtype"} <= set(note):  # written before markers listed files
        is_allowed = _LEGACY_EXPORT_FILES.fullmatch
    else:
        return f"its {MARKER} is not an export marker"
    others = sorted(e.name for e in os.scandir(folder) if not (e.is_file(follow_symlinks=False) and is_allowed(e.name)))
    if others:
        return f"it also holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which export did not write"
    return None


def _check_out_contents(out: Path) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder: pass a new or empty folder")
    if not any(os.scandir(out)):
        return
    problem = _previous_export_problem(out)
    if problem:
        raise ExportError(
            f"--out {out} is not empty and is not a previous higgs-ds export ({problem}); export never deletes "
            "such a folder: pass a new or empty folder, or move its contents away"
        )


# ------------------------------------------------------------------------------------- publishing


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system or filesystem lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_dir(tmp: Path, out: Path) -> None:
    """Put the fsynced folder `tmp` at `out`; an old export there is removed only once the new one is in place.
    If `out` changed since it was checked, `tmp` is removed and whatever is at `out` stays."""
    changed = ExportError(f"{out} changed during the export (another process wrote there); it is left as it is")
    if not os.path.lexists(out) or not any(os.scandir(out)):
        try:
            os.rename(tmp, out)  # onto nothing or an empty folder; fails if the folder filled up meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise changed from None
        fsync_dir(out.parent)
        return
    try:
        swapped = _exchange(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp if swapped else out.with_name(f".{out.name}.old.{os.getpid()}.{secrets.token_hex(8)}")
    if not swapped:
        _rename_twice(tmp, out, old)
    fsync_dir(out.parent)
    problem = _previous_export_problem(old)
    if problem:  # someone changed --out since it was checked: keep what they put there
        raise ExportError(
            f"{out} changed during the export ({problem}); the new export is at {out}, what was there is kept at {old}"
        )
    shutil.rmtree(old)


def _rename_twice(tmp: Path, out: Path, old: Path) -> None:
    """Where RENAME_EXCHANGE is missing: out -> old, tmp -> out; on a failure, `out` is put back as it was."""
    try:
        os.rename(out, old)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _leftovers(out: Path) -> list[Path]:
    """Temp folders of interrupted exports to `out` (`.NAME.new.PID.HEX`, `.NAME.old.PID.HEX`), newest first."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(new|old)\.\d+\.[0-9a-f]{{16}}")
    found = [e for e in os.scandir(out.parent) if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    return [Path(e.path) for e in sorted(found, key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)]


def _tidy_leftovers(out: Path) -> None:
    """With the lock held (no other export to `out` runs): put back an old export that a crash between the
    two fallback renames left under its trash name, remove leftovers that are whole exports, and name the
    rest (a build cut short has no marker, so it is not recognised as an export and is left alone)."""
    for folder in _leftovers(out):
        if _previous_export_problem(folder) is not None:
            print(f"higgs-ds: note: {folder} is left from an interrupted export; remove it", file=sys.stderr)
        elif not os.path.lexists(out) and ".old." in folder.name:
            os.rename(folder, out)
            fsync_dir(out.parent)
        else:
            shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------ export


def export(
    checkpoint: str,
    out_dir: str,
    dtype: str | None = None,
    merge_lora: bool = False,
    base: str | None = None,
    fmt: str = NATIVE,
    codec: str | None = None,
) -> Path:
    if fmt not in (*FAMILIES, V3):
        raise ExportError(f"--format {fmt!r}: use one of {', '.join((*FAMILIES, V3))}")
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(os.path.realpath(out_dir))  # the folder a symlinked --out names is the one replaced
    protected = {"the checkpoint": ckpt, "the run": ckpt.parent}
    if merge_lora and (ckpt / "adapter_config.json").is_file():
        protected["the LoRA base model"] = Path(_lora_base(ckpt, base))
    _check_out_location(out, protected)
    _check_out_contents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(out.parent, f".{out.name}.export.lock", what="export"):
        _tidy_leftovers(out)
        tmp = out.with_name(f".{out.name}.new.{os.getpid()}.{secrets.token_hex(8)}")
        tmp.mkdir()
        try:
            _build(ckpt, tmp, dtype, merge_lora, base, fmt, codec)
            fsync_tree(tmp)
            _check_out_contents(out)  # again: consolidation takes minutes
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # only the folder this call made
            raise
        _publish_dir(tmp, out)  # from here `tmp` may hold the old export: removed only once checked
    return out


def _build(
    ckpt: Path, tmp: Path, dtype: str | None, merge_lora: bool, base: str | None, fmt: str, codec: str | None
) -> None:
    """Write the whole export into the empty folder `tmp`: the weights in the trained family's format, then
    converted when `fmt` is the other one; the model card, codec note and marker on top."""
    lora = (ckpt / "adapter_config.json").is_file()  # adapters only: the base has the config
    if lora and not merge_lora:
        raise ExportError(f"{ckpt} holds LoRA adapters: pass --merge-lora to merge them into the base model")
    family = model_family(_lora_base(ckpt, base) if lora else ckpt)
    if V3 in (family, fmt) and family != fmt and not (family == V3 and fmt == NATIVE):  # native: the default
        raise ExportError(
            f"{ckpt} is a {family} checkpoint and --format is {fmt}: Higgs TTS 3 and Higgs-Audio v2 do not convert "
            "into each other; a Higgs TTS 3 checkpoint exports in its released layout (--format v3)"
        )
    if family == V3:
        fmt = V3
        dtype_name = _write_v3_weights(ckpt, tmp, dtype, merge_lora, base)
    elif family == fmt:
        dtype_name = _write_weights(ckpt, tmp, dtype, merge_lora, base, family, codec)
    else:
        from higgs_ds.models.convert import convert_model

        trained = tmp.with_name(tmp.name + ".trained")
        trained.mkdir()
        try:
            dtype_name = _write_weights(ckpt, trained, dtype, merge_lora, base, family)
            converted = tmp.with_name(tmp.name + ".converted")
            convert_model(trained, fmt, converted)
            for item in converted.iterdir():
                os.rename(item, tmp / item.name)
            converted.rmdir()
        finally:
            shutil.rmtree(trained, ignore_errors=True)  # only the folder made here
    run_dir = ckpt.parent
    note = _codec_note(ckpt, run_dir)
    if note:
        _write_json(tmp / "codec.json", note)
    _write_text(tmp / "README.md", model_card(ckpt, note, dtype_name, merge_lora, fmt))
    files = sorted(p.name for p in tmp.iterdir()) + [MARKER]
    shown = _display_path(os.path.realpath(ckpt), run_dir)
    marker = {"format": MARKER_FORMAT, "model_format": fmt, "checkpoint": shown, "dtype": dtype_name, "files": files}
    _write_json(tmp / MARKER, _clean(marker, run_dir))


def _audio_tokenizer_ref(codec: str) -> str:
    """--codec as the processor names it: a local directory by absolute path (transformers resolves relative
    ones against the working directory), else a hub id as given."""
    path = Path(codec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ExportError(f"--codec {codec}: not a codec directory (no config.json)")
        return str(path.resolve())
    return codec


def _expected_keys(config, family: str) -> set[str]:
    import torch

    with torch.device("meta"):
        if family == NATIVE:
            from transformers import HiggsAudioV2ForConditionalGeneration

            return set(HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).state_dict())
        import boson_multimodal.model.higgs_audio  # noqa: F401
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        return set(HiggsAudioModel(config).state_dict())


def _load_config(model_files: Path, family: str):
    if family == NATIVE:
        from transformers import HiggsAudioV2Config

        return HiggsAudioV2Config.from_pretrained(model_files)
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig.from_pretrained(model_files)


def _write_weights(
    ckpt: Path, tmp: Path, dtype: str | None, merge_lora: bool, base: str | None, family: str, codec: str | None = None
) -> str:
    """The consolidated weights, config, tokenizer (and for the native family the processor files) of the
    trained family into `tmp`; returns the weights' dtype name."""
    import torch
    from huggingface_hub import save_torch_state_dict

    state, model_files = consolidated_state_dict(ckpt, merge_lora, base)
    config = _load_config(model_files, family)
    expected = _expected_keys(config, family)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(
            f"consolidated weights of {ckpt} do not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    target = getattr(torch, dtype) if dtype else torch.float32
    state = {k: v.to(target).contiguous() for k, v in state.items()}
    save_torch_state_dict(state, tmp, max_shard_size="5GB")
    for name in COPIED_FILES:
        if (model_files / name).is_file():
            _copy_model_file(model_files / name, tmp / name)
    dtype_name = str(target).removeprefix("torch.")
    config.torch_dtype = dtype_name
    config.save_pretrained(tmp)
    if family == NATIVE:  # generation config with the RAS settings, processor and chat template files
        from transformers import AutoTokenizer

        from higgs_ds.models.native.layout import write_native_extras

        extras = {"audio_tokenizer": _audio_tokenizer_ref(codec)} if codec else {}
        write_native_extras(tmp, AutoTokenizer.from_pretrained(tmp), **extras)
    return dtype_name


def _v3_base(ckpt: Path, base: str | None, lora: bool) -> Path:
    """The Higgs TTS 3 directory the run trained from: its config, tokenizer, bundled codec and licence are
    what the export carries. A LoRA checkpoint's base, else --base, else the run config's model."""
    named = _lora_base(ckpt, base) if lora else (base or _run_config(ckpt).get("model"))
    if not isinstance(named, str) or not Path(named, "config.json").is_file():
        raise ExportError(
            f"the base model of {ckpt} ({named!r}) is not a model directory: pass --base DIR, the Higgs TTS 3 "
            "directory the run trained from (its config, tokenizer, codec tensors and LICENSE go into the export)"
        )
    check_model_dir(named)
    if model_family(named) != V3:
        raise ExportError(f"--base {named} is not a Higgs TTS 3 model directory (config.json model_type)")
    return Path(named)


def _write_v3_weights(ckpt: Path, tmp: Path, dtype: str | None, merge_lora: bool, base: str | None) -> str:
    """A Higgs TTS 3 checkpoint in the released layout, with the licence files (see the module doc)."""
    import torch

    from higgs_ds.models.v3.checkpoint import TIED_COPIES, expected_state_shapes, load_v3_config, save_released_state
    from higgs_ds.models.v3.licence import write_licence_files

    lora = (ckpt / "adapter_config.json").is_file()
    base_dir = _v3_base(ckpt, base, lora)
    state, _ = consolidated_state_dict(ckpt, merge_lora, str(base_dir) if lora else base)
    expected = expected_state_shapes(load_v3_config(base_dir))
    problem = mismatch_message({k: tuple(v.shape) for k, v in state.items()}, expected)
    if problem:
        raise ExportError(f"consolidated weights of {ckpt} are not the Higgs TTS 3 model of {base_dir}: {problem}")
    if dtype:
        dtypes = dict.fromkeys(state, getattr(torch, dtype))
    else:  # the release's own dtype per tensor (bf16), as its config.json says: not the fp32 master weights
        named = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        dtypes = {k: named.get(h.dtype, torch.float32) for k, h in read_headers(base_dir, TIED_COPIES).items()}
    save_released_state({k: v.to(dtypes[k]).contiguous() for k, v in state.items()}, tmp, base_dir)
    write_licence_files(tmp, base_dir)
    return "/".join(sorted({str(dtypes[k]).removeprefix("torch.") for k in state}))


def _trainer_state(ckpt: Path) -> dict:
    return _read_json(ckpt / "trainer_state.json", "the trainer state", "export another checkpoint of the run")


def _index_line(shard_dir: str, run_dir: Path) -> str | None:
    found = _shard_index(shard_dir)
    if found is None:
        return None
    index, path = found
    try:
        samples, hours, shards = int(index["num_samples"]), float(index["audio_seconds"]) / 3600, len(index["shards"])
    except (KeyError, TypeError, ValueError):
        raise ExportError(
            f"{path} lacks num_samples, audio_seconds or shards: rebuild that shard set, or remove it from "
            f"data.shards in {run_dir / 'higgs_ds_config.json'}"
        ) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    shown = _clean(shard_dir, run_dir)
    return f"- `{shown}`: {samples} samples, {hours:.3f} h of audio, {shards} shards, index.json sha256 {digest}"


def model_card(ckpt: Path, codec_note: dict | None, dtype: str, merged_lora: bool, fmt: str = NATIVE) -> str:
    """README.md of an exported directory: what it was trained from, on what, how far, and how to load it.
    Redacted, and without absolute paths (see the module docstring)."""
    run_dir = ckpt.parent
    run_cfg = _run_config(ckpt)
    shown_cfg = _clean(run_cfg, run_dir)
    state = _trainer_state(ckpt)
    shown_ckpt = _display_path(os.path.realpath(ckpt), run_dir)
    history = state.get("log_history") if isinstance(state.get("log_history"), list) else []
    last = next((h for h in reversed(history) if isinstance(h, dict) and "audio_loss" in h), {})
    lines = [
        "# Higgs TTS 3 fine-tuned with higgs-ds" if fmt == V3 else "# Higgs-Audio v2 fine-tuned with higgs-ds",
        "",
        f"- base model: `{shown_cfg.get('model', '?')}`" + (" (LoRA adapters merged)" if merged_lora else ""),
        f"- checkpoint: `{shown_ckpt}`, step {state.get('global_step')} of {state.get('max_steps')}",
        f"- final losses: total {last.get('loss')}, text {last.get('text_loss')}, audio {last.get('audio_loss')}",
        f"- weights: {dtype}",
        "",
        "## Data",
        "",
    ]
    lines += [line for line in (_index_line(d, run_dir) for d in _shard_dirs(run_cfg, ckpt)) if line]
    codec = codec_note.get("codec") if codec_note else None
    if isinstance(codec, dict):
        lines += [
            "",
            f"Audio codec: {codec.get('codec')} (weights sha256 {codec.get('weights_sha256')}), "
            f"{codec.get('sample_rate')} Hz, {codec.get('frame_rate')} frames/s, {codec.get('num_codebooks')} "
            "codebooks: generate with this codec.",
        ]
    lines += [
        "",
        "## Training config",
        "",
        "(credentials redacted; absolute paths shown by their last component, or relative to the run's parent)",
        "",
        "```json",
        json.dumps(shown_cfg, indent=1),
        "```",
        "",
        "## Loading",
        "",
        *{NATIVE: _LOADING_NATIVE, BOSON: _LOADING_BOSON, V3: _LOADING_V3}[fmt],
        "",
    ]
    if fmt == V3:
        from higgs_ds.models.v3.licence import MODEL_CARD_TERMS

        lines = lines[:2] + MODEL_CARD_TERMS + [""] + lines[2:]
    return _clean("\n".join(lines), run_dir)


_LOADING_NATIVE = [
    "Transformers-native format (transformers >= 5.3), as Boson publishes Higgs-Audio v2 since April 2026:",
    "",
    "```python",
    "from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor",
    "",
    'model = HiggsAudioV2ForConditionalGeneration.from_pretrained("THIS_DIR", use_text_head=True)',
    'processor = HiggsAudioV2Processor.from_pretrained("THIS_DIR")',
    "```",
    "",
    "`higgs-ds convert THIS_DIR --to boson --out DIR` gives boson_multimodal's format.",
]
_LOADING_V3 = [
    "The released Higgs TTS 3 layout (bosonai/higgs-tts-3-4b's config.json, tensor names and tokenizer), so the",
    "servers that run the release run this directory: sglang-omni (`sglang_omni/models/higgs_tts/`) and",
    "vllm-omni (`higgs_audio_v3`). With higgs-ds:",
    "",
    "```bash",
    'higgs-ds synthesize THIS_DIR --codec CODEC_DIR --text "Hello there." --out wavs/',
    "```",
]
_LOADING_BOSON = [
    "boson_multimodal's format (boson-multimodal 0.1.1, transformers < 4.47), for boson's serve engine:",
    "",
    "```python",
    "import boson_multimodal.model.higgs_audio  # registers the model type",
    "from boson_multimodal.model.higgs_audio import HiggsAudioModel",
    "from transformers import AutoTokenizer",
    "",
    'model = HiggsAudioModel.from_pretrained("THIS_DIR")',
    'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
    "```",
]


def check_export(model_dir: str, probe_path: str, atol: float = 1e-5, rtol: float = 1e-4) -> dict:
    """Reload an exported directory and compare its logits with those the trained model produced
    (torch.allclose semantics: |a - b| <= atol + rtol * |b| everywhere)."""
    import torch

    from higgs_ds.models.interface import logits_for_loss

    forbid_remote_code()
    check_model_dir(model_dir)
    family = require_model_family(model_dir)
    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    trained = probe.get("family", BOSON)  # probes written before the native family were boson's
    if trained != family:
        raise ExportError(
            f"{probe_path} holds logits of a {trained}-format batch and {model_dir} is a {family}-format model: "
            f"check an export in the trained format (higgs-ds export --format {trained})"
        )
    if family == V3:
        from higgs_ds.models.v3.checkpoint import load_v3_model

        model = load_v3_model(model_dir, dtype=torch.float32).eval()
    elif family == NATIVE:
        from higgs_ds.models.native.load import load_native_model

        model = load_native_model(model_dir, dtype=torch.float32).eval()
    else:
        import boson_multimodal.model.higgs_audio  # noqa: F401
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        model = HiggsAudioModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = logits_for_loss(model, probe["batch"], family)
    pairs = ((out.text_logits.float(), probe["logits"]), (out.audio_logits.float(), probe["audio_logits"]))
    return {
        "max_abs_diff_logits": (pairs[0][0] - pairs[0][1]).abs().max().item(),
        "max_abs_diff_audio_logits": (pairs[1][0] - pairs[1][1]).abs().max().item(),
        "equal": all(torch.allclose(a, b, atol=atol, rtol=rtol) for a, b in pairs),
        "atol": atol,
        "rtol": rtol,
    }
