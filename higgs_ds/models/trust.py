"""Model directories are data: nothing in one is ever executed, and nothing is downloaded.

Two layers, used by `higgs-ds train` and by `swift sft --external_plugins higgs_ds/swift_plugin.py` (and
meant for anything else that loads a model directory: export, check-export, generate, preflight):

- `forbid_remote_code()` replaces transformers' remote-code machinery (`transformers.dynamic_module_utils`)
  in this process. Whatever a caller passes as trust_remote_code (ms-swift passes True for every config,
  tokenizer and model it loads), a model, config, tokenizer or processor that asks for its own code (an
  `auto_map`, in config.json or in a file that `configuration_files` leads to, or a class reference into
  another directory) raises `RemoteCodeRefused` naming the directory, and no file is imported. This is the
  root: it does not depend on guessing which files transformers will follow.
- `check_model_dir(path)` is the refusal up front, before anything is loaded, with the file named: the path
  must be an existing local directory (higgs-ds never downloads a model), holding a config.json object; no
  Python file may be inside it (any depth, symlinks followed), no JSON file in it may carry an `auto_map`
  (any depth of the JSON), `configuration_files` may name only files beside config.json, and SWIFT's
  args.json (if any) may not name plugins to import.

    from higgs_ds.models.trust import check_model_dir, forbid_remote_code
    forbid_remote_code()          # once per process, before configs are loaded
    check_model_dir(cfg.model)    # UserError naming the file and saying what to do
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import sys
from pathlib import Path

from higgs_ds.errors import UserError

# Anything the Python import system (or a zipapp) can execute.
PYTHON_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyz", ".pyd")
MAX_ENTRIES = 200_000  # a model directory holds tens of files; a hostile one must not make the scan hang
MAX_DEPTH = 32
MAX_JSON_BYTES = 256 * 2**20  # the largest tokenizer.json files are tens of MB
NOT_A_DIRECTORY = (
    "higgs-ds never downloads a model: download it once (e.g. `huggingface-cli download "
    "bosonai/higgs-audio-v2-generation-3B-base --local-dir DIR`) and pass that directory"
)


class RemoteCodeRefused(UserError):
    """A model, config, tokenizer or processor asked to run code shipped with it."""


def _refuse(where, what: str) -> None:
    raise RemoteCodeRefused(
        f"{where}: {what}; higgs-ds never runs code from a model directory (it uses boson_multimodal's own "
        "classes): remove auto_map from its config files and any Python files, or use the released model"
    )


def _resolve_trust_remote_code(trust_remote_code, model_name, has_local_code, has_remote_code, *args, **kwargs):
    """transformers' decision point for every Auto class: code is never trusted, and asking for it fails."""
    if has_remote_code:
        _refuse(model_name, "its config asks for its own code (auto_map)")
    return False


def _get_class_from_dynamic_module(class_reference, pretrained_model_name_or_path, *args, **kwargs):
    _refuse(pretrained_model_name_or_path, f"it asks to import {class_reference!r} (auto_map)")


def _get_cached_module_file(pretrained_model_name_or_path, module_file, *args, **kwargs):
    _refuse(pretrained_model_name_or_path, f"it asks to import {module_file!r}")


def _get_class_in_module(class_name, module_path, *args, **kwargs):
    _refuse(module_path, f"it asks to import {class_name!r}")


_REPLACEMENTS = {
    "resolve_trust_remote_code": _resolve_trust_remote_code,
    "get_class_from_dynamic_module": _get_class_from_dynamic_module,
    "get_cached_module_file": _get_cached_module_file,
    "get_class_in_module": _get_class_in_module,
}


def forbid_remote_code() -> None:
    """Make remote code impossible in this process (idempotent). Modules that imported these functions by
    name before this call (transformers' auto classes, pipelines, ms-swift) get the replacements too; those
    imported later read them from dynamic_module_utils, which is replaced first."""
    from transformers import dynamic_module_utils as dmu

    if getattr(dmu, "higgs_ds_no_remote_code", False):
        return
    originals = {name: getattr(dmu, name) for name in _REPLACEMENTS}
    for name, replacement in _REPLACEMENTS.items():
        setattr(dmu, name, replacement)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)  # never getattr on the module: lazy modules import
        if not isinstance(namespace, dict):
            continue
        for name, original in originals.items():
            if namespace.get(name) is original:
                namespace[name] = _REPLACEMENTS[name]
    dmu.higgs_ds_no_remote_code = True


def remote_code_forbidden() -> bool:
    from transformers import dynamic_module_utils as dmu

    return getattr(dmu, "higgs_ds_no_remote_code", False)


def _walk(root: Path):
    """Every entry under `root` (symlinks followed, each real directory once, bounded): (path, stat or None)."""
    seen_dirs, stack, count = set(), [(root, 0)], 0
    while stack:
        directory, depth = stack.pop()
        try:
            info = directory.stat()
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            continue  # a symlink loop, or two links to one folder
        seen_dirs.add((info.st_dev, info.st_ino))
        try:  # never more than the bound is listed, however many entries a folder has
            entries = sorted(itertools.islice(os.scandir(directory), MAX_ENTRIES + 1), key=lambda e: e.name)
        except OSError as err:
            raise UserError(f"model directory {directory} cannot be listed ({err}): fix its permissions") from None
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                raise UserError(
                    f"model directory {root} holds more than {MAX_ENTRIES} files: it is not a model "
                    "directory; point `model` at the folder with config.json and the weights"
                )
            path = Path(entry.path)
            try:
                entry_stat = path.stat()  # follows symlinks (a Hugging Face cache snapshot is all links)
            except OSError:
                entry_stat = None  # a dangling link: its name is still checked
            yield path, entry_stat
            if entry_stat is not None and stat.S_ISDIR(entry_stat.st_mode):
                if depth + 1 > MAX_DEPTH:
                    raise UserError(f"model directory {root} nests folders deeper than {MAX_DEPTH} at {path}")
                stack.append((path, depth + 1))


