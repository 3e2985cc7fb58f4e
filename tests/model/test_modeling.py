"""Phi3VForCausalLM: official key names and sizes, the image merge, batching, generation, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import phivision.model  # noqa: F401  (registers phi3_v with the Auto* classes)
from phivision.model import Phi3VConfig, Phi3VForCausalLM
from phivision.tiny import tiny_config

DATA = Path(__file__).parent / "data"
OFFICIAL = ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"]
CROP = 56  # tiny CLIP tile size; 4x4 patches -> 2x2 merged tokens per tile
MERGED = 2
NUM_CROPS = 4


# ---------------------------------------------------------------------------------------------- helpers


def image_tokens(rows: int, cols: int) -> int:
    """Feature tokens of one image with a rows x cols crop grid (sub grid + newlines, glb_GN, global + newlines)."""
    return rows * MERGED * (cols * MERGED + 1) + 1 + MERGED * (MERGED + 1)


def make_model(attn: str = "sdpa", seed: int = 0) -> Phi3VForCausalLM:
    config = tiny_config(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return Phi3VForCausalLM(config).eval()


def make_example(
    grid: tuple[int, int] | None,
    prefix: int,
    suffix: int,
    seed: int,
    image_number: int = 1,
    num_crops: int = NUM_CROPS,
):
    """Ids (with -k image tokens between text), and the image's tiles and size, all random but deterministic."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 96, (prefix + suffix,), generator=gen)
    if grid is None:
        return text, None, None
    rows, cols = grid
    ids = torch.cat([text[:prefix], torch.full((image_tokens(rows, cols),), -image_number), text[prefix:]])
    tiles = torch.zeros(num_crops + 1, 3, CROP, CROP)
    tiles[: 1 + rows * cols] = torch.randn(1 + rows * cols, 3, CROP, CROP, generator=gen)
    return ids, tiles, torch.tensor([rows * CROP, cols * CROP])


def batch(examples, side: str = "right", pad: int = 3):
    """Pad 1-D ids to a batch with an attention mask; stack the images of all rows in order."""
    length = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), length), pad)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, (ids, _, _) in enumerate(examples):
        span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        input_ids[row, span] = ids
        mask[row, span] = 1
    tiles = [t for _, t, _ in examples if t is not None]
    sizes = [s for _, _, s in examples if s is not None]
    pixel_values = torch.stack(tiles) if tiles else None
    image_sizes = torch.stack(sizes) if sizes else None
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }


# ------------------------------------------------------------------------------- official checkpoints


