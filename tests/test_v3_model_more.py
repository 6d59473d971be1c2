"""Higgs TTS 3's model, beyond tests/test_v3_model.py: AutoConfig without remote code, the audio geometry refused,
a weights-only directory, audio_out_mask selection, gradients into both tables, padding = each sample alone, KV cache
with text and audio steps, gradient checkpointing, and the tie after full fine-tuning (the text head copy too)."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.native_env

K, V = 8, 1026  # codebooks, ids per codebook (facts doc, section 3)
CODEC = "tied.embedding.modality_embeddings.0.model."
TEXT = "tied.embedding.text_embedding.weight"
TABLE = "tied.embedding.modality_embeddings.0.embedding.weight"
COPIES = {"tied.head.text_head.weight": TEXT, "tied.head.modality_heads.0.weight": TABLE}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from higgs_ds.models.v3.tiny_model import write_tiny_v3_model

    torch.set_num_threads(2)
    return write_tiny_v3_model(tmp_path_factory.mktemp("v3") / "tiny")


@pytest.fixture(scope="module")
def model(tiny_dir):
    from higgs_ds.models.v3.checkpoint import load_v3_model

    return load_v3_model(tiny_dir).eval()


def file_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def a_batch(seed=0, lengths=(12, 9), audio=((3, 8), (2, 6))):
    """A right-padded batch: per sample the positions [start, stop) carry audio rows; every position's logits
    are read."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, 250, (len(lengths), width), generator=g)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    in_mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, (n, (start, stop)) in enumerate(zip(lengths, audio)):
        attention[b, :n] = 1
        in_mask[b, start:stop] = True
    codes = torch.randint(0, V, (int(in_mask.sum()), K), generator=g)
    return {"input_ids": ids, "attention_mask": attention, "audio_in_mask": in_mask, "audio_in_codes": codes}


# ---------------------------------------------------------------- the directory and the strict loader


def test_autoconfig_reads_the_directory_without_remote_code(tiny_dir):
    from transformers import AutoConfig

    from higgs_ds.models.v3.modeling import HiggsTTS3Config, register_v3

    register_v3()
    register_v3()  # idempotent
    config = AutoConfig.from_pretrained(str(tiny_dir))
    assert type(config) is HiggsTTS3Config and (config.num_codebooks, config.codebook_size) == (K, V)
    assert config.text_config.rope_parameters["rope_theta"] == 1e6


def _weights_only_dir(tiny_dir, dest, tensors):
    """A directory with tiny_dir's config and the given tensors in model.safetensors (no index)."""
    from safetensors.torch import save_file

    dest.mkdir()
    shutil.copy(tiny_dir / "config.json", dest / "config.json")
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_the_weights_alone_load(tiny_dir, model, tmp_path):
    """Codec and tied copies are allowed, not required (a SWIFT checkpoint has neither)."""
    from higgs_ds.models.v3.checkpoint import load_v3_model

    folder = _weights_only_dir(tiny_dir, tmp_path / "plain", dict(model.state_dict()))
    assert torch.equal(load_v3_model(folder).fused.weight, model.fused.weight)


@pytest.mark.parametrize(
    "audio",
    [{"tie_word_embeddings": False}, {"encoder_type": "whisper"}, {"num_codebooks": 9}, {"vocab_size": 1024}],
)
def test_an_audio_geometry_other_than_the_tts_one_is_refused(tiny_dir, tmp_path, audio):
    from higgs_ds.errors import UserError
    from higgs_ds.models.v3.checkpoint import load_v3_model

    folder = tmp_path / "other"
    folder.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config["audio_encoder_config"].update(audio)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"{folder}/config.json.*{next(iter(audio))}"):
        load_v3_model(folder)


# ---------------------------------------------------------------- the forward math, checked independently


def explicit_embeddings(model, batch):
    """Text rows by indexing the text table; each audio row sum_c table[c * 1026 + code_c], by a loop."""
    text_w, table = model.tied.embedding.text_embedding.weight, model.fused.weight
    ids, mask, codes = batch["input_ids"], batch["audio_in_mask"], batch["audio_in_codes"]
    out = torch.stack([torch.stack([text_w[int(i)] for i in row]) for row in ids])
    positions = mask.nonzero().tolist()  # row-major, the order of audio_in_codes
    for (b, s), row in zip(positions, codes.tolist()):
        out[b, s] = sum(table[c * V + code] for c, code in enumerate(row))
    return out


def test_audio_positions_are_replaced_by_the_summed_codebook_vectors(model):
    batch = a_batch()
    with torch.no_grad():
        got = model.embed(batch["input_ids"], batch["audio_in_codes"], batch["audio_in_mask"])
        expected = explicit_embeddings(model, batch)
        text_only = model.embed(batch["input_ids"])
    assert torch.allclose(got, expected, atol=1e-6)
    mask = batch["audio_in_mask"]
    assert not torch.allclose(got[mask], expected[mask] + text_only[mask], atol=1e-3)  # replaced, not added
    assert torch.equal(got[~mask], text_only[~mask])


