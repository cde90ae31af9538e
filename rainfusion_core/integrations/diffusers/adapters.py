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
        timestep: the forward argument holding the timestep, falling through a generation (1000 ->
            0, or 1 -> 0); or, for a model whose time runs the other way, ``(transformer, arguments)
            -> float`` giving the step's noise level on such a falling scale. Steps are counted by it.
        grid_reads_host: ``grid`` reads tensor values (not only shapes), a host
            synchronisation per transformer call.
        cp_splits_joint_sequence: under diffusers' context parallelism the model splits its
            whole packed sequence into contiguous chunks (MiniMax-H3), not each stream apart
            (Flux, Qwen-Image: ``[text chunk, video chunk]`` per rank), so the gathered
            sequence is already in the model's order.
    """

    family: str
    attention_modules: Callable | tuple
    grid: Callable
    classes: tuple[str, ...] = ()
    processors: dict | None = None
    text_position: str | None = None
    text_valid: Callable | None = None
    timestep: str | Callable = "timestep"
    grid_reads_host: bool = False
    cp_splits_joint_sequence: bool = False

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
            object.__setattr__(self, "attention_modules", _modules(*map(tuple, pairs), required=True))
        if not callable(self.grid):
            raise ValueError("ModelAdapter.grid must be a function (transformer, forward arguments by name) -> "
                             f"(frames, height, width), got {self.grid!r}")
        if self.text_position is not None and self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"ModelAdapter.text_position must be None or one of {TEXT_POSITIONS}")
        if not callable(self.timestep) and not isinstance(self.timestep, str):
            raise ValueError("ModelAdapter.timestep must be the name of a forward argument or a function "
                             f"(transformer, arguments) -> noise level, got {self.timestep!r}")
        if self.text_valid is not None and self.text_position is None:
            raise ValueError("ModelAdapter.text_valid needs a text_position (where the text tokens are)")

    def noise_level(self, transformer, arguments) -> float:
        """The step's noise level, falling through a generation (one host read). From a timestep argument,
        its largest value: Wan2.2 TI2V gives the conditioning frame timestep 0 and the rest the step's level."""
        if callable(self.timestep):
            return float(self.timestep(transformer, arguments))
        if arguments.get(self.timestep) is None:
            raise ValueError(f"{self.family}: counting steps reads the transformer's argument {self.timestep!r} "
                             f"(ModelAdapter.timestep), which this call does not pass")
        return float(torch.as_tensor(arguments[self.timestep]).max())

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


def _grid_channels_last(transformer, arguments):
    """Kandinsky 6: a channels-last ``[B, F, H, W, C]`` latent and the config's ``(p_t, p_h, p_w)``."""
    frames, height, width = arguments["hidden_states"].shape[1:4]
    p_t, p_h, p_w = transformer.config.patch_size
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


def _grid_patched_2d(transformer, arguments):
    """SD3, HiDream, Lumina2: a ``[B, C, H, W]`` latent and the config's (square) patch."""
    hidden = arguments["hidden_states"]
    if hidden.dim() != 4:
        raise ValueError(f"RainFusion needs the latent as [B, C, H, W] in this transformer call, got shape "
                         f"{tuple(hidden.shape)} (pre-patched input is not supported)")
    patch = transformer.config.patch_size
    return 1, hidden.shape[-2] // patch, hidden.shape[-1] // patch


def _grid_lumina2(transformer, arguments):
    """Lumina2 puts each item's real caption before its image: one grid needs one caption length (a host read)."""
    mask = arguments.get("encoder_attention_mask")
    if mask is not None and mask.dim() == 2:
        counts = mask.sum(dim=1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"this Lumina2 call has {counts} real caption tokens per item, so its image starts at a "
                             "different offset in each item's sequence; RainFusion needs the same caption length for "
                             "every item (the Lumina2 pipeline's separate conditional and unconditional calls have it)")
    return _grid_patched_2d(transformer, arguments)