def official_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint's key -> shape table (spec 2.2), written out from the config's numbers."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    table = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        table[p + "input_layernorm.weight"] = (hidden,)
        table[p + "post_attention_layernorm.weight"] = (hidden,)
        table[p + "self_attn.qkv_proj.weight"] = (3 * hidden, hidden)
        table[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        table[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        table[p + "mlp.down_proj.weight"] = (hidden, inter)
    v = "model.vision_embed_tokens.img_processor.vision_model."
    table[v + "embeddings.class_embedding"] = (1024,)
    table[v + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    table[v + "embeddings.position_embedding.weight"] = (577, 1024)
    for norm in ("pre_layrnorm", "post_layernorm"):
        table[v + norm + ".weight"] = (1024,)
        table[v + norm + ".bias"] = (1024,)
    for j in range(24):
        p = f"{v}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table[p + f"self_attn.{proj}.weight"] = (1024, 1024)
            table[p + f"self_attn.{proj}.bias"] = (1024,)
        for norm in ("layer_norm1", "layer_norm2"):
            table[p + norm + ".weight"] = (1024,)
            table[p + norm + ".bias"] = (1024,)
        table[p + "mlp.fc1.weight"] = (4096, 1024)
        table[p + "mlp.fc1.bias"] = (4096,)
        table[p + "mlp.fc2.weight"] = (1024, 4096)
        table[p + "mlp.fc2.bias"] = (1024,)
    e = "model.vision_embed_tokens."
    table[e + "glb_GN"] = (1, 1, 4096)
    table[e + "sub_GN"] = (1, 1, 1, 4096)
    table[e + "img_projection.0.weight"] = (hidden, 4096)
    table[e + "img_projection.0.bias"] = (hidden,)
    table[e + "img_projection.2.weight"] = (hidden, hidden)
    table[e + "img_projection.2.bias"] = (hidden,)
    return table


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_config_builds_the_checkpoint_layout_on_meta(name):
    official = json.loads((DATA / f"{name}.config.json").read_text())
    config = Phi3VConfig.from_dict(dict(official))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is Phi3VForCausalLM
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == official_shapes(official)
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied, registered once


# ---------------------------------------------------------------------------------------- the forward


def test_image_features_follow_the_hd_layout():
    """Separators sit where the spec puts them: sub_GN ends every grid row, glb_GN between sub and global parts."""
    model = make_model()
    embedding = model.model.vision_embed_tokens
    _, tiles, size = make_example((2, 3), 0, 0, seed=1, num_crops=6)
    assert embedding.crop_grid(size[None], 6) == [(2, 3)]  # image_sizes [112, 168] -> 2 rows, 3 columns
    with torch.no_grad():
        merged = embedding.tile_features(tiles)  # (tiles, 2, 2, 4d)
        seq = embedding.hd_sequence(merged, 2, 3)
    assert seq.shape == (image_tokens(2, 3), 4 * 64)
    sub_width = 3 * MERGED + 1
    sub = seq[: 2 * MERGED * sub_width].reshape(2 * MERGED, sub_width, -1)
    torch.testing.assert_close(sub[:, -1], embedding.sub_GN.reshape(1, -1).expand(2 * MERGED, -1))
    torch.testing.assert_close(seq[2 * MERGED * sub_width], embedding.glb_GN.reshape(-1))
    glb = seq[2 * MERGED * sub_width + 1 :].reshape(MERGED, MERGED + 1, -1)
    torch.testing.assert_close(glb[:, :MERGED], merged[0])
    # the crop at grid row 1, column 2 (slot 1 + 1*3 + 2) lands at sub-grid rows 2-3, columns 4-5
    torch.testing.assert_close(sub[2:4, 4:6], merged[1 + 5])


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (3, 1), (2, 2)])
def test_hd_layout_matches_a_token_by_token_reference(grid):
    """Spec 5.3 written as plain loops: every sub-grid row of crops, then sub_GN; glb_GN; global rows + sub_GN."""
    model = make_model()
    embedding = model.model.vision_embed_tokens
    rows, cols = grid
    merged = torch.randn(1 + rows * cols, MERGED, MERGED, 4 * 64)
    newline, separator = embedding.sub_GN.reshape(-1), embedding.glb_GN.reshape(-1)
    expected = []
    for r in range(rows * MERGED):
        for c in range(cols * MERGED):
            crop = (r // MERGED) * cols + c // MERGED
            expected.append(merged[1 + crop, r % MERGED, c % MERGED])
        expected.append(newline)
    expected.append(separator)
    for r in range(MERGED):
        expected.extend(merged[0, r, c] for c in range(MERGED))
        expected.append(newline)
    with torch.no_grad():
        got = embedding.hd_sequence(merged, rows, cols)
    assert len(expected) == image_tokens(rows, cols)
    assert torch.equal(got, torch.stack(expected))


def test_2x2_merge_concatenates_patches_row_major():
    model = make_model()
    embedding = model.model.vision_embed_tokens
    _, tiles, _ = make_example((1, 1), 0, 0, seed=2)
    with torch.no_grad():
        hidden = embedding.img_processor.vision_model(
            pixel_values=tiles, output_hidden_states=True
        ).hidden_states[-2]
        merged = embedding.tile_features(tiles)
    patches = hidden[:, 1:].reshape(len(tiles), 4, 4, -1)  # 4x4 patch grid, CLS dropped
    block = torch.cat([patches[:, 2, 0], patches[:, 2, 1], patches[:, 3, 0], patches[:, 3, 1]], dim=-1)
    torch.testing.assert_close(merged[:, 1, 0], block)


@pytest.mark.parametrize("layer_idx", [-2, -1, 1])
def test_clip_runs_only_the_layers_it_uses_in_chunks_with_the_same_features(layer_idx, monkeypatch):
    from phivision.model import modeling_phi3_v

    model = make_model()
    embedding = model.model.vision_embed_tokens
    per_tile = embedding.grid * embedding.grid + 1
    monkeypatch.setattr(modeling_phi3_v, "CLIP_CHUNK_POSITIONS", 3 * per_tile)  # 7 tiles: calls of 3, 3 and 1
    embedding.layer_idx = layer_idx
    clip = embedding.img_processor.vision_model
    tiles = torch.randn(7, 3, embedding.crop_size, embedding.crop_size)
    ran = []
    hooks = [layer.register_forward_hook(lambda *_: ran.append(1)) for layer in clip.encoder.layers]
    got = embedding.clip_hidden(tiles)
    for hook in hooks:
        hook.remove()
    expected = clip(pixel_values=tiles, output_hidden_states=True).hidden_states[layer_idx]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(ran) == layer_idx % (len(clip.encoder.layers) + 1)  # never the layers after the one used
    one_by_one = torch.cat([embedding.clip_hidden(tiles[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(one_by_one, expected, rtol=1e-5, atol=1e-5)
    chunked = embedding.tile_features(tiles)
    monkeypatch.setattr(modeling_phi3_v, "CLIP_CHUNK_POSITIONS", 10**9)
    torch.testing.assert_close(chunked, embedding.tile_features(tiles), rtol=1e-5, atol=1e-5)
    chunked.sum().backward()  # chunks keep the graph: CLIP's weights get gradients
    assert clip.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_with_different_grids_matches_single_runs(attn):
    model = make_model(attn)
    examples = [
        make_example((1, 1), 3, 4, seed=10),
        make_example((2, 2), 5, 2, seed=11),
        make_example(None, 6, 0, seed=12),  # text only
    ]
    with torch.no_grad():
        together = model(**batch(examples, "right")).logits
        for row, example in enumerate(examples):
            alone = model(**batch([example])).logits[0]
            n = len(example[0])
            assert (together[row, :n] - alone).abs().max() < 1e-4


def test_left_padding_matches_single_runs():
    model = make_model()
    examples = [make_example((1, 2), 2, 3, seed=20), make_example((2, 1), 4, 6, seed=21)]
    seen = []
    model.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1])), with_kwargs=True
    )
    inputs = batch(examples, "left")
    with torch.no_grad():
        together = model(**inputs).logits
    # positions count real tokens only, so a left-padded row sees the positions it has alone
    expected = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(seen[0], expected)
    with torch.no_grad():
        for row, example in enumerate(examples):
            alone = model(**batch([example])).logits[0]
            assert (together[row, -len(example[0]) :] - alone).abs().max() < 1e-4


def test_text_only_batch_without_pixel_values():
    model = make_model()
    inputs = batch([make_example(None, 5, 0, seed=30), make_example(None, 3, 0, seed=31)])
    assert inputs["pixel_values"] is None
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, 5, 96)
    assert torch.isfinite(logits).all()


def test_bfloat16_model_takes_float32_pixels_and_returns_float32_logits():
    model = make_model().to(torch.bfloat16)
    inputs = batch([make_example((1, 2), 2, 2, seed=45)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_input_ids_are_not_mutated_and_repeated_forwards_agree():
    model = make_model()
    inputs = batch([make_example((1, 1), 2, 2, seed=40)])
    ids_before = inputs["input_ids"].clone()
    with torch.no_grad():
        first = model(**inputs).logits
        second = model(**inputs).logits
    assert torch.equal(inputs["input_ids"], ids_before)
    assert torch.equal(first, second)


def test_image_token_count_mismatch_raises():
    model = make_model()
    inputs = batch([make_example((1, 1), 2, 2, seed=50)])
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # drop one text token: still fine
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    model(**inputs)
    inputs["input_ids"] = torch.cat(
        [inputs["input_ids"], torch.tensor([[-1]])], dim=1
    )  # one image token too many
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(**inputs)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("size", [[56, 100], [112, 168], [0, 56]])
def test_image_sizes_that_do_not_fit_the_tiles_raise(size):
    model = make_model()
    ids, tiles, _ = make_example((1, 1), 2, 2, seed=55)
    with pytest.raises(ValueError, match=r"image_sizes \[.*\] do not fit 4 crops"):
        model(input_ids=ids[None], pixel_values=tiles[None], image_sizes=torch.tensor([size]))


def test_labels_give_shifted_cross_entropy_ignoring_minus_100():
    model = make_model()
    inputs = batch([make_example((1, 1), 3, 5, seed=60)])
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    labels[:, :4] = -100
    out = model(**inputs, labels=labels)
    logits = out.logits.float()[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# ------------------------------------------------------------------------- performance paths (issue 9)


def features_of_every_tile(embedding, pixel_values, image_sizes):
    """The image features as computed before padding tiles were skipped: every tile slot goes through CLIP."""
    num_images, slots = pixel_values.shape[:2]
    merged = embedding.tile_features(pixel_values.flatten(0, 1)).unflatten(0, (num_images, slots))
    grids = embedding.crop_grid(image_sizes, slots - 1)
    sequences = [embedding.hd_sequence(m, rows, cols) for m, (rows, cols) in zip(merged, grids, strict=True)]
    return embedding.img_projection(torch.cat(sequences))


def test_clip_encodes_only_the_tiles_each_image_uses(monkeypatch):
    from phivision.model import modeling_phi3_v

    # one CLIP call per forward: its tiles can be counted
    monkeypatch.setattr(modeling_phi3_v, "CLIP_CHUNK_POSITIONS", 10**9)
    model = make_model()
    embedding = model.model.vision_embed_tokens
    grids = [(1, 1), (2, 2), (1, 3), (3, 1), (1, 2)]
    examples = [make_example(grid, 0, 0, seed=100 + i) for i, grid in enumerate(grids)]
    pixel_values = torch.stack([tiles for _, tiles, _ in examples])
    image_sizes = torch.stack([size for _, _, size in examples])
    tiles_seen = []
    embedding.img_processor.vision_model.embeddings.register_forward_hook(
        lambda module, args, out: tiles_seen.append(len(args[0]))
    )
    poisoned = pixel_values.clone()
    for image, (rows, cols) in zip(poisoned, grids, strict=True):
        image[1 + rows * cols :] = float("nan")  # padding slots: never read, so NaN cannot reach a feature
    with torch.no_grad():
        features = embedding(poisoned, image_sizes)
        reference = features_of_every_tile(embedding, pixel_values, image_sizes)
    assert tiles_seen == [sum(1 + r * c for r, c in grids), len(grids) * (NUM_CROPS + 1)]  # 18 tiles, not 25
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, reference)


def test_logits_mask_computes_only_the_selected_positions():
    model = make_model()
    inputs = batch([make_example((1, 2), 3, 5, seed=120), make_example((1, 1), 2, 3, seed=121)])
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, -4:-1] = True
    mask[1, 5:7] = True
    with torch.no_grad():
        selected = model(**inputs, logits_mask=mask).logits
        full = model(**inputs).logits
    assert selected.shape == (5, 96)
    torch.testing.assert_close(selected, full[mask])
    with pytest.raises(ValueError, match="labels or logits_mask"):
        model(**inputs, logits_mask=mask, labels=inputs["input_ids"])


def pack(examples):
    """Rows concatenated into one row, position ids restarting at 0 for each, no attention mask."""
    padded = batch(examples)
    return {
        "input_ids": torch.cat([ids for ids, _, _ in examples])[None],
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _, _ in examples])[None],
        "pixel_values": padded["pixel_values"],
        "image_sizes": padded["image_sizes"],
    }


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_row_matches_the_padded_batch(attn):
    """Attention stays inside each packed sample and each image's features land on its own sample."""
    model = make_model(attn)
    examples = [
        make_example((1, 1), 3, 4, seed=130),
        make_example((2, 2), 5, 2, seed=131),
        make_example(None, 6, 0, seed=132),  # text only
        make_example((1, 3), 2, 5, seed=133),
    ]
    with torch.no_grad():
        padded = model(**batch(examples)).logits
        packed = model(**pack(examples)).logits[0]
    start = 0
    for row, (ids, _, _) in enumerate(examples):
        torch.testing.assert_close(packed[start : start + len(ids)], padded[row, : len(ids)])
        start += len(ids)
    # the same row without restarting positions would attend across samples: the check above can fail
    crossing = pack(examples)
    crossing["position_ids"] = torch.arange(start)[None]
    with torch.no_grad():
        mixed = model(**crossing).logits[0]
    assert not torch.allclose(mixed[len(examples[0][0]) :], packed[len(examples[0][0]) :], atol=1e-4)