def test_audio_logits_are_the_hidden_state_times_the_table(model):
    batch = a_batch()
    out_mask = batch["attention_mask"].bool() & torch.rand(batch["attention_mask"].shape).gt(0.3)
    with torch.no_grad():
        hidden = model.body(inputs_embeds=explicit_embeddings(model, batch), attention_mask=batch["attention_mask"])
        out = model(**batch, audio_out_mask=out_mask)
    table = model.fused.weight
    rows = [hidden.last_hidden_state[b, s] for b, s in out_mask.nonzero().tolist()]
    expected = torch.stack([torch.stack([table[c * V : (c + 1) * V] @ h for c in range(K)]) for h in rows])
    assert out.audio_logits.shape == (int(out_mask.sum()), K, V)
    assert torch.allclose(out.audio_logits, expected, atol=1e-5)


def test_gradients_reach_both_tables(model):
    trained = copy.deepcopy(model).train()
    batch = a_batch()
    trained(**batch).audio_logits.square().mean().backward()
    text_grad = trained.tied.embedding.text_embedding.weight.grad
    table_grad = trained.fused.weight.grad
    used_text = batch["input_ids"][~batch["audio_in_mask"]].unique()
    assert text_grad[used_text].abs().sum(-1).gt(0).all()
    # rows only the input side touches get gradient (the head alone gives every row some)
    assert table_grad.abs().sum() > 0 and trained.body.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_padded_batch_equals_each_sample_alone(model):
    batch = a_batch()
    with torch.no_grad():
        full = model(**batch).audio_logits
        for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            mask = batch["audio_in_mask"][b : b + 1, :n]
            before = int(batch["audio_in_mask"][:b].sum())
            alone = model(
                batch["input_ids"][b : b + 1, :n],
                audio_in_codes=batch["audio_in_codes"][before : before + int(mask.sum())],
                audio_in_mask=mask,
            ).audio_logits
            assert torch.allclose(full[b, :n], alone[0], atol=1e-5)


def test_kv_cache_step_by_step_equals_the_full_forward(model):
    batch = a_batch(lengths=(12,), audio=((3, 9),))
    ids, mask, codes = batch["input_ids"], batch["audio_in_mask"], batch["audio_in_codes"]
    with torch.no_grad():
        full = model(ids, audio_in_codes=codes, audio_in_mask=mask).audio_logits[0]
        prefix = 2
        step = model(ids[:, :prefix], use_cache=True)
        cache, steps, row = step.past_key_values, [step.audio_logits[0]], 0
        for s in range(prefix, ids.shape[1]):
            audio = bool(mask[0, s])  # one position: a text id, or one delayed row
            step = model(
                ids[:, s : s + 1],
                audio_in_codes=codes[row : row + 1] if audio else None,
                audio_in_mask=mask[:, s : s + 1] if audio else None,
                past_key_values=cache,
                use_cache=True,
            )
            row += audio
            cache = step.past_key_values
            steps.append(step.audio_logits[0])
    assert cache.get_seq_length() == ids.shape[1]
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    batch = a_batch()
    grads = []
    for checkpointing in (False, True):
        trained = copy.deepcopy(model).train()
        if checkpointing:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in trained.body.layers)
        trained(**batch).audio_logits.square().mean().backward()
        grads.append(trained.body.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------- the export and the tie


def train_a_few_steps(net, steps=3):
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    batch = a_batch(seed=1)
    target = torch.randint(0, V, (int(batch["attention_mask"].sum()), K))
    for _ in range(steps):
        logits = net(**batch, audio_out_mask=batch["attention_mask"].bool()).audio_logits
        F.cross_entropy(logits.reshape(-1, V), target.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_tied_in_use(net, table):
    """The embedding side and the head side of `net` both read `table` (the trained tensor)."""
    batch = a_batch(seed=2)
    with torch.no_grad():
        out = net(**batch)
        rows = [sum(table[c * V + code] for c, code in enumerate(row)) for row in batch["audio_in_codes"].tolist()]
        text = net.get_input_embeddings()(batch["input_ids"])
        embeds = text.masked_scatter(batch["audio_in_mask"].unsqueeze(-1), torch.stack(rows))
        base = net.get_base_model() if hasattr(net, "peft_config") else net
        hidden = base.body(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    expected = (hidden.last_hidden_state @ table.T).unflatten(-1, (K, V))
    assert torch.allclose(out.audio_logits, expected, atol=1e-5)


def assert_export_tied(net, tiny_dir, folder, table):
    from higgs_ds.models.v3.checkpoint import save_released_state

    folder.mkdir()
    save_released_state(net.state_dict(), folder, tiny_dir)
    written = file_tensors(folder)
    assert torch.equal(written[TABLE], table) and torch.equal(written["tied.head.modality_heads.0.weight"], table)
    assert torch.equal(written["tied.head.text_head.weight"], written[TEXT])


def test_the_tie_holds_after_training(tiny_dir, model, tmp_path):
    trained = copy.deepcopy(model).train()
    before = model.fused.weight.clone()
    train_a_few_steps(trained)
    table = trained.fused.weight
    assert [p for n, p in trained.named_parameters() if n == TABLE] == [table]  # one parameter, both uses
    assert not torch.allclose(table, before)
    assert_tied_in_use(trained.eval(), table)
    assert_export_tied(trained, tiny_dir, tmp_path / "export", table.detach())