def _image_ids(ids, what: str, columns: int):
    """The rows of a Flux 2 / Flux 3 ``img_ids`` (``[N, 4]`` or ``[B, N, 4]``) on the host (one read)."""
    if ids is None:
        raise ValueError(f"RainFusion needs img_ids in the {what} transformer call to know the image grid")
    return (ids[0] if ids.dim() == 3 else ids).reshape(-1, columns).cpu()


def _grid_from_ids(ids, tokens: int, what: str):
    """``(1, height, width)`` of ids rows ``(t, h, w, l)`` of one image at ``t = 0``, ``l = 0``."""
    if bool((ids[:, 0] != 0).any()) or bool((ids[:, 3] != 0).any()):
        raise ValueError(f"this {what} call joins reference images to the generated one (img_ids with a non-zero t "
                         "or l column); RainFusion supports one image grid")
    height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if height * width != tokens:
        raise ValueError(f"the {what} call has {tokens} image tokens but img_ids span a {height}x{width} grid")
    return 1, height, width


def _grid_flux2(transformer, arguments):
    if arguments.get("kv_cache_mode") is not None:
        raise ValueError("Flux 2's KV-cache mode (reference images kept as keys) is not supported; RainFusion "
                         "supports one image grid")
    return _grid_from_ids(_image_ids(arguments["img_ids"], "Flux 2", 4), arguments["hidden_states"].shape[1],
                          "Flux 2")


def _grid_flux3(transformer, arguments):
    if arguments.get("image_cond_hidden_states") is not None:
        raise ValueError("this Flux 3 call has reference images (image_cond_hidden_states), joined after the image "
                         "in its blocks; RainFusion supports one image grid")
    return _grid_from_ids(_image_ids(arguments["img_ids"], "Flux 3", 4), arguments["hidden_states"].shape[1],
                          "Flux 3")


def _grid_zimage(transformer, arguments):
    """Z-Image takes a list of ``[C, F, H, W]`` latents and its patch sizes as arguments."""
    latents = arguments["x"]
    if isinstance(latents[0], (list, tuple)):
        raise ValueError("Z-Image's omni mode (condition images and SigLIP tokens in the joint sequence) is not "
                         "supported; RainFusion supports one image grid")
    shapes = {tuple(item.shape[1:]) for item in latents}
    if len(shapes) != 1:
        raise ValueError(f"Z-Image latents of different sizes in one call ({sorted(shapes)}): RainFusion needs one grid")
    (frames, height, width), = shapes
    patch, frame_patch = arguments["patch_size"], arguments["f_patch_size"]
    return frames // frame_patch, height // patch, width // patch


def _grid_minimax_h3(transformer, arguments):
    """MiniMax-H3 packs ``[text | conditioning | audio | generated video]``: the generated video is the contiguous
    tail of ``video_indices``, frame-major by its ``position_ids`` (one host read)."""
    positions, video = arguments["position_ids"], arguments["video_indices"]
    length, rows = positions.shape[0], video.shape[0]
    video = video.cpu()
    tail = 0
    if rows and int(video[-1]) == length - 1:
        tail = int((video == torch.arange(length - rows, length)).sum())
    if tail == 0:
        raise ValueError("RainFusion needs the generated video rows at the tail of the MiniMax-H3 packed sequence")
    grid = positions[length - tail:].cpu()
    axes = [torch.unique(grid[:, i]) for i in range(3)]
    frames, height, width = (a.numel() for a in axes)
    raster = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    if frames * height * width != tail or not torch.equal(raster.to(grid.dtype), grid):
        raise ValueError(f"the {tail} video rows at the tail of the MiniMax-H3 sequence are not one frame-major grid "
                         f"(their positions span {frames}x{height}x{width})")
    return frames, height, width


