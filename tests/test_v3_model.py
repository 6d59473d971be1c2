"""Higgs TTS 3's model: the released layout loads strictly, the forward is the facts' formula (checked by
explicit indexing, not by calling the module's own code), the KV cache, the released-layout round trip,
and the tie of the fused table surviving LoRA training."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_ds.errors import UserError
from higgs_ds.models.v3.checkpoint import FUSED_TABLE, TEXT_EMBEDDING, load_v3_model, save_released_state

K, V = 8, 1026


@pytest.fixture(scope="module")
def model(tiny_v3):
    return load_v3_model(tiny_v3).eval()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    listed = {k: "model.safetensors" for k in tensors if not k.startswith("tied.head.")}
    index["weight_map"] = listed
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_released_layout_loads_with_rope_fix_and_every_weight_from_the_file(tiny_v3, model):
    config = json.loads((tiny_v3 / "config.json").read_text())
    assert config["text_config"]["rope_theta"] is None  # as released
    assert model.config.text_config.rope_parameters["rope_theta"] == 1e6
    on_disk = load_file(tiny_v3 / "model.safetensors")
    state = model.state_dict()
    assert set(state) == {
        k for k in on_disk if not k.startswith(("tied.head.", "tied.embedding.modality_embeddings.0.model."))
    }
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
    assert on_disk[FUSED_TABLE].shape == (K * V, 64)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.pop("body.layers.1.mlp.up_proj.weight"), "body.layers.1.mlp.up_proj.weight"),
        (lambda t: t.__setitem__("body.extra.weight", torch.zeros(2)), "body.extra.weight"),
        (lambda t: t.__setitem__(FUSED_TABLE, torch.zeros(K * V - 1, 64)), FUSED_TABLE),
        (lambda t: t.__setitem__("tied.head.text_head.weight", torch.zeros(3, 64)), "tied.head.text_head.weight"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "untied-copy"],
)
def test_a_checkpoint_that_is_not_the_model_is_refused_naming_the_key(tmp_path, tiny_v3, edit, named):
    folder = _copy(tiny_v3, tmp_path / "edited")
    _edit_weights(folder, edit)
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_v3_model(folder)


def test_forward_is_the_summed_codebook_embedding_replacing_text_and_the_tied_head(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (1, 9))
    audio = torch.zeros(1, 9, dtype=torch.bool)
    audio[0, 4:] = True
    rows = torch.randint(0, V, (5, K))
    out = model(ids, torch.ones_like(ids), rows, audio, audio_out_mask=None)
    table = model.state_dict()[FUSED_TABLE]
    text = model.state_dict()[TEXT_EMBEDDING]
    embeds = text[ids[0]].clone()
    for m, p in enumerate(range(4, 9)):  # replaced, not added: the text row of that position is gone
        embeds[p] = sum(table[c * V + rows[m, c]] for c in range(K))
    hidden = model.body(inputs_embeds=embeds[None], attention_mask=torch.ones_like(ids)).last_hidden_state
    by_hand = (hidden @ table.T).view(1, 9, K, V)
    torch.testing.assert_close(out.audio_logits, by_hand, atol=1e-5, rtol=1e-5)
    # and the replacement matters: the same positions with text embeddings give other logits
    plain = model(ids, torch.ones_like(ids)).audio_logits
    assert (plain[0, 4:] - out.audio_logits[0, 4:]).abs().max() > 1e-3


def test_kv_cache_steps_give_the_full_forwards_logits(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 200, (1, 6))
    rows = torch.randint(0, V, (4, K))
    full_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    audio = torch.zeros(1, 10, dtype=torch.bool)
    audio[0, 6:] = True
    full = model(full_ids, torch.ones_like(full_ids), rows, audio).audio_logits[0]
    out = model(ids, torch.ones_like(ids), use_cache=True)
    steps = [out.audio_logits[0, -1]]
    for m in range(4):
        one = torch.ones(1, 1, dtype=torch.bool)
        out = model(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 7 + m, dtype=torch.long), rows[m : m + 1], one,
                    past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
        steps.append(out.audio_logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), full[5:], atol=1e-5, rtol=1e-5)


def test_released_round_trip_is_bit_identical_and_reloads_with_equal_logits(tmp_path, tiny_v3, model):
    out = tmp_path / "out"
    out.mkdir()
    save_released_state(model.state_dict(), out, tiny_v3)
    before, after = load_file(tiny_v3 / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (tiny_v3 / name).read_bytes(), name
    ids = torch.randint(0, 200, (1, 7))
    reloaded = load_v3_model(out).eval()
    torch.testing.assert_close(reloaded(ids).audio_logits, model(ids).audio_logits, atol=0, rtol=0)


def test_lora_training_keeps_the_fused_table_one_tensor_for_input_and_head(tiny_v3):
    from peft import LoraConfig, get_peft_model

    model = load_v3_model(tiny_v3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      modules_to_save=["modality_embeddings.0.embedding"])  # fmt: skip
    peft_model = get_peft_model(model, lora)
    wrappers = [n for n, m in peft_model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert wrappers == ["base_model.model.tied.embedding.modality_embeddings.0.embedding"]  # only the table
    trained = peft_model.base_model.model.fused.modules_to_save["default"]
    start = trained.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(3)
    ids = torch.randint(0, 200, (2, 8))
    audio = torch.zeros(2, 8, dtype=torch.bool)
    audio[:, 3:] = True
    rows = torch.randint(0, 1024, (10, K))
    seen = []
    hook = trained.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs.get("head", False)),
                                         with_kwargs=True)  # fmt: skip
    for _ in range(3):
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), audio_in_codes=rows,
                            audio_in_mask=audio, audio_out_mask=audio).audio_logits  # fmt: skip
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), rows.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    hook.remove()
    assert seen == [False, True] * 3  # the input lookup and the head ran through the one trained copy
    assert not torch.equal(trained.weight, start)  # trained in full
    merged = peft_model.merge_and_unload()
    state = merged.state_dict()
    assert torch.equal(state[FUSED_TABLE], trained.weight.detach())
    out = tiny_v3.parent / "lora-export"
    out.mkdir(exist_ok=True)
    save_released_state(state, out, tiny_v3)
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["tied.head.modality_heads.0.weight"], written[FUSED_TABLE])
    assert torch.equal(written[FUSED_TABLE], trained.weight.detach())


def test_convert_refuses_a_v3_model_naming_why(tmp_path, tiny_v3):
    from higgs_ds.models.convert import convert_model

    with pytest.raises(UserError, match="Higgs TTS 3 model: it has one format"):
        convert_model(tiny_v3, "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _snapshot(tiny_v3, root):
    """`tiny_v3` laid out as a Hugging Face cache: models--bosonai--x/snapshots/REV/NAME -> ../../blobs/HASH."""
    repo = root / "models--bosonai--higgs-tts-3-4b"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for k, f in enumerate(sorted(p for p in tiny_v3.iterdir() if p.is_file())):
        shutil.copyfile(f, blobs / f"blob{k}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{k}")
    return snapshot


def test_an_export_from_a_hugging_face_cache_snapshot_carries_its_files_and_licence(tmp_path, tiny_v3, model):
    from higgs_ds.models.v3.licence import write_licence_files

    base = _snapshot(tiny_v3, tmp_path / "hub")  # every file a link into blobs/, as `huggingface-cli download` makes
    out = tmp_path / "export"
    out.mkdir()
    save_released_state(model.state_dict(), out, base)
    written = write_licence_files(out, base)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "LICENSE"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (tiny_v3 / name).read_bytes(), name
    assert written == ["LICENSE", "NOTICE"]
    reloaded = load_v3_model(out)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    secret = tmp_path / "secret.txt"  # a link out of the snapshot's repository is refused by name, never copied
    secret.write_text("not a licence")
    (base / "LICENSE").unlink()
    (base / "LICENSE").symlink_to(secret)
    with pytest.raises(UserError) as err:
        write_licence_files(tmp_path / "export", base)
    assert str(base / "LICENSE") in str(err.value) and "regular file" in str(err.value)
