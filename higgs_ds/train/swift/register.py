"""Higgs-Audio v2 and Higgs TTS 3 registered with ms-swift, at import: the model types, the template and the trainer.

* model types `higgs_audio_v2` (native), `higgs_audio` (boson) and `higgs_tts_3` (v3): the family's class, loaded
  through HiggsAudioLoader (never trust_remote_code), strictly: every weight of the directory used, none missing
  (v3: its bundled codec and tied copies dropped on purpose, higgs_ds.models.v3.checkpoint);
* template `higgs_audio`: higgs_ds.train.swift.template; trainer: higgs_ds.train.swift.trainer.

Before any of it, no model directory may run code: transformers' remote code is replaced in the process
(higgs_ds.models.trust), every model SWIFT resolves goes through check_model_dir first, and a hub id is
refused, never downloaded (the guard is installed here, at import, for both entry points).
"""

from __future__ import annotations

from swift.model import ModelGroup, ModelLoader, ModelMeta, register_model
from swift.template import register_template
from swift.template.templates.llama import Llama3TemplateMeta
from swift.trainers import TrainerFactory
from swift.utils import get_logger
from transformers import AutoTokenizer

from higgs_ds.errors import UserError, exit_on_user_error
from higgs_ds.models.family import BOSON, NATIVE, V3, environment_family, require_model_family
from higgs_ds.models.patches import check_audio_side, patch_for_training
from higgs_ds.models.strict import check_state_dict_matches
from higgs_ds.models.trust import NOT_A_DIRECTORY, check_model_dir, forbid_remote_code
from higgs_ds.train.swift.template import HiggsAudioTemplate
from higgs_ds.train.swift.trainer import HiggsAudioTrainer

if environment_family() == BOSON:
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers AutoConfig/AutoModel "higgs_audio"
else:  # our Higgs TTS 3 config, known to AutoConfig without remote code
    from higgs_ds.models.v3.modeling import register_v3

    register_v3()

# Before SWIFT loads anything: no config, tokenizer or model may run code of its own (see higgs_ds.models.trust).
forbid_remote_code()
logger = get_logger()
# SWIFT model types, one per family (the family of --model must match: see HiggsAudioLoader); one template.
MODEL_TYPES = {NATIVE: "higgs_audio_v2", BOSON: "higgs_audio", V3: "higgs_tts_3"}
TEMPLATE_TYPE = "higgs_audio"


class HiggsAudioLoader(ModelLoader):
    """Either family's model class (never trust_remote_code), loaded strictly: every weight of the directory
    used and none missing (transformers only warns). A directory of the other family is a one-line error."""

    default_trust_remote_code = False  # the classes are imported, never fetched from a model repo
    activation_checkpointing = False  # set from the run config (TrainConfig.activation_checkpointing)
    train_modules = "all"  # TrainConfig.train_modules; the freezing itself is SWIFT's (see launch._tuner_args)

    def get_processor(self, model_dir, config):
        # The tokenizer only: training reads codes from the shards, and a native directory's processor config
        # names its codec by hub id (bosonai/higgs-audio-v2-tokenizer), which AutoProcessor would download.
        self.auto_tokenizer_cls = AutoTokenizer
        return super().get_processor(model_dir, config)

    def get_model(self, model_dir, config, processor, model_kwargs):
        family = require_model_family(model_dir)
        if family == V3:
            return self._get_v3_model(model_dir, config, processor, model_kwargs)
        if family == NATIVE:
            from transformers import HiggsAudioV2ForConditionalGeneration

            # the text head is a constructor argument; without it the checkpoint's text_lm_head is dropped
            self.auto_model_cls = HiggsAudioV2ForConditionalGeneration
            model_kwargs = dict(model_kwargs, use_text_head=True)
        else:
            from transformers import AutoModel

            self.auto_model_cls = AutoModel
        model = super().get_model(model_dir, config, processor, model_kwargs)
        check_state_dict_matches(model_dir, _expected_shapes(model), f"the {family} Higgs-Audio v2 class")
        if self.train_modules == "audio":
            check_audio_side(model)  # before the trainer: a wrong model fails in seconds, not after setup
        if family == BOSON:  # get_input_embeddings, PEFT's labels kwarg, checkpointing: see models.patches
            patch_for_training(model, activation_checkpointing=self.activation_checkpointing)
        elif self.activation_checkpointing:  # the native class supports HF's own switch
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            layers = model.model.layers
            on = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
            logger.info(f"activation checkpointing: {on} of {len(layers)} decoder layers recompute in backward")
        return model

    def _get_v3_model(self, model_dir, config, processor, model_kwargs):
        from higgs_ds.models.v3.checkpoint import (
            expected_state_shapes,
            load_v3_config,
            log_ignored,
            split_checkpoint_keys,
        )
        from higgs_ds.models.v3.modeling import HiggsTTS3ForConditionalGeneration

        v3_config = load_v3_config(model_dir)  # headers first: a wrong directory fails before any weight loads
        keys = split_checkpoint_keys(model_dir, expected_state_shapes(v3_config))
        self.auto_model_cls = HiggsTTS3ForConditionalGeneration
        # the headers matched the class (names and shapes), so from_pretrained fills every weight of it
        model = super().get_model(model_dir, config, processor, model_kwargs)
        check_state_dict_matches_v3(model_dir, _expected_shapes(model), keys)
        log_ignored(model_dir, keys)
        if self.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            layers = model.body.layers
            on = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
            logger.info(f"activation checkpointing: {on} of {len(layers)} decoder layers recompute in backward")
        return model