def test_packed_sequence_lengths_for_varlen_flash_attention():
    from phivision.model.modeling_phi3_v import packed_sequence_lengths

    lengths = packed_sequence_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert lengths["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and lengths["cu_seq_lens_q"].dtype == torch.int32
    assert lengths["max_length_q"] == lengths["max_length_k"] == 4
    assert packed_sequence_lengths(torch.arange(6)[None]) == {}  # one sample: plain causal attention
    assert packed_sequence_lengths(torch.tensor([[0, 1, 0], [0, 1, 2]])) == {}  # batches of rows: padded path


# ----------------------------------------------------------------------------------------- generation


def greedy(model, inputs, use_cache: bool) -> torch.Tensor:
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=3, eos_token_id=None
    )
    return out[:, inputs["input_ids"].shape[1] :]


def test_greedy_generation_same_with_and_without_cache():
    model = make_model()
    single = batch([make_example((2, 1), 3, 3, seed=70)])
    assert torch.equal(greedy(model, single, True), greedy(model, single, False))
    pair = batch([make_example((1, 2), 2, 3, seed=71), make_example((1, 1), 6, 4, seed=72)], "left")
    cached = greedy(model, pair, True)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, greedy(model, pair, False))
    # the left-padded row starts exactly as the row alone (positions come from the attention mask)
    alone = greedy(model, batch([make_example((1, 2), 2, 3, seed=71)]), True)
    assert torch.equal(cached[0, :2], alone[0, :2])


