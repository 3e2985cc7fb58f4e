"""Phi-3-Vision on top of transformers' own Phi-3 decoder and CLIP vision tower.

Module paths equal the official checkpoint's keys, so official safetensors load unchanged:

    model.embed_tokens / model.layers.N.* / model.norm          transformers' Phi3Model
    model.vision_embed_tokens.img_processor.vision_model.*      transformers' CLIPVisionModel
    model.vision_embed_tokens.{glb_GN, sub_GN, img_projection.0, img_projection.2}
    lm_head                                                     untied

Forward: negative ids in ``input_ids`` are image positions. Every image is encoded by CLIP as
(num_crops + 1) tiles, each tile's patch grid is merged 2x2, the tiles are laid out as one HD grid plus a global
view with learnable separators ("sub_glb" order), projected to the text width and written, in order, over the
negative positions of the flattened (batch, seq) ids.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config

try:  # transformers 5.x; an export may also be loaded by 4.4x, which has torch's plain init functions only
    from transformers import initialization as init
except ImportError:
    from torch.nn import init
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3MLP, Phi3Model

from .configuration_phi3_v import Phi3VConfig

# Positions per CLIP forward (16 official tiles of 577): bounds the transient attention memory of large batches
# (16 crops x batch 8 is 136 tiles) while keeping each call large enough to fill a GPU. Small towers (tiny test
# checkpoints) fit a whole batch in one call.
CLIP_CHUNK_POSITIONS = 16 * 577
# Positions per MLP tile under gradient checkpointing: the recomputed MLP of one decoder layer holds its
# (positions x 2*intermediate) activations for one tile at a time instead of for the whole batch.
MLP_TILE_POSITIONS = 2048
_LAYER_TAKES_CAUSAL_MASK = "causal_attention_mask" in inspect.signature(CLIPEncoderLayer.forward).parameters


class CLIPTower(nn.Module):
    """Holds CLIP under the name ``vision_model`` as the official checkpoint does.

    In transformers 5.x ``CLIPVisionModel``'s own keys start at ``embeddings.``; the checkpoint's keys are
    ``img_processor.vision_model.embeddings...``, so this one-child module restores the path.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        clip = CLIPVisionModel(config)
        # transformers 4.x's CLIPVisionModel keeps its layers under its own `vision_model`: take that one.
        self.vision_model = getattr(clip, "vision_model", clip)