def check_state_dict_matches_v3(model_dir, shapes: dict[str, tuple], keys: dict) -> None:
    """The loaded class's weights (ZeRO-3: full shapes) are exactly the checkpoint's model tensors."""
    if sorted(shapes) != keys["model"]:
        missing = sorted(set(keys["model"]) - set(shapes)) or sorted(set(shapes) - set(keys["model"]))
        raise UserError(f"{model_dir}: the loaded Higgs TTS 3 class and the checkpoint differ at {missing[:5]}")


def _expected_shapes(model) -> dict[str, tuple]:
    """The checkpoint keys and shapes the loaded class expects (ZeRO-3 partitions report their full shape
    in ds_shape), persistent buffers included."""
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return shapes


for _family, _architecture in (
    (NATIVE, "HiggsAudioV2ForConditionalGeneration"),
    (BOSON, "HiggsAudioModel"),
    (V3, "HiggsMultimodalQwen3ForConditionalGeneration"),
):
    register_model(
        ModelMeta(
            MODEL_TYPES[_family],
            [ModelGroup([])],
            HiggsAudioLoader,
            template=TEMPLATE_TYPE,
            architectures=[_architecture],
            tags=["audio", "tts"],
        ),
        exist_ok=True,
    )
register_template(
    Llama3TemplateMeta(TEMPLATE_TYPE, template_cls=HiggsAudioTemplate, default_system=None), exist_ok=True
)


TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{HiggsAudioTrainer.__module__}.HiggsAudioTrainer"


def _guard_swift_model_loading() -> None:
    """Every model SWIFT resolves (`--model`, and HiggsSft's) passes get_model_info_meta, which resolves the
    path (downloading a hub id) and then reads its config with trust_remote_code=True. There: a hub id is
    refused (higgs-ds never downloads), a local directory goes through check_model_dir before anything in
    it is read; and SWIFT's hub downloads are refused wherever else they are asked for. This runs inside
    SWIFT's argument parsing, so a refusal ends the process with the policy's line and exit code 2."""
    from swift.hub import hub
    from swift.model import model_meta

    resolve = model_meta.safe_snapshot_download
    if getattr(resolve, "higgs_ds_hook", False):
        return

    def local_model_dir(model_id_or_path, *args, **kwargs):
        try:
            check_model_dir(model_id_or_path)
        except UserError as err:
            raise exit_on_user_error(err) from None
        return resolve(model_id_or_path, *args, **kwargs)

    def no_download(cls, model_id_or_path=None, *args, **kwargs):
        err = UserError(f"model {model_id_or_path} is not a local directory; {NOT_A_DIRECTORY}")
        raise exit_on_user_error(err)

    local_model_dir.higgs_ds_hook = True
    model_meta.safe_snapshot_download = local_model_dir
    for hub_class in (hub.MSHub, hub.HFHub):
        hub_class.download_model = classmethod(no_download)


_guard_swift_model_loading()
