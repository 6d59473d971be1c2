"""Credentials never reach a checkpoint, installed at import: SWIFT's args.json (and its copy of a
`swift sft CONFIG.yaml`) is written redacted, and the training arguments pickle (training_args.bin, in every
checkpoint and Hub push) without hub_token and the like, while the live objects keep them."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from swift.utils import get_logger

from higgs_ds.safe_io import atomic_write_text, is_secret_key, redact

logger = get_logger()


def _pickled_without_credentials(cls) -> None:
    """HF/SWIFT write `torch.save(trainer.args)` as training_args.bin into every checkpoint (and into a Hub
    push): pickling these arguments leaves credentials out (hub_token and the like become None, token-like
    values elsewhere '<redacted>'), while the live object keeps them for the push itself. Copies in memory
    (copy/deepcopy, which would go through the same pickling hook) stay whole."""
    if cls.__dict__.get("higgs_ds_redacted_pickle", False):
        return

    def __getstate__(self):
        return {
            key: None if is_secret_key(key) and isinstance(value, str) else redact(value)
            for key, value in self.__dict__.items()
        }

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    cls.__getstate__, cls.__copy__, cls.__deepcopy__ = __getstate__, __copy__, __deepcopy__
    cls.higgs_ds_redacted_pickle = True


def _save_swift_args_redacted() -> None:
    """SWIFT's args.json (output_dir, copied into every checkpoint) and its copy of a `swift sft CONFIG.yaml`
    are written with credentials redacted (SWIFT itself drops only keys containing '_token'), atomically."""
    from swift.arguments import BaseArguments
    from swift.utils import check_json_format, is_master

    if getattr(BaseArguments.save_args, "higgs_ds_hook", False):
        return

    def save_args(self, output_dir=None) -> None:
        if not is_master():
            return
        output_dir = output_dir or self.output_dir
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "args.json")
        logger.info(f"The {self.__class__.__name__} will be saved in: {path} (credentials redacted)")
        text = json.dumps(redact(check_json_format(self.__dict__)), ensure_ascii=False, indent=2)
        atomic_write_text(path, text)
        config_file = os.getenv("SWIFT_CONFIG_FILE")
        if config_file:
            _copy_config_redacted(config_file, output_dir)

    save_args.higgs_ds_hook = True
    BaseArguments.save_args = save_args


def _copy_config_redacted(config_file: str, output_dir: str) -> None:
    import yaml

    text = Path(config_file).read_text(encoding="utf-8")
    values = yaml.safe_load(text)  # SWIFT has read it already: JSON or YAML
    clean = redact(values)
    if clean != values:
        text = json.dumps(clean, indent=2) if config_file.endswith(".json") else yaml.safe_dump(clean, sort_keys=False)
    atomic_write_text(Path(output_dir) / Path(config_file).name, text)


def _keep_credentials_out_of_checkpoints() -> None:
    from swift.arguments import BaseArguments
    from transformers import TrainingArguments

    _pickled_without_credentials(TrainingArguments)  # the base of SWIFT's Seq2SeqTrainingArguments
    _pickled_without_credentials(BaseArguments)
    _save_swift_args_redacted()


_keep_credentials_out_of_checkpoints()
