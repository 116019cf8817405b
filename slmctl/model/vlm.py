"""A vision-language encoder-decoder, as in the paper: image tokens enter the ENCODER.

    image -> [global view + any-resolution tiles] -> tower (patch features, layer -2)
          -> compression and projector per crop (-> d_model)
          -> tiles re-assembled into one map, padding removed, pooled down to the token cap
    prompt "<image>\\nWhat color is the triangle?" -> token embeddings with each <image>
          placeholder replaced by that image's projected tokens -> encoder
    decoder: unchanged; it sees the image only through cross-attention.

A model directory of a vision model is the text model's (`model.safetensors`, `model.json`)
plus `vision.safetensors` (tower, compressor, projector) and `vision.json` (`VisionConfig`,
the image token id); a Hugging Face tower is saved beside it in `vision_tower/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from slmctl.model.anyres import assemble, best_grid, tile_image
from slmctl.model.compress import TokenCompressor, cap
from slmctl.model.vision import VisionConfig, build_tower

PROJECTORS = ("linear", "mlp2x_gelu")
VISION_WEIGHTS, VISION_CONFIG, TOWER_DIR = "vision.safetensors", "vision.json", "vision_tower"


class Projector(nn.Module):
    """Vision features -> d_model: LayerNorm, then one Linear or Linear-GELU-Linear (LLaVA's
    mlp2x_gelu). The norm and an output layer initialised at the scale of the token embeddings
    (`token_std`) make image tokens start as loud as text tokens: raw tower features (a residual
    stream) can be tens of times larger, and then drown the prompt."""

    def __init__(self, kind: str, width: int, d_model: int, token_std: float = 0.02):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"vision.projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
        layers = [nn.LayerNorm(width)]
        layers += [nn.Linear(width, d_model)] if kind == "linear" else [nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model)]
        self.net = nn.Sequential(*layers)
        last = self.net[-1]
        nn.init.normal_(last.weight, std=token_std / last.in_features ** 0.5 * (2.0 if kind == "mlp2x_gelu" else 1.0))
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def crop_images(images: list, cfg: VisionConfig, tile: int) -> tuple[torch.Tensor, list[tuple]]:
    """(crops [N, 3, tile, tile] in [0, 1] of every image: its global view first, then its tiles
    on the grid fitted to it (anyres); the layout: (grid or None, size, number of crops) per image)."""
    crops, layout = [], []
    for image in images:
        if cfg.anyres:
            grid = best_grid(image.size, cfg.grids, tile)
            tiles, global_view = tile_image(image, grid, tile)
            pixels = torch.cat([global_view, tiles])
        else:
            grid, pixels = None, tile_image(image, (1, 1), tile)[1]
        crops.append(pixels)
        layout.append((grid, image.size, pixels.shape[0]))
    return torch.cat(crops), layout


def arrange_images(maps: torch.Tensor, layout: list[tuple], budget: int) -> list[torch.Tensor]:
    """Projected token maps of all crops -> each image's tokens [n, d_model]: its global view's, then
    its re-assembled, un-padded high-resolution map's, pooled to the per-image budget."""
    tokens, start = [], 0
    for grid, size, count in layout:
        own = maps[start:start + count]
        start += count
        parts = [cap(own[0], budget).flatten(0, 1)]
        if grid is not None:
            parts.append(cap(assemble(own[1:], grid, size), max(budget - parts[0].shape[0], 1)).flatten(0, 1))
        tokens.append(torch.cat(parts))
    return tokens