class Phi3ImageEmbedding(nn.Module):
    """CLIP features -> 2x2 merge -> HD layout with separators -> MLP projector (spec section 5)."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        vision = config.vision_tower_config()
        dim = config.image_dim_out * 4  # width of one merged 2x2 block of patch features
        self.img_processor = CLIPTower(vision)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.layer_idx = config.vision_layer_idx
        self.crop_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size  # patches per tile side (24 for 336/14)

    def clip_hidden(self, tiles: torch.Tensor) -> torch.Tensor:
        """CLIP's hidden state ``layer_idx`` for (n, 3, S, S) tiles, equal to
        ``clip(tiles, output_hidden_states=True).hidden_states[layer_idx]``: only the layers up to it run (the
        official -2 skips the last one) and no other layer's output is kept."""
        clip = self.img_processor.vision_model
        layers = clip.encoder.layers
        depth = self.layer_idx % (len(layers) + 1)  # hidden_states[k] is the output of the first k layers
        hidden = clip.pre_layrnorm(clip.embeddings(tiles))
        extra = {"causal_attention_mask": None} if _LAYER_TAKES_CAUSAL_MASK else {}  # transformers 4.x
        for layer in layers[:depth]:
            out = layer(hidden, attention_mask=None, **extra)
            hidden = out[0] if isinstance(out, tuple) else out  # 4.x returns a tuple, 5.x the tensor
        return hidden

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) tiles -> merged features (N, g/2, g/2, 4*d): CLIP hidden state ``layer_idx``, 2x2 merged.

        Tiles go through CLIP ``CLIP_CHUNK_POSITIONS`` positions at a time, so a large batch's attention scores
        never all exist at once (the features are the same as for one call).
        """
        weight = self.img_processor.vision_model.embeddings.patch_embedding.weight  # 4.x CLIP has no .device
        flat = tiles.to(device=weight.device, dtype=weight.dtype)
        per_call = max(1, CLIP_CHUNK_POSITIONS // (self.grid * self.grid + 1))  # tiles; +1: the CLS position
        hidden = torch.cat([self.clip_hidden(part) for part in flat.split(per_call)])
        patches = hidden[:, 1:]  # drop CLS: (N, g*g, d), g = self.grid
        half, d = self.grid // 2, patches.shape[-1]
        # (N, g, g, d) -> 2x2 blocks; block (i, j) concatenates patches (2i+dy, 2j+dx) in (dy, dx) row-major order
        blocks = patches.reshape(len(tiles), half, 2, half, 2, d).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(len(tiles), half, half, 4 * d)

    def hd_sequence(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's token sequence: sub-image grid + newlines, glb_GN, global grid + newlines.

        ``merged`` is (tiles, g/2, g/2, dim) with the global view in slot 0 and the rows x cols crops after it.
        """
        half, dim = merged.shape[1], merged.shape[-1]
        newline_glb = self.sub_GN.reshape(1, 1, dim).expand(half, 1, dim)
        glb = torch.cat([merged[0], newline_glb], dim=1).reshape(-1, dim)  # (half * (half + 1), dim)
        # crops side by side, row-major: crop (r, c) covers grid rows r*half.. and columns c*half..
        sub = merged[1 : 1 + rows * cols].reshape(rows, cols, half, half, dim).permute(0, 2, 1, 3, 4)
        sub = sub.reshape(rows * half, cols * half, dim)
        newline_sub = self.sub_GN.reshape(1, 1, dim).expand(rows * half, 1, dim)
        sub = torch.cat([sub, newline_sub], dim=1).reshape(-1, dim)
        return torch.cat([sub, self.glb_GN.reshape(1, dim), glb])

    def crop_grid(self, image_sizes: torch.Tensor, num_crops: int) -> list[tuple[int, int]]:
        """[height, width] of each padded HD image -> (rows, cols) of its crops, checked against the tile slots."""
        grids = []
        for height, width in image_sizes.tolist():
            rows, cols = int(height) // self.crop_size, int(width) // self.crop_size
            if height % self.crop_size or width % self.crop_size or not 0 < rows * cols <= num_crops:
                raise ValueError(
                    f"image_sizes [{height}, {width}] do not fit {num_crops} crops of {self.crop_size} px"
                )
            grids.append((rows, cols))
        return grids

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """(num_images, crops+1, 3, S, S), (num_images, 2) -> projected features (total_tokens, hidden).

        Unused tile slots (beyond each image's ``image_sizes`` grid) are never read.
        """
        if pixel_values.ndim != 5 or pixel_values.shape[-1] != self.crop_size:
            raise ValueError(
                f"pixel_values must be (num_images, num_crops+1, 3, {self.crop_size}, {self.crop_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        if image_sizes is None or len(image_sizes) != len(pixel_values):
            raise ValueError("image_sizes must give [height, width] for every image in pixel_values")
        grids = self.crop_grid(image_sizes, pixel_values.shape[1] - 1)
        # Only the global view and the crops an image uses go through CLIP; the zero padding tiles would be
        # encoded and thrown away (17 tiles per image at 16 crops, of which a 3x4 grid uses 13).
        used = [1 + rows * cols for rows, cols in grids]
        tiles = torch.cat([image[:n] for image, n in zip(pixel_values, used, strict=True)])
        # A frozen tower needs no autograd graph. transformers' enable_input_require_grads (which PEFT calls for
        # gradient checkpointing) marks CLIP's patch embeddings as an input that requires grad, so without this
        # a LoRA run on the language model would keep CLIP's activations and backpropagate through it for nothing.
        clip = self.img_processor
        track = tiles.requires_grad or any(p.requires_grad for p in clip.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and track):
            merged = self.tile_features(tiles)
        merged = merged.split(used)
        sequences = [
            self.hd_sequence(image, rows, cols) for image, (rows, cols) in zip(merged, grids, strict=True)
        ]
        projector = self.img_projection[0]
        features = torch.cat(sequences).to(dtype=projector.weight.dtype)
        return self.drop(self.img_projection(features))


class Phi3VMLP(Phi3MLP):
    """transformers' Phi-3 MLP (same weights, same names) that runs in tiles of positions when gradient
    checkpointing is on in training.

    The MLP is position-wise, so tiles give the same output. Each tile is checkpointed on its own: when the decoder
    layer is recomputed for its backward pass, only one tile's gate/up activations (and LoRA's copies of the
    inputs) exist at a time; for 4 samples at 16 crops that is 2,048 of ~10,000 positions. The price is one more
    forward pass of the MLP per step, paid only by runs that already trade compute for memory.
    """

    gradient_checkpointing = False  # set with the decoder layers' flag by gradient_checkpointing_enable()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        positions = hidden_states.shape[:-1].numel()
        if not (self.gradient_checkpointing and self.training) or positions <= MLP_TILE_POSITIONS:
            return super().forward(hidden_states)
        run = super().forward
        tiles = hidden_states.reshape(positions, hidden_states.shape[-1]).split(MLP_TILE_POSITIONS)
        if torch.is_grad_enabled():
            out = [checkpoint(run, tile, use_reentrant=False) for tile in tiles]
        else:  # the no-grad first pass of a checkpointed layer: tiles bound its transient memory as well
            out = [run(tile) for tile in tiles]
        return torch.cat(out).reshape(*hidden_states.shape[:-1], -1)


def packed_sequence_lengths(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """FlashAttention-2 varlen arguments for one packed row whose position ids restart at 0 for every sample.

    transformers can infer them from ``position_ids`` in every layer; computed once here, the decoder reads them
    from these keyword arguments instead (one host sync per forward, not one per layer). Empty for a batch of
    several rows or a row of one sample.
    """
    if position_ids.ndim != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return {}
    starts = (position_ids[0] == 0).nonzero().flatten()
    if len(starts) < 2 or int(starts[0]) != 0:
        return {}
    total = torch.tensor([position_ids.shape[1]], device=starts.device)
    cu_seq_lens = torch.cat([starts, total]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


class Phi3VModel(Phi3Model):
    """transformers' Phi3Model plus the ``vision_embed_tokens`` child; merges image features into the embeddings."""

    def __init__(self, config: Phi3Config, vision_parent: Phi3VConfig) -> None:
        super().__init__(config)
        for layer in self.layers:
            # The same module, its forward tiled: no new parameters, and no draw from the random generator (a
            # module built here instead would shift every random weight initialised after it).
            layer.mlp.__class__ = Phi3VMLP
        self.vision_embed_tokens = Phi3ImageEmbedding(vision_parent)  # initialised by the owner's post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Standard init, plus the two separators (zeros in the official code; random here so tiny models see them)."""
        super()._init_weights(module)
        if isinstance(module, Phi3ImageEmbedding):
            init.normal_(module.glb_GN, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.sub_GN, mean=0.0, std=self.config.initializer_range)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image features written over the negative ids (never mutates ``input_ids``)."""
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        positions = (input_ids < 0).nonzero(as_tuple=True)  # row-major over (batch, seq)
        num_positions = positions[0].numel()
        if pixel_values is None or len(pixel_values) == 0:
            if num_positions:
                raise ValueError(
                    f"input_ids hold {num_positions} image tokens but no pixel_values were given"
                )
            return embeds
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != num_positions:
            raise ValueError(
                f"image features and image tokens do not match: {len(pixel_values)} image(s) give "
                f"{features.shape[0]} feature tokens but input_ids hold {num_positions} image tokens "
                "(were the prompt and pixel_values made by the same processor settings?)"
            )
        return embeds.index_put(positions, features.to(device=embeds.device, dtype=embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Phi3Model.forward on embeddings that already hold the image features."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds, not neither")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3-Vision causal LM: official key names, eager/SDPA/FA2 attention, KV-cache generation, batches > 1.

    Subclasses transformers' Phi3ForCausalLM to reuse its generation input preparation (which recomputes the
    cache once when the sequence crosses the LongRoPE switch point, as the official code does).
    """

    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    _tied_weights_keys = None  # lm_head is untied in the official checkpoints
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer", "Phi3ImageEmbedding"]
    # Some tools saved the embedding a second time under the vision module (the remote code registers it there).
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False  # the number of image tokens is data dependent
    supports_gradient_checkpointing = True

    def __init__(self, config: Phi3VConfig) -> None:
        # Skip Phi3ForCausalLM.__init__ (it would build a text-only Phi3Model from the Phi-3-V config).
        super(Phi3ForCausalLM, self).__init__(config)
        self.model = Phi3VModel(config.language_model_config(), config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted cross-entropy loss when ``labels`` are given; -100 is ignored).

        Args:
            input_ids: (batch, seq) token ids; negative ids are image positions.
            pixel_values: (num_images, num_crops+1, 3, S, S) for all images of the batch, in id order.
            image_sizes: (num_images, 2) [height, width] of each padded HD image.
            attention_mask: (batch, seq) 1 for tokens, 0 for padding (left or right).
            position_ids: defaults to the cumulative sum of ``attention_mask`` (left padding works). Without an
                attention mask, ids that restart at 0 mark packed sequences: ``(1, total)`` rows of several samples
                attend only within each sample (block-diagonal mask for eager/SDPA, varlen FlashAttention-2).
            logits_mask: (batch, seq) bool; when given, the LM head runs only where it is True and ``logits`` is
                (positions, vocab) in row-major order. Training scores only the answer tokens this way: at 16 crops
                a sample has ~2,500 positions and ~25 labelled ones. Not combined with ``labels``.
        """
        if logits_mask is not None and labels is not None:
            raise ValueError(
                "pass labels or logits_mask, not both (compute the loss from the selected logits)"
            )
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        if attention_mask is None and position_ids is not None and kwargs.get("past_key_values") is None:
            # A possibly packed row. transformers reads sample boundaries from position ids only without a cache,
            # so none is made unless asked for (a packed row is a training input, never a generation prefix).
            use_cache = bool(use_cache)
            if "flash" in self.config._attn_implementation:
                kwargs.update(packed_sequence_lengths(position_ids))  # varlen FlashAttention-2
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_mask is not None:
            hidden = hidden[logits_mask.to(device=hidden.device, dtype=torch.bool)]  # (positions, hidden)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            hidden = hidden[:, keep, :]
        logits = self.lm_head(hidden).float()  # fp32 logits, as the official model returns
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        # Copy the decoder's other outputs by name (the cache field is `cache` or `past_key_values` by version).
        extra = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Pass the images exactly on the steps whose ids still contain image tokens (the prefill, or a recompute)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and bool((step_ids < 0).any()):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_sizes", None)
        return model_inputs