def _rising_time(name: str):
    """The noise level of a model whose time argument rises from 0 (noise) to 1 (clean): ``1000 (1 - min t)``."""
    def level(transformer, arguments):
        return 1000.0 * (1.0 - float(torch.as_tensor(arguments[name]).min()))
    return level


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


def _motif_text(transformer, arguments):
    """Motif-Video joins ``[video, image-encoder tokens (all real), text]`` and masks with ``encoder_attention_mask``."""
    mask = arguments.get("encoder_attention_mask")
    if mask is None:
        return None
    valid = mask.bool()
    image = arguments.get("image_embeds")
    if image is not None:
        valid = torch.cat([valid.new_ones(image.shape[:2]), valid], dim=1)
    return valid


def _zimage_text(transformer, arguments):
    """Z-Image joins per item ``[image, image padding, caption, caption padding]`` (each padded to a multiple of
    32 with learned tokens, all attended), then pads the batch to its longest item, masked. Every token after
    the image counts as text; the batch padding is not real."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    frames, height, width = _grid_zimage(transformer, arguments)
    video = frames * height * width
    image = video + (-video) % SEQ_MULTI_OF
    captions = arguments["cap_feats"]
    lengths = torch.tensor([image + len(c) + (-len(c)) % SEQ_MULTI_OF for c in captions])
    if bool((lengths == lengths.max()).all()):
        return None  # no batch padding: the model passes no mask either
    return (torch.arange(int(lengths.max()) - video)[None, :] < (lengths - video)[:, None]).to(captions[0].device)


# --------------------------------------------------------------------------- modules
def _modules(*paths: tuple[str, str], required: bool = False):
    """``attention_modules`` over ``(block list attribute, attention attribute)`` pairs, in that order.

    ``required``: every block list must exist (a user's pairs: a misspelt name is an error, never an
    empty list); the built-in tables name optional lists (Wan's ``vace_blocks``) and leave it off.
    """
    def collect(transformer):
        found = []
        for blocks, attention in paths:
            listed = getattr(transformer, blocks, None)
            if listed is None and required:
                raise ValueError(f"ModelAdapter.attention_modules names the block list {blocks!r}, which "
                                 f"{type(transformer).__name__} does not have")
            for index, block in enumerate(listed or ()):
                module = getattr(block, attention, None)
                if module is None or not hasattr(module, "processor"):
                    raise ValueError(f"ModelAdapter.attention_modules names {blocks}.{index}.{attention}, which is "
                                     f"not an attention module with a processor in {type(transformer).__name__}")
                found.append((f"{blocks}.{index}.{attention}", module))
        return found
    return collect


def _flux3_modules(transformer):
    """Flux 3: the image stream's mode blocks (a ``ModuleDict`` entry), then the single blocks over
    ``[text, image]``; the text mode blocks see text only and stay dense."""
    found = [(f"mode_blocks.image.{i}.attn", block.attn) for i, block in enumerate(transformer.mode_blocks["image"])]
    return found + [(f"single_transformer_blocks.{i}.attn", block.attn)
                    for i, block in enumerate(transformer.single_transformer_blocks)]


def _sd3_modules(transformer):
    """SD3: each block's joint attention, and SD3.5's image-only second attention where a block has one."""
    found = []
    for index, block in enumerate(transformer.transformer_blocks):
        found.append((f"transformer_blocks.{index}.attn", block.attn))
        if getattr(block, "attn2", None) is not None:
            found.append((f"transformer_blocks.{index}.attn2", block.attn2))
    return found


def _hidream_modules(transformer):
    """HiDream-I1 wraps each block in ``.block``."""
    return [(f"{blocks}.{index}.block.attn1", block.block.attn1)
            for blocks in ("double_stream_blocks", "single_stream_blocks")
            for index, block in enumerate(getattr(transformer, blocks))]


def _kandinsky6_modules(transformer):
    """Kandinsky 6: the video self-attention of each visual block; text, audio and cross-modal attention stay dense."""
    return [(f"visual_transformer_blocks.{i}.video_dec_block.self_attention", block.video_dec_block.self_attention)
            for i, block in enumerate(transformer.visual_transformer_blocks)]


def _motif_modules(transformer):
    """Motif-Video: the joint attention of the dual-stream blocks and of the encoder's single-stream blocks. The
    last ``num_decoder_layers`` single blocks attend over [decoder video; encoder video], twice the grid: dense."""
    singles = transformer.single_transformer_blocks
    encoder = len(singles) - (transformer.config.num_decoder_layers or 0)
    return _modules(("transformer_blocks", "attn"))(transformer) + [
        (f"single_transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(singles[:encoder])]


ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        family="Wan",
        classes=("WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel",
                 "WanAnimateTransformer3DModel"),  # Animate: frame 0 is the reference latent, in the grid
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
        family="Mochi",
        classes=("MochiTransformer3DModel",),
        # joint attention, [video | the item's real text]: the processor drops padded text itself and attends
        # one batch item at a time, so each call's text length is its item's real count
        attention_modules=_modules(("transformer_blocks", "attn1")),
        processors={"MochiAttnProcessor2_0": SDPA},
        grid=_grid_bcfhw, text_position="tail",
    ),
    ModelAdapter(
        family="Cosmos",
        classes=("CosmosTransformer3DModel",),  # Cosmos 1, 2 and 2.5; attn2 is cross-attention to text
        attention_modules=_modules(("transformer_blocks", "attn1")),
        processors={"CosmosAttnProcessor2_0": DISPATCH},
        grid=_grid_bcfhw,
    ),
    ModelAdapter(
        family="Flux",
        classes=("FluxTransformer2DModel",),
        attention_modules=_modules(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        processors={"FluxAttnProcessor": DISPATCH},
        grid=_grid_flux, text_position="head", grid_reads_host=True,
    ),
    ModelAdapter(
        family="Kandinsky 6",
        classes=("Kandinsky6Transformer3DModel",),
        attention_modules=_kandinsky6_modules,
        processors={"Kandinsky6AttnProcessor": DISPATCH},
        grid=_grid_channels_last,
    ),
    ModelAdapter(
        family="Motif-Video",
        classes=("MotifVideoTransformer3DModel",),
        attention_modules=_motif_modules,
        processors={"MotifVideoAttnProcessor2_0": DISPATCH},
        grid=_grid_bcfhw, text_position="tail", text_valid=_motif_text,
    ),
    ModelAdapter(
        family="MiniMax-H3",
        classes=("MiniMaxH3Transformer3DModel",),
        # the joint blocks over [text | conditioning | audio | video]; token_refiner's blocks see text only
        attention_modules=_modules(("transformer_blocks", "attn")),
        processors={"MiniMaxH3AttnProcessor": DISPATCH},
        grid=_grid_minimax_h3, text_position="head", grid_reads_host=True,
        timestep=_rising_time("timestep"), cp_splits_joint_sequence=True,
    ),
    ModelAdapter(
        family="Flux.2",
        classes=("Flux2Transformer2DModel",),
        attention_modules=_modules(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        processors={"Flux2AttnProcessor": DISPATCH, "Flux2ParallelSelfAttnProcessor": DISPATCH},
        grid=_grid_flux2, text_position="head", grid_reads_host=True,
    ),
    ModelAdapter(
        family="Flux.3",
        classes=("Flux3Transformer2DModel",),
        attention_modules=_flux3_modules,
        processors={"Flux3AttnProcessor": DISPATCH},
        grid=_grid_flux3, text_position="head", grid_reads_host=True,
    ),
    ModelAdapter(
        family="SD3",
        classes=("SD3Transformer2DModel",),
        attention_modules=_sd3_modules,
        processors={"JointAttnProcessor2_0": SDPA, "FusedJointAttnProcessor2_0": SDPA},
        grid=_grid_patched_2d, text_position="tail",
    ),
    ModelAdapter(
        family="HiDream-I1",
        classes=("HiDreamImageTransformer2DModel",),
        # [image, padding up to max_seq (attended: the model zeroes its keys only), text]: all after the image is text
        attention_modules=_hidream_modules,
        processors={"HiDreamAttnProcessor": SDPA},
        grid=_grid_patched_2d, text_position="tail", timestep="timesteps",
    ),
    ModelAdapter(
        family="Z-Image",
        classes=("ZImageTransformer2DModel",),
        # the main layers over [image, caption]; noise_refiner (image and its padding) and context_refiner
        # (caption) stay dense
        attention_modules=_modules(("layers", "attention")),
        processors={"ZSingleStreamAttnProcessor": DISPATCH},
        grid=_grid_zimage, text_position="tail", text_valid=_zimage_text, timestep=_rising_time("t"),
    ),
    ModelAdapter(
        family="Lumina2",
        classes=("Lumina2Transformer2DModel",),
        # [real caption, image]: noise_refiner sees the image alone; context_refiner (caption only) stays dense
        attention_modules=_modules(("noise_refiner", "attn"), ("layers", "attn")),
        processors={"Lumina2AttnProcessor2_0": SDPA},
        grid=_grid_lumina2, text_position="head", grid_reads_host=True, timestep=_rising_time("timestep"),
    ),
    ModelAdapter(
        family="Qwen-Image",
        classes=("QwenImageTransformer2DModel",),
        attention_modules=_modules(("transformer_blocks", "attn")),
        processors={"QwenDoubleStreamAttnProcessor2_0": DISPATCH},
        grid=_grid_qwen, text_position="head", text_valid=_qwen_text,
    ),
)


#: transformer classes RainFusion refuses, and why: their attention is not one video grid plus one dense span
UNSUPPORTED: dict[str, str] = {
    "HunyuanVideoFramepackTransformer3DModel": (
        "HunyuanVideo-Framepack joins history latents (4x and 2x downsampled, and clean frames at other frame "
        "indices) before the video tokens and image and text tokens after them; RainFusion's layout has one video "
        "grid plus a single text span at the head or the tail"),
    "SanaVideoTransformer3DModel": (
        "Sana-Video's self-attention (SanaLinearAttnProcessor3_0) is linear attention, with no softmax score "
        "matrix to make block-sparse; its only softmax attention is the cross-attention to text, which stays dense"),
    "Cosmos3OmniTransformer": (
        "Cosmos3-Omni packs every batch item into one unbatched sequence placed by vision_sequence_indexes; its "
        "generation attention has queries over video tokens only but keys over text and video, with grouped-query "
        "heads, and its text pathway is causal: not one square block-sparse attention over a video grid"),
    "QwenImage21Transformer2DModel": (
        "Qwen-Image 2.1's attention is block-causal: text rows are causal, and its processor splits each layer into "
        "per-segment calls whose queries (the target image) and keys (the whole prefix and the image) differ, not "
        "one bidirectional joint attention"),
    "WanAnimate2Transformer3DModel": (
        "Wan-Animate 2's cached self-attention packs the video queries into a padded buffer, takes keys over the "
        "video and a cached reference, and runs its own FlexAttention block mask with a fixed backend: there is "
        "no dispatcher call over a video grid to route"),
}


def supported_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.classes]


def unsupported_reason(transformer) -> str | None:
    """Why RainFusion refuses this transformer's class (or a class it derives from), else ``None``."""
    return next((UNSUPPORTED[cls.__name__] for cls in type(transformer).__mro__ if cls.__name__ in UNSUPPORTED), None)


def adapter_for(transformer) -> ModelAdapter | None:
    """The adapter serving this transformer's class (or a class it derives from), else ``None``."""
    names = [cls.__name__ for cls in type(transformer).__mro__]
    for name in names:
        for adapter in ADAPTERS:
            if name in adapter.classes:
                return adapter
    return None
