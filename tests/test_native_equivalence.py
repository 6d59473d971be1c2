"""The issue's check 1 for logits and loss: on the same weights and the same samples, the native model on our
native batch computes what boson's HiggsAudioModel computes on boson's collator batch.

The boson environment (tests/reference/boson_logits.py) builds the tiny boson model, re-draws its weights at
a scale where attention, rope and the dual FFN matter (logits of order 4), encodes TTS, voice cloning with
start_index, a multi-speaker dialogue, scene text in the system turn, audio-in, text-only and two-assistant-
turn samples with boson's prepare_chatml_sample and random codes, collates each alone and several together
with boson's HiggsAudioSampleCollator and writes boson's outputs. Here the model is converted with
higgs_ds.models.convert, loaded strictly, the same EncodedSamples are collated with NativeCollator, and:

* text logits at every attended position and audio logits at every audio-out position: max abs difference
  <= 1e-5 (float32; measured up to ~1.7e-6, on logits of magnitude ~4);
* the training loss (higgs_loss) and its text and audio terms: relative difference <= 1e-6;
* the layout itself: boson's expanded labels, its audio-code routing mask and audio-out mask, and
  label_audio_ids equal ours exactly.

A control shows the tolerance is tight enough to see one changed code. And the native directory's chat
template renders each sample's conversation as exactly boson's prepare_chatml_sample tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from higgs_ds.models.family import BOSON
from tests.envs import REFERENCE, run_in_env

pytestmark = pytest.mark.native_env

LOGIT_ATOL = 1e-5  # max abs difference of text and audio logits, float32
LOSS_RTOL = 1e-6  # relative difference of the loss and of its text and audio terms


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("boson-reference")
    run_in_env(BOSON, [REFERENCE / "boson_logits.py", work], timeout=300)
    arrays = np.load(work / "reference.npz")
    return work, {k: arrays[k] for k in arrays.files}, json.loads((work / "reference.json").read_text())


@pytest.fixture(scope="module")
def native(reference, tmp_path_factory):
    """The converted model, its collator, and the reference's EncodedSamples."""
    from higgs_ds.models.convert import convert_model
    from higgs_ds.models.native.batch import NativeCollator
    from higgs_ds.models.native.load import load_native_model
    from higgs_ds.models.tiny import build_tiny_tokenizer
    from higgs_ds.stream.tokens import EncodedSample

    work, arrays, meta = reference
    out = convert_model(work / "boson_model", "native", tmp_path_factory.mktemp("native") / "model")
    model = load_native_model(out).eval()
    samples = [
        EncodedSample(sid, arrays[f"s{i}_input_ids"], arrays[f"s{i}_label_ids"], arrays[f"s{i}_codes"],
                      arrays[f"s{i}_frames"].tolist())
        for i, sid in enumerate(meta["sample_ids"])
    ]  # fmt: skip
    return model, NativeCollator(model.config, build_tiny_tokenizer()), samples


def _forward(model, batch):
    import torch

    from higgs_ds.models.native.logits import native_logits

    with torch.no_grad():
        return native_logits(model, batch)


def _batches(reference, native):
    _, arrays, meta = reference
    model, collator, samples = native
    for j, members in enumerate(meta["batches"]):
        names = [samples[i].sample_id for i in members]
        yield (
            names,
            {k[len(f"b{j}_") :]: v for k, v in arrays.items() if k.startswith(f"b{j}_")},
            collator([samples[i] for i in members]),
        )


@pytest.mark.timeout(300)
def test_logits_and_loss_equal_bosons(reference, native):
    from higgs_ds.train.loss import higgs_loss

    model = native[0]
    assert len(reference[2]["batches"]) >= 10  # every sample alone, all eight together, an uneven pair
    for names, ref, batch in _batches(reference, native):
        text, audio = _forward(model, batch)
        attended = batch["attention_mask"].bool()
        ours = text[attended].numpy()
        assert ours.shape == ref["text_logits"].shape, names
        assert np.abs(ours - ref["text_logits"]).max() <= LOGIT_ATOL, names
        assert audio.shape == ref["audio_logits"].shape, names
        if audio.numel():
            assert np.abs(audio.numpy() - ref["audio_logits"]).max() <= LOGIT_ATOL, names
        loss, metrics = higgs_loss(text, batch["label_ids"], audio, batch["label_audio_ids"])
        ours_loss = np.array([float(loss), float(metrics["text_loss"]), float(metrics["audio_loss"])])
        np.testing.assert_allclose(ours_loss, ref["loss"], rtol=LOSS_RTOL, atol=0, err_msg=str(names))


@pytest.mark.timeout(300)
def test_layout_equals_bosons_expansion(reference, native):
    config = native[0].config
    for names, ref, batch in _batches(reference, native):
        attended = batch["attention_mask"].bool()
        ids = batch["input_ids"][attended].numpy()
        routed = (ids == config.audio_token_id) | (ids == config.audio_delay_token_id)
        np.testing.assert_array_equal(batch["attention_mask"].sum(1).numpy(), ref["rows"], err_msg=str(names))
        np.testing.assert_array_equal(batch["label_ids"][attended].numpy(), ref["expanded_labels"], str(names))
        np.testing.assert_array_equal(routed, ref["audio_codes_mask"], str(names))
        np.testing.assert_array_equal(batch["audio_out_mask"][attended].numpy(), ref["audio_out_mask"], str(names))
        np.testing.assert_array_equal(ids[~routed], ref["expanded_input_ids"][~routed], str(names))
        np.testing.assert_array_equal(batch["label_audio_ids"].numpy(), ref["label_audio_ids"], str(names))
        assert not batch["audio_out_mask"][~attended].any()


@pytest.mark.timeout(300)
def test_the_tolerance_sees_one_changed_code(reference, native):
    """Control: the same comparison on a batch with a single audio code changed fails by far."""
    names, ref, batch = next(iter(_batches(reference, native)))
    codes = batch["audio_input_ids"]
    f = int(batch["audio_input_ids_mask"][0].nonzero()[3])  # a frame holding a real code of codebook 0
    codes[0, f, 0] = (codes[0, f, 0] + 1) % 1024
    text, audio = _forward(native[0], batch)
    assert np.abs(text[batch["attention_mask"].bool()].numpy() - ref["text_logits"]).max() > 100 * LOGIT_ATOL
    assert np.abs(audio.numpy() - ref["audio_logits"]).max() > 100 * LOGIT_ATOL


@pytest.mark.timeout(300)
def test_chat_template_renders_bosons_tokens(reference):
    """The processor's chat template (layout.CHAT_TEMPLATE) gives boson's prepare_chatml_sample tokens for every
    sample, with each audio item as the one placeholder the processor expands, <|AUDIO_OUT|>."""
    from higgs_ds.models.native.layout import CHAT_TEMPLATE
    from higgs_ds.models.tiny import build_tiny_tokenizer

    _, arrays, meta = reference
    tokenizer = build_tiny_tokenizer()
    audio_in, audio_out = tokenizer.convert_tokens_to_ids(["<|AUDIO|>", "<|AUDIO_OUT|>"])
    for i, chatml in enumerate(meta["chatml"]):
        text = tokenizer.apply_chat_template(chatml["messages"], chat_template=CHAT_TEMPLATE, tokenize=False)
        bosons = np.where(arrays[f"s{i}_input_ids"] == audio_in, audio_out, arrays[f"s{i}_input_ids"])
        assert tokenizer.encode(text, add_special_tokens=False) == bosons.tolist(), meta["sample_ids"][i]
    prompt = tokenizer.apply_chat_template(
        meta["chatml"][0]["messages"][:2], chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")
