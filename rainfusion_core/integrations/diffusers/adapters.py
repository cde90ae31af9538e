"""Per model family: only what differs between diffusers' transformers.

An adapter says how to read the latent grid from the transformer's input,
where text tokens sit in the joint sequence and which of them are real, which
attention modules are self- or joint attention, and how their processors call
attention. Everything else (the processors themselves, with their projections,
norms and rotary embeddings) is diffusers' own code, run unchanged; RainFusion
replaces only the attention call inside it (see ``routing.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...layout import TEXT_POSITIONS


@dataclass(frozen=True)
class CallSite:
    """How a processor calls attention: the global name it calls through, and its tensor layout.

    ``"dispatch_attention_fn"``: diffusers' dispatcher, ``[B, S, H, D]``;
    ``"F"``: ``torch.nn.functional.scaled_dot_product_attention``, ``[B, H, S, D]``.
    """

    name: str
    tensor_layout: str


DISPATCH = CallSite("dispatch_attention_fn", "BSND")
SDPA = CallSite("F", "BNSD")


@dataclass(frozen=True)
class ModelAdapter:
    """What RainFusion needs to know about one family of diffusers transformers.

    The built-in families have one each (:data:`ADAPTERS`); for a transformer no adapter
    names, build one and pass it as ``apply_rainfusion(model, adapter=...)``::

        ModelAdapter(family="MyDiT", attention_modules=[("blocks", "attn1")],
                     grid=lambda transformer, args: (args["hidden_states"].shape[2],
                                                     args["hidden_states"].shape[3] // 2,
                                                     args["hidden_states"].shape[4] // 2))

    Attributes:
        family: the name users know (``"Wan"``, ``"HunyuanVideo"``...).
        attention_modules: ``transformer -> [(name, attention module)]``, the self- or
            joint-attention modules in the order the model runs them (``layers=`` indexes
            this list); or, as a shorthand, ``[(block list attribute, attention attribute), ...]``
            such as ``[("blocks", "attn1")]``.
        grid: ``(transformer, forward arguments by name) -> (frames, height, width)`` of
            the latent token grid (after patching), in frame-major raster order: the video
            tokens of the attention's sequence must be in that order.
        classes: transformer class names this adapter serves (the built-in table looks
            models up by them; a user's adapter may leave it empty).
        processors: processor class name -> how it calls attention; any other
            processor on those modules is refused at ``apply_rainfusion``. ``None``: any
            processor whose ``__call__`` calls ``dispatch_attention_fn`` (``[B, S, H, D]``)
            or ``F.scaled_dot_product_attention`` (``[B, H, S, D]``), told apart by the names
            it calls.
        text_position: where text tokens sit in the joint sequence (``"head"``, ``"tail"``),
            ``None`` when the self-attention sees video tokens only. Every token that is not
            a video token counts as text: its rows and columns stay dense.
        text_valid: ``(transformer, arguments) -> [B, T] bool`` of real text tokens, or
            ``None`` when all are real; the same rule the model uses to build its mask.
            Set only for models that mask padded text; their layers' attention mask is
            then that padding, and no other mask is accepted.
        timestep: the forward argument holding the timestep.
        grid_reads_host: ``grid`` reads tensor values (not only shapes), a host
            synchronisation per transformer call.
    """

    family: str
    attention_modules: Callable | tuple
    grid: Callable
    classes: tuple[str, ...] = ()
    processors: dict | None = None
    text_position: str | None = None
    text_valid: Callable | None = None
    timestep: str = "timestep"
    grid_reads_host: bool = False

    def __post_init__(self):
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"ModelAdapter.family must be a non-empty string, got {self.family!r}")
        if not callable(self.attention_modules):
            pairs = tuple(self.attention_modules) if isinstance(self.attention_modules, (list, tuple)) else ()
            if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                    for p in pairs):
                raise ValueError("ModelAdapter.attention_modules must be a function (transformer -> [(name, "
                                 "module)]) or pairs of (block list attribute, attention attribute) such as "
                                 f"[('blocks', 'attn1')], got {self.attention_modules!r}")
            object.__setattr__(self, "attention_modules", _modules(*map(tuple, pairs)))
        if not callable(self.grid):
            raise ValueError("ModelAdapter.grid must be a function (transformer, forward arguments by name) -> "
                             f"(frames, height, width), got {self.grid!r}")
        if self.text_position is not None and self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"ModelAdapter.text_position must be None or one of {TEXT_POSITIONS}")
        if self.text_valid is not None and self.text_position is None:
            raise ValueError("ModelAdapter.text_valid needs a text_position (where the text tokens are)")

    def call_site(self, processor) -> CallSite | None:
        """How ``processor`` calls attention, if this adapter routes it; ``None`` if not."""
        if self.processors is not None:
            return self.processors.get(type(processor).__name__)
        names = getattr(getattr(type(processor).__call__, "__code__", None), "co_names", ())
        if DISPATCH.name in names:
            return DISPATCH
        if SDPA.name in names and "scaled_dot_product_attention" in names:
            return SDPA
        return None

    def routed_processors(self) -> str:
        """The processors this adapter routes, in words (for errors)."""
        if self.processors is not None:
            return ", ".join(self.processors)
        return "any processor that calls dispatch_attention_fn or F.scaled_dot_product_attention"


# --------------------------------------------------------------------------- grids
def _grid_bcfhw(transformer, arguments, frames_first: bool = False):
    """Grid of a ``[B, C, F, H, W]`` latent (``[B, F, C, H, W]`` with ``frames_first``) and the config's patch."""
    shape = arguments["hidden_states"].shape
    frames, height, width = (shape[1], shape[3], shape[4]) if frames_first else shape[2:]
    patch = transformer.config.patch_size
    if isinstance(patch, (tuple, list)):
        p_t, p_h, p_w = patch
    else:
        p_t, p_h, p_w = getattr(transformer.config, "patch_size_t", None) or 1, patch, patch
    return frames // p_t, height // p_h, width // p_w


def _grid_ltx(transformer, arguments):
    """LTX-Video and LTX-2 take patched tokens and the latent size as arguments."""
    frames, height, width = (arguments[name] for name in ("num_frames", "height", "width"))
    if None in (frames, height, width):
        raise ValueError("RainFusion needs num_frames, height and width in the LTX transformer call")
    tokens = arguments["hidden_states"].shape[1]
    if frames * height * width != tokens:
        raise ValueError(f"the LTX call has {tokens} video tokens but num_frames x height x width = "
                         f"{frames}x{height}x{width}")
    return frames, height, width


def _grid_flux(transformer, arguments):
    """Flux packs the image into tokens; its ``img_ids`` rows are ``(0, row, column)`` (one host read)."""
    ids = arguments["img_ids"]
    if ids is None:
        raise ValueError("RainFusion needs img_ids in the Flux transformer call to know the image grid")
    ids = ids.reshape(-1, ids.shape[-1]).cpu()
    if bool((ids[:, 0] != 0).any()):
        raise ValueError("this Flux call joins several images (img_ids with a non-zero first column, as Kontext "
                         "does); RainFusion supports one image grid")
    height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    tokens = arguments["hidden_states"].shape[1]
    if height * width != tokens:
        raise ValueError(f"the Flux call has {tokens} image tokens but img_ids span a {height}x{width} grid")
    return 1, height, width


def _grid_qwen(transformer, arguments):
    """Qwen-Image passes each batch item's grid in ``img_shapes`` (``[[(frames, height, width)], ...]``)."""
    shapes = arguments.get("img_shapes")
    if not shapes:
        raise ValueError("RainFusion needs img_shapes in the Qwen-Image transformer call")
    items = {tuple(tuple(int(x) for x in shape) for shape in item) for item in (
        shapes if isinstance(shapes[0], (list, tuple)) and isinstance(shapes[0][0], (list, tuple)) else [shapes])}
    if len(items) != 1 or len(next(iter(items))) != 1:
        raise ValueError(f"img_shapes {shapes}: RainFusion supports one image grid per call, the same for every "
                         "batch item (Qwen-Image-Edit's reference images are not supported)")
    (frames, height, width), = next(iter(items))
    return frames, height, width


# --------------------------------------------------------------------------- text
def _first_real(count: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]``: the first ``count[b]`` tokens of each item real, the rest padding."""
    return torch.arange(length, device=count.device)[None, :] < count[:, None]


def _hunyuan_text(transformer, arguments):
    mask = arguments["encoder_attention_mask"]  # the model counts its real tokens: the first sum() are real
    if mask is None:
        return None
    return _first_real(mask.sum(dim=1, dtype=torch.int64), arguments["encoder_hidden_states"].shape[1])


def _hunyuan15_text(transformer, arguments):
    """HunyuanVideo-1.5 joins image, ByT5 and MLLM tokens, real ones first (its forward's reordering)."""
    masks = [arguments["encoder_attention_mask"], arguments["encoder_attention_mask_2"]]
    if any(m is None for m in masks):
        return None
    image = arguments.get("image_embeds")
    length = sum(m.shape[1] for m in masks)
    count = sum(m.bool().sum(dim=1, dtype=torch.int64) for m in masks)
    if image is not None:
        length += image.shape[1]
        if not bool(torch.all(image == 0)):  # the model's own test for text-to-video
            count = count + image.shape[1]
    return _first_real(count, length)


def _qwen_text(transformer, arguments):
    mask = arguments.get("encoder_hidden_states_mask")
    return None if mask is None else mask.bool()


# --------------------------------------------------------------------------- modules
def _modules(*paths: tuple[str, str]):
    """``attention_modules`` over ``(block list attribute, attention attribute)`` pairs, in that order."""
    def collect(transformer):
        found = []
        for blocks, attention in paths:
            for index, block in enumerate(getattr(transformer, blocks, None) or ()):
                found.append((f"{blocks}.{index}.{attention}", getattr(block, attention)))
        return found
    return collect


ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        family="Wan",
        classes=("WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel"),
        attention_modules=_modules(("blocks", "attn1"), ("vace_blocks", "attn1")),
        processors={"WanAttnProcessor": DISPATCH, "SkyReelsV2AttnProcessor": DISPATCH},
        grid=_grid_bcfhw,
    ),
    ModelAdapter(
        family="HunyuanVideo",
        classes=("HunyuanVideoTransformer3DModel",),
        attention_modules=_modules(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        processors={"HunyuanVideoAttnProcessor2_0": DISPATCH},
        grid=_grid_bcfhw, text_position="tail", text_valid=_hunyuan_text,
    ),
    ModelAdapter(
        family="HunyuanVideo-1.5",
        classes=("HunyuanVideo15Transformer3DModel",),
        attention_modules=_modules(("transformer_blocks", "attn")),
        processors={"HunyuanVideo15AttnProcessor2_0": DISPATCH},
        grid=_grid_bcfhw, text_position="tail", text_valid=_hunyuan15_text,
    ),
    ModelAdapter(
        family="CogVideoX",
        classes=("CogVideoXTransformer3DModel",),
        attention_modules=_modules(("transformer_blocks", "attn1")),
        processors={"CogVideoXAttnProcessor2_0": SDPA, "FusedCogVideoXAttnProcessor2_0": SDPA},
        grid=lambda transformer, arguments: _grid_bcfhw(transformer, arguments, frames_first=True),
        text_position="head",
    ),
    ModelAdapter(
        family="LTX-Video",
        classes=("LTXVideoTransformer3DModel",),
        attention_modules=_modules(("transformer_blocks", "attn1")),
        processors={"LTXVideoAttnProcessor": DISPATCH},
        grid=_grid_ltx,
    ),
    ModelAdapter(
        family="LTX-2",
        classes=("LTX2VideoTransformer3DModel",),
        attention_modules=_modules(("transformer_blocks", "attn1")),  # video self-attention; audio stays dense
        processors={"LTX2AudioVideoAttnProcessor": DISPATCH},
        grid=_grid_ltx,
    ),
    ModelAdapter(
        family="Flux",
        classes=("FluxTransformer2DModel",),
        attention_modules=_modules(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        processors={"FluxAttnProcessor": DISPATCH},
        grid=_grid_flux, text_position="head", grid_reads_host=True,
    ),
    ModelAdapter(
        family="Qwen-Image",
        classes=("QwenImageTransformer2DModel",),
        attention_modules=_modules(("transformer_blocks", "attn")),
        processors={"QwenDoubleStreamAttnProcessor2_0": DISPATCH},
        grid=_grid_qwen, text_position="head", text_valid=_qwen_text,
    ),
)


def supported_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.classes]


def adapter_for(transformer) -> ModelAdapter | None:
    """The adapter serving this transformer's class (or a class it derives from), else ``None``."""
    names = [cls.__name__ for cls in type(transformer).__mro__]
    for name in names:
        for adapter in ADAPTERS:
            if name in adapter.classes:
                return adapter
    return None