class VisionEncoderDecoderLM(nn.Module):
    def __init__(self, text, vision: VisionConfig, image_token_id: int, pretrained_tower: bool = True):
        super().__init__()
        if not text.config.is_encoder_decoder:
            raise ValueError("add-vision needs an encoder-decoder text model (image tokens enter the encoder)")
        self.text = text
        self.tower = build_tower(vision, pretrained_tower)
        self.vision_config = dataclasses.replace(vision, feature_width=self.tower.width)
        self.compressor = TokenCompressor(vision.compress, vision.compress_factor, self.tower.width)
        self.projector = Projector(vision.projector, self.tower.width, text.config.d_model,
                                   token_std=float(text.embed.weight.detach().float().std()))
        self.image_token_id = image_token_id

    @property
    def config(self):
        return self.text.config

    @property
    def device(self) -> torch.device:
        return self.text.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- images -> tokens ------------------------------------------------------------------

    def image_tokens(self, images: list) -> list[torch.Tensor]:
        """Projected tokens [n_i, d_model] of each PIL image (one tower call for all crops)."""
        if not images:
            return []
        pixels, layout = crop_images(images, self.vision_config, self.tower.image_size)
        maps = self.crop_tokens(pixels.to(self.device, self.tower_dtype))
        return arrange_images(maps, layout, self.vision_config.max_tokens_per_image)

    def crop_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Crops [N, 3, S, S] in [0, 1] -> projected token maps [N, g', g', d_model]
        (tower, compression, projector: the exported vision graph)."""
        if any(p.requires_grad for p in self.tower.parameters()):
            features = self.tower(pixels)
        else:  # a frozen tower: no activations kept for backward
            with torch.no_grad():
                features = self.tower(pixels)
        return self.projector(self.compressor(features.to(self.dtype)))

    @property
    def tower_dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    # -- prompts -> encoder inputs ----------------------------------------------------------

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               image_tokens: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B, S', d_model], attention_mask [B, S']): every row's token embeddings
        with its k-th <image> placeholder replaced by its k-th image's tokens; right-padded."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            places = (ids == self.image_token_id).nonzero().flatten().tolist()
            images = image_tokens[b] if b < len(image_tokens) else []
            if len(places) != len(images):
                raise ValueError(f"prompt {b} has {len(places)} <image> placeholder(s) but {len(images)} image(s)")
            embeds, start = [], 0
            for place, tokens in zip(places, images):
                embeds += [self.text.embed(ids[start:place]), tokens.to(self.dtype)]
                start = place + 1
            embeds.append(self.text.embed(ids[start:]))
            rows.append(torch.cat(embeds))
        width = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
        for b, row in enumerate(rows):
            out[b, :row.shape[0]] = row
            mask[b, :row.shape[0]] = 1
        return out, mask

    def embed_inputs(self, input_ids, attention_mask, images: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        counts = [len(row) for row in images]
        flat = self.image_tokens([image for row in images for image in row])
        grouped, offset = [], 0
        for n in counts:
            grouped.append(flat[offset:offset + n])
            offset += n
        return self.splice(input_ids, attention_mask, grouped)

    # -- training and generation ------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, images=None, decoder_input_ids=None, labels=None):
        embeds, mask = self.embed_inputs(input_ids, attention_mask, images or [[] for _ in range(input_ids.shape[0])])
        return self.text(attention_mask=mask, inputs_embeds=embeds, decoder_input_ids=decoder_input_ids, labels=labels)

    def generate(self, input_ids, attention_mask=None, images=None, **kwargs) -> torch.Tensor:
        """New token ids [B, T_new]; `images[b]` are row b's images, in placeholder order."""
        from slmctl.model.generation import generate

        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                embeds, mask = self.embed_inputs(input_ids, attention_mask, images or [[] for _ in range(input_ids.shape[0])])
                # the generation loop reads only the shape and device of its ids; the session reads the embeddings
                new_tokens = generate(_Prepared(self.text, embeds), mask, attention_mask=mask, **kwargs)
        finally:
            self.train(was_training)
        return new_tokens.clone()


def save_vision_model(model: VisionEncoderDecoderLM, directory: str | Path, tokenizer=None) -> Path:
    """The text model's directory plus vision.safetensors and vision.json (a Hugging Face tower's
    config in vision_tower/, its weights in vision.safetensors); `tokenizer`: a TextTokenizer."""
    from safetensors.torch import save_file

    from slmctl.atomic import atomic_write_text, set_new_file_mode
    from slmctl.integrity import seal
    from slmctl.model.store import save_model

    directory = save_model(model.text, directory, tokenizer)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("text.")}
    temporary = directory / f".{VISION_WEIGHTS}.tmp"
    save_file(state, str(temporary), metadata={"format": "pt", "slmctl": "1"})
    set_new_file_mode(temporary)  # safetensors leaves 0600
    temporary.replace(directory / VISION_WEIGHTS)
    config = model.vision_config
    if config.tower != "vit":
        model.tower.model.config.save_pretrained(str(directory / TOWER_DIR))
        config = dataclasses.replace(config, path=TOWER_DIR)
    record = {"vision": config.to_dict(), "image_token_id": model.image_token_id}
    atomic_write_text(directory / VISION_CONFIG, json.dumps(record, indent=2) + "\n")
    seal(directory)  # again: checksums.json must cover the vision files too
    return directory


def is_vision_dir(directory: Path) -> bool:
    """Does a model directory hold a vision-language model (slmctl add-vision)?"""
    return (Path(directory) / VISION_CONFIG).is_file()


def attach_saved_vision(text, directory: Path) -> VisionEncoderDecoderLM:
    """The vision model saved in `directory` around its already loaded text model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from slmctl.errors import CheckpointError

    try:
        record = json.loads((directory / VISION_CONFIG).read_text())
        config = VisionConfig.from_dict(record["vision"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / VISION_CONFIG}: {e}") from None
    if config.tower != "vit":
        config = dataclasses.replace(config, path=str(directory / config.path))
    model = VisionEncoderDecoderLM(text, config, record["image_token_id"], pretrained_tower=False)
    try:
        state = load_file(str(directory / VISION_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / VISION_WEIGHTS} is unreadable (truncated or corrupt?): {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text.")]
    if missing or unexpected:
        raise CheckpointError(f"{directory / VISION_WEIGHTS} does not fit its vision.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.to(text.device, text.dtype)


class _Prepared:
    """The text model with its encoder input already embedded (for `generate`)."""

    training = False

    def __init__(self, text, embeds: torch.Tensor):
        self.text, self.embeds, self.config = text, embeds, text.config

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def start_decoding(self, input_ids, attention_mask, max_new_tokens):
        return self.text.start_decoding(None, attention_mask, max_new_tokens, inputs_embeds=self.embeds)