def _json_with_auto_map(path: Path, size: int):
    """(parsed JSON, whether any object in it has an auto_map key); UserError if it cannot be parsed."""
    if size > MAX_JSON_BYTES:
        raise UserError(
            f"{path} is {size} bytes: no model config or tokenizer file is that large; remove it from the "
            "model directory"
        )
    found = []

    def pairs_hook(pairs):
        if any(key == "auto_map" for key, _ in pairs):  # keys are decoded: "auto\\u005fmap" is caught too
            found.append(True)
        return dict(pairs)

    try:
        return json.loads(path.read_bytes(), object_pairs_hook=pairs_hook), bool(found)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise UserError(f"{path} is not valid JSON ({reason}): replace it with the released model's file") from None


def check_model_dir(model: str | os.PathLike) -> Path:
    """Refuse a model path that is not a local directory, or that carries code; return it as a Path."""
    root = Path(os.path.expanduser(str(model)))
    if not str(model) or not root.exists():
        raise UserError(f"model {model} is not a local directory; {NOT_A_DIRECTORY}")
    if not root.is_dir():
        raise UserError(f"model {model} is not a directory: point `model` at the folder holding config.json")
    if not (root / "config.json").is_file():
        raise UserError(f"model directory {model} has no config.json: point `model` at a Hugging Face model folder")
    python_files, configs = [], {}
    for path, info in _walk(root):
        if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            # a FIFO or a device (a link to /dev/zero named tokenizer.json): reading it never ends
            raise UserError(
                f"{path} is not a regular file (a device, FIFO or socket): remove it from the model directory"
            )
        if path.name.lower().endswith(PYTHON_SUFFIXES) or path.name == "__pycache__":
            python_files.append(path)
        elif path.name.lower().endswith(".json") and info is not None and stat.S_ISREG(info.st_mode):
            parsed, has_auto_map = _json_with_auto_map(path, info.st_size)
            if has_auto_map:
                _refuse(path, "it has an auto_map (custom model code)")
            configs[path.relative_to(root).as_posix()] = parsed
    if python_files:
        shown = ", ".join(str(p) for p in python_files[:5]) + (" ..." if len(python_files) > 5 else "")
        raise RemoteCodeRefused(
            f"model directory {model} carries Python files ({shown}); higgs-ds never runs code from a model "
            "directory: remove them (a training checkpoint's DeepSpeed scripts included, or export the "
            "checkpoint with `higgs-ds export` and train from the export)"
        )
    _check_config(root, configs.get("config.json"))
    _check_swift_args(root, configs.get("args.json"))
    return root


def _check_config(root: Path, config) -> None:
    path = root / "config.json"
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object (the model's configuration): replace it")
    names = config.get("configuration_files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: configuration_files must be a list of file names: fix or remove it")
    for name in names:  # transformers reads one of these instead of config.json
        if Path(name).name != name or name in (".", "..") or not (root / name).is_file():
            raise UserError(
                f"{path}: configuration_files names {name!r}, not a file beside config.json: remove the entry"
            )


def _check_swift_args(root: Path, args) -> None:
    """SWIFT reads a model directory's args.json (a checkpoint's saved arguments); plugins named there
    would be imported with --load_args true. The one allowed is this package's own plugin."""
    if not isinstance(args, dict):
        return
    own = (Path(__file__).parents[1] / "swift_plugin.py").resolve()
    for key in ("external_plugins", "custom_register_path"):
        named = args.get(key) or []
        named = [named] if isinstance(named, str) else named
        if any(not isinstance(p, str) or Path(p).resolve() != own for p in named):
            raise RemoteCodeRefused(
                f"{root / 'args.json'} names {key} {args[key]!r}, Python files SWIFT would import; "
                f"higgs-ds never runs code named by a model directory: remove {key} from it"
            )


class ModelFileError(UserError):
    """A file of a model directory resolves outside it (a symlink elsewhere)."""


def model_file(path: str | os.PathLike, error: type[UserError] = ModelFileError) -> Path | None:
    """The real path of a model directory's file, to copy or read: the file itself, or the target of a
    Hugging Face cache snapshot's link into its repository's `blobs/` (a snapshot is all such links); None
    when there is no such file. A link resolving anywhere else (a key file, another model) is refused
    (`error`, the caller's error class)."""
    src = Path(path)
    if not os.path.lexists(src):
        return None
    real = Path(os.path.realpath(src))
    folder = Path(os.path.realpath(src.parent))
    roots = [folder] + ([folder.parent.parent] if folder.parent.name == "snapshots" else [])
    if not real.is_file() or not any(real.is_relative_to(r) for r in roots):
        raise error(
            f"{src} is not a regular file of {src.parent} (it resolves to {real}): replace it with the file itself"
        )
    return real