def test_generation_passes_images_only_while_ids_hold_image_tokens():
    model = make_model()
    inputs = batch([make_example((1, 1), 2, 2, seed=80)])
    first = model.prepare_inputs_for_generation(**inputs, use_cache=True, is_first_iteration=True)
    assert first["pixel_values"] is inputs["pixel_values"]
    later = model.prepare_inputs_for_generation(
        torch.tensor([[5]]),
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
        use_cache=True,
    )
    assert "pixel_values" not in later and "image_sizes" not in later


# ------------------------------------------------------------------------------------------- training


def test_lora_with_gradient_checkpointing_learns_one_batch():
    peft = pytest.importorskip("peft")
    model = make_model()
    # transformers >= 5.2x names it activation checkpointing; both default to non-reentrant checkpoints
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    inputs = batch([make_example((1, 2), 3, 6, seed=90), make_example((1, 1), 2, 4, seed=91)])
    labels = (
        inputs["input_ids"]
        .masked_fill(inputs["attention_mask"] == 0, -100)
        .masked_fill(inputs["input_ids"] < 0, -100)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------ saving / loading


def test_from_pretrained_loads_shards_and_drops_a_duplicate_wte(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    loaded, info = Phi3VForCausalLM.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not any(info.values()), info
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # a checkpoint written by tools that also stored the embedding under the vision module
    model.save_pretrained(tmp_path / "wte")
    weights = load_file(tmp_path / "wte" / "model.safetensors")
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "wte" / "model.safetensors", metadata={"format": "pt"})
    loaded, info = Phi3VForCausalLM.from_pretrained(tmp_path / "wte", output_loading_info=True)
    assert not info["missing_keys"]
    assert "model.vision_embed_tokens.wte.weight" not in loaded.state_dict()
    loaded.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(model.state_dict())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_decoder_and_clip(tmp_path, attn):
    make_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn)
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    assert model.config._attn_implementation == attn
    assert model.model.config._attn_implementation == attn
    assert clip.config._attn_implementation == attn
