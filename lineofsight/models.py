"""Load LLaVA-style models and answer structural questions about them.

This is the one module that knows how transformers lays out a vision-language model.
Scripts never walk attribute chains such as ``model.model.language_model.layers``
(transformers 5 moved them, and other backbones name them differently); they ask:

- :func:`load_vlm` -- model + processor from an HF id, a local ``save_pretrained``
  directory, or ``"toy"`` (the embedded default in ``data/toy/model``); :func:`check_model` --
  its cheap checks alone (config readable, a supported type, no custom code, weights present),
  for scripts to call before heavy work.
- :func:`layer_names` -- dotted names of the text decoder blocks, found by structure
  (the ``ModuleList`` of length ``num_hidden_layers`` next to the token embedding).
- :func:`residual_site` -- where to read or edit the residual stream at ``layer``.
- :func:`image_token_mask` -- which positions of ``input_ids`` hold image features.
- :func:`image_token_layout` -- which pixels each of an image's tokens stands for (:class:`ImageTokenLayout`:
  the base and anyres crop grids, their pixel boxes, the row-newline tokens).
- :func:`format_prompt` -- a question in the model's prompt format; :func:`answer_token_ids` -- the ids of an
  answer exactly as the model writes it after such a prompt (what teacher forcing appends).
- :func:`final_hidden` -- the hidden states the output embedding reads, without computing logits.
- :func:`vlm_inputs` -- model inputs for (image, prompt) rows, each distinct image preprocessed and encoded once.
- :func:`mlp_output_directions` -- the unit output directions ``[d_mlp, d_model]`` of a block's MLP neurons (the
  down-projection's columns).

Code shipped with a model is never run: every transformers loader gets ``trust_remote_code=False``
and a model whose configs ask for custom classes (``auto_map``) is refused up front, so
transformers never gets to ask on stdin. Weights are read from safetensors only (never unpickled).

The ``layer`` convention, everywhere in the project: ``layer`` is the 0-based index of the
decoder block whose **input** is read or edited, i.e. the residual stream after ``layer``
blocks, ``hidden_states[layer]`` in a forward with ``output_hidden_states=True``.
``layer == n_layers`` is the residual after the last block, which is the input of the final
norm (transformers' ``hidden_states[n_layers]`` is that residual *after* the final norm).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lineofsight.cli import UserError
from lineofsight.paths import TOY_MODEL_DIR
from lineofsight.prompts import MISTRAL_PROMPT, MISTRAL_TEXT_PROMPT

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DTYPES",
    "ImageTokenLayout",
    "PatchGrid",
    "SUPPORTED_MODEL_TYPES",
    "Dtype",
    "answer_token_ids",
    "check_layer",
    "check_model",
    "final_norm_gain",
    "final_norm_name",
    "format_prompt",
    "image_token_id",
    "image_token_layout",
    "image_token_mask",
    "layer_names",
    "load_vlm",
    "mlp_output_directions",
    "n_layers",
    "position_ids",
    "residual_site",
    "resolve_model_path",
    "text_config",
    "vlm_inputs",
]

Dtype = Literal["float32", "bfloat16", "float16"]
"""A model or storage dtype, as every script's ``--dtype`` / ``--save-dtype`` spells it."""
DTYPES: tuple[str, ...] = get_args(Dtype)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llava_next", "llava")
"""``model_type`` values of the configs this project loads (LLaVA-NeXT and LLaVA-1.5 layouts)."""

# Configs a model folder may hold; any of them with an ``auto_map`` asks for code shipped with the model.
_CONFIG_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")

# Substrings of module names that belong to the vision side of a VLM.
_VISION_PARTS = ("vision", "visual", "multi_modal_projector", "image_newline")


def _torch_dtype(dtype: Any) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def resolve_model_path(model: str) -> str:
    """Map ``model`` to something ``from_pretrained`` accepts, or raise :class:`UserError`.

    ``"toy"`` -> the committed toy model directory; an existing path must be a directory
    holding ``config.json``; anything else that looks like a path is an error; the rest is
    treated as a Hugging Face hub id.
    """
    if model == "toy":
        if not (Path(TOY_MODEL_DIR) / "config.json").is_file():
            raise UserError(
                f"the toy model is missing from {TOY_MODEL_DIR}; regenerate it with "
                "`python scripts/train_toy_vlm.py`"
            )
        return str(TOY_MODEL_DIR)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"--model {model!r} is not a model directory: expected a folder written by "
                "save_pretrained (with config.json), a Hugging Face id, or 'toy'"
            )
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep + os.sep in model
    if looks_like_path:
        raise UserError(
            f"--model {model!r}: no such directory, and not a Hugging Face id of the form "
            "'org/name' (or 'toy' for the embedded model)"
        )
    return model


def check_model(model: str) -> str:
    """The cheap checks of ``--model``, before any weights are read; returns the source for
    ``from_pretrained`` (as :func:`resolve_model_path`). :class:`UserError` when

    - it is neither ``"toy"``, a model folder nor a Hugging Face id (:func:`resolve_model_path`);
    - its ``config.json`` cannot be read (missing, not UTF-8 JSON; for an id: not reachable);
    - a config asks for custom code (``auto_map``): refused, never run and never asked about;
    - its ``model_type`` is not one of :data:`SUPPORTED_MODEL_TYPES`;
    - (a folder) it has no ``*.safetensors`` weights, a shard its index lists is missing, or a
      weights file is empty, truncated or not safetensors (only the headers are read).
    """
    from lineofsight.io import read_json

    source = resolve_model_path(model)
    folder = Path(source) if Path(source).is_dir() else None
    config_path = folder / "config.json" if folder is not None else _hub_config(model, source)
    config = read_json(config_path, f"--model {model}: config")
    configs = {"config.json": config}
    if folder is not None:  # a hub model's other configs are not downloaded yet; transformers refuses their code
        configs.update({name: read_json(folder / name, f"--model {model}: {name}")
                        for name in _CONFIG_FILES[1:] if (folder / name).is_file()})
    for name, contents in configs.items():
        if "auto_map" in contents:
            raise UserError(
                f"--model {model}: {name} asks for custom code shipped with the model (auto_map); lineofsight never "
                "runs a model's own code (trust_remote_code=False). Use a model that transformers supports natively"
            )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"--model {model} is a {model_type!r} model (config.json model_type); supported are LLaVA-style "
            f"vision-language models of type {' or '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if folder is not None:
        _check_weights(model, folder)
    return source


def _hub_config(model: str, repo_id: str) -> Path:
    """``config.json`` of a hub model, from the local cache or downloaded (a few KB)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(repo_id, "config.json")
    except (OSError, ValueError) as err:
        raise UserError(
            f"--model {model!r} could not be loaded: expected a local directory with config.json, "
            f"a Hugging Face id reachable from this machine, or 'toy' ({_first_line(err)})"
        ) from None
    if path is None:
        raise UserError(f"--model {model!r} could not be loaded: the hub repository has no config.json")
    return Path(path)


def _check_weights(model: str, folder: Path) -> None:
    """Every safetensors weights file of ``folder`` is present and has a valid header (cheap: header only)."""
    from lineofsight.io import open_tensors, read_json

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path, f"--model {model}: weights index", required={"weight_map": "object"})
        files = sorted({str(name) for name in index["weight_map"].values()})
        missing = [name for name in files if Path(name).name != name or not (folder / name).is_file()]
        if missing or not files:
            raise UserError(f"--model {model}: {index_path.name} lists weights files that are missing: "
                            f"{', '.join(missing[:3]) or 'none listed'}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f"; {', '.join(pickled[:2])} (pickle) are not loaded: save the model with "
                "save_pretrained(safe_serialization=True)") if pickled else ""
        raise UserError(f"--model {model}: {folder} holds config.json but no weights (*.safetensors){hint}")
    for name in files:
        with open_tensors(folder / name, f"--model {model}: weights file"):
            pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_vlm(
    model: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a LLaVA-style model (eval mode) and its processor.

    Args:
        model: an HF hub id (``llava-hf/llava-v1.6-mistral-7b-hf``), a local directory written
            by ``save_pretrained``, or ``"toy"``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: where to put the weights.

    Raises:
        UserError: ``model`` fails :func:`check_model`, or its config, processor or weights do not
            load (one line naming the model; the processor is loaded first, being the cheaper).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoProcessor

    torch_dtype = _torch_dtype(dtype)
    source = check_model(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(
            f"--model {model!r} could not be loaded: expected a local directory with config.json, "
            f"a Hugging Face id reachable from this machine, or 'toy' ({_first_line(err)})"
        ) from None
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"--model {model}: its processor (tokenizer and image processor files) could not be "
                        f"loaded ({type(err).__name__}: {_first_line(err)})") from None
    if torch.device(device).type == "cpu":
        from lineofsight.dist import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    model_cls = _model_class(config.model_type)
    try:
        vlm = model_cls.from_pretrained(source, config=config, dtype=torch_dtype, trust_remote_code=False,
                                        use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"--model {model}: its weights could not be loaded ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    vlm = vlm.to(device).eval()
    _fix_processor(processor, vlm)
    return vlm, processor


def _model_class(model_type: str) -> type:
    import transformers

    known = {
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "llava": transformers.LlavaForConditionalGeneration,
    }
    return known[model_type]  # check_model admits only SUPPORTED_MODEL_TYPES


def _fix_processor(processor: Any, model: nn.Module) -> None:
    """Make the processor's image-token count agree with the model.

    With the ``default`` feature strategy the CLIP tower's CLS token is dropped after being
    counted, so the processor needs ``num_additional_image_tokens=1``; old processor configs
    lack it and expand ``<image>`` one token short.
    """
    cfg = model.config
    if getattr(processor, "patch_size", 1) is None and hasattr(cfg, "vision_config"):
        processor.patch_size = cfg.vision_config.patch_size
    if (
        hasattr(processor, "num_additional_image_tokens")
        and not processor.num_additional_image_tokens
        and getattr(cfg, "vision_feature_select_strategy", None) == "default"
        and getattr(getattr(cfg, "vision_config", None), "model_type", "") in ("clip_vision_model", "clip")
    ):
        processor.num_additional_image_tokens = 1
    if getattr(processor, "vision_feature_select_strategy", "x") is None:
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy


def text_config(model: nn.Module) -> Any:
    """The config of the text decoder (the whole config for a text-only model)."""
    return model.config.get_text_config(decoder=True)


def _is_vision(name: str) -> bool:
    return any(part in name for part in _VISION_PARTS)


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of the text decoder blocks, in order.

    Found by structure, not by attribute chains: the ``nn.ModuleList`` whose length is the
    text config's ``num_hidden_layers``, outside the vision tower, whose parent also holds
    the token embedding. Works for LLaVA-NeXT (Mistral, Llama/Vicuna, Qwen2 backbones),
    LLaVA-1.5 and plain causal LMs, across transformers' module layouts.
    """
    import torch.nn as nn

    cached = getattr(model, "_lineofsight_layer_names", None)
    if cached is not None:
        return list(cached)
    n = text_config(model).num_hidden_layers
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and name and not _is_vision(name)
    ]

    def next_to_embedding(name: str) -> bool:
        parent = model.get_submodule(name.rpartition(".")[0])
        return any(isinstance(child, nn.Embedding) for child in parent.children())

    with_embedding = [name for name in candidates if next_to_embedding(name)]
    if len(with_embedding) == 1:
        found = with_embedding[0]
    elif len(candidates) == 1:
        found = candidates[0]
    else:
        raise ValueError(
            f"cannot identify the decoder layers of {type(model).__name__}: ModuleLists of length "
            f"{n}: {candidates or 'none'}"
        )
    names = [f"{found}.{i}" for i in range(n)]
    model._lineofsight_layer_names = tuple(names)
    return names


def n_layers(model: nn.Module) -> int:
    """Number of text decoder blocks."""
    return len(layer_names(model))


def final_norm_name(model: nn.Module) -> str:
    """Dotted name of the norm applied after the last decoder block."""
    blocks = layer_names(model)[0].rpartition(".")[0]
    parent_name = blocks.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    norms = [name for name, child in parent.named_children() if "norm" in type(child).__name__.lower()]
    preferred = [name for name in norms if name in ("norm", "final_layernorm", "ln_f")]
    chosen = (preferred or norms or [None])[-1]
    if chosen is None:
        raise ValueError(f"no final norm found next to {blocks}")
    return f"{parent_name}.{chosen}" if parent_name else chosen


def final_norm_gain(model: nn.Module) -> torch.Tensor | None:
    """The per-channel scale ``[d_model]`` the final norm applies after normalising (its ``weight``; None for a norm
    without one): what a residual direction is multiplied by on its way to the unembedding (the logit lens)."""
    weight = getattr(model.get_submodule(final_norm_name(model)), "weight", None)
    return None if weight is None else weight.detach()


def check_layer(model: nn.Module, layer: int, flag: str = "--layer") -> int:
    """Return ``layer`` if it is in ``[0, n_layers]``, else raise :class:`UserError`."""
    n = n_layers(model)
    if not 0 <= layer <= n:
        raise UserError(
            f"{flag} {layer} is out of range: this model has {n} decoder blocks, so valid layers are "
            f"0..{n} (layer L = input of block L; {n} = output of the last block)"
        )
    return layer


def residual_site(model: nn.Module, layer: int) -> str:
    """Module whose **input** is the residual stream at ``layer`` (see module docstring).

    ``layer < n_layers``: decoder block ``layer``; ``layer == n_layers``: the final norm.
    Use with ``Trace(model, residual_site(model, L), retain_input=True)`` or ``edit_input``.
    """
    check_layer(model, layer)
    names = layer_names(model)
    return names[layer] if layer < len(names) else final_norm_name(model)


def image_token_id(model: nn.Module) -> int:
    """The id of the image placeholder token in ``input_ids``."""
    cfg = model.config
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__} has no image token id in its config")


def image_token_mask(input_ids: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Boolean mask, shaped like ``input_ids``, of the positions that hold image features.

    The processor expands each ``<image>`` into one placeholder per image feature (anyres
    crops, base crop and row newlines included), and the model scatters its image features
    into exactly these positions, so this is right for any image size, prompt or padding.
    """
    return input_ids == image_token_id(model)


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """A grid of image tokens tiling one box of the image: cell ``(r, c)`` of a ``rows x cols`` grid covers the
    ``(r, c)``-th of ``rows x cols`` equal parts of ``box``."""

    name: str
    """``"base"`` (the whole image squashed to one tile; LLaVA-1.5: its centre crop) or ``"crops"`` (the anyres
    crop grid, unpadded)."""
    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in pixels of the original image (the one given to the processor), clipped to it."""
    shape: tuple[int, int]
    """``(rows, cols)``."""
    tokens: torch.Tensor
    """long ``[rows * cols]``, row-major: each cell's token index among the image's tokens (0-based rank among the
    image-token positions of ``input_ids`` for that image)."""

    def _cell_boxes(self) -> torch.Tensor:
        import torch

        rows, cols = self.shape
        x0, y0, x1, y1 = self.box
        # x0 + (x1 - x0) * j / cols: the last edge is x1 exactly (no float drift past the image).
        xs = x0 + (x1 - x0) * torch.arange(cols + 1, dtype=torch.float64) / cols
        ys = y0 + (y1 - y0) * torch.arange(rows + 1, dtype=torch.float64) / rows
        return torch.stack([xs[:-1].repeat(rows), ys[:-1].repeat_interleave(cols),
                            xs[1:].repeat(rows), ys[1:].repeat_interleave(cols)], dim=1)


@dataclasses.dataclass(frozen=True)
class ImageTokenLayout:
    """Where each of an image's tokens looks: :func:`image_token_layout`."""

    n_tokens: int
    """How many image-token positions the image takes in ``input_ids`` (newline tokens included)."""
    grids: tuple[PatchGrid, ...]
    """The token grids, in token order (LLaVA-NeXT: base, crops; LLaVA-1.5: base)."""
    newlines: torch.Tensor
    """long: token indices of the row-newline tokens (LLaVA-NeXT: one after each row of the crop grid); they belong
    to no grid."""

    def boxes(self) -> torch.Tensor:
        """float ``[n_tokens, 4]``: each token's pixel box ``(x0, y0, x1, y1)`` in the original image; NaN rows for
        the newline tokens."""
        import torch

        out = torch.full((self.n_tokens, 4), float("nan"), dtype=torch.float64)
        for grid in self.grids:
            out[grid.tokens] = grid._cell_boxes()
        return out.float()


def image_token_layout(model_or_config: Any, processor: Any, image_size: tuple[int, int]) -> ImageTokenLayout:
    """Which pixels of an image each of its image tokens stands for: the grids of vision patches the model packs
    into the ``<image>`` placeholders, in token order, and the pixel box each grid covers.

    ``image_size`` = ``(width, height)`` of the image as given to the processor (PIL ``.size``). LLaVA-NeXT (anyres,
    transformers' ``LlavaNextModel.pack_image_features``): the base tile (the image squashed to one tile,
    ``side x side`` tokens), then the crop grid of the best resolution of ``image_grid_pinpoints`` with the rows or
    columns that show only padding removed (``unpad_image``), row-major with one newline token after each row.
    The image processor resizes the image keeping its aspect ratio to fit the best resolution and pads it centred
    (any odd pixel after), so the crop grid's box is the region its remaining cells cover, mapped back to the
    image and clipped to it. LLaVA-1.5: one base grid over the image processor's centre crop, no newlines.

    Raises:
        ValueError: (one line) a model type other than ``llava_next``/``llava``; a
            ``vision_feature_select_strategy`` other than ``"default"`` (``"full"`` keeps the CLS token, which
            covers no patch; LLaVA-NeXT's packing cannot reshape it); a model without ``image_newline``; a
            processor that expands ``<image>`` into a different number of tokens than the model fills, or whose
            resize/crop/pinpoint settings do not match the vision tower's tile.
    """
    import torch
    from torch import nn

    cfg = getattr(model_or_config, "config", model_or_config)
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image_size {tuple(image_size)} is not a (width, height) of a non-empty image")
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"image token layout of a {model_type!r} model is unknown; supported are "
                         f"{' and '.join(SUPPORTED_MODEL_TYPES)}")
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported: only 'default' (the CLS "
                         "token dropped, every image token a patch) has a patch layout here")
    tile, patch = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size)
    if tile % patch:
        raise ValueError(f"vision tower image_size {tile} is not a multiple of its patch_size {patch}")
    side = tile // patch
    n_base = side * side
    _check_processor_count(processor, patch)
    base_tokens = torch.arange(n_base)
    no_newlines = torch.zeros(0, dtype=torch.long)
    if model_type == "llava":
        box = _centre_crop_box(processor.image_processor, width, height, tile)
        return ImageTokenLayout(n_base, (PatchGrid("base", box, (side, side), base_tokens),), no_newlines)

    if isinstance(model_or_config, nn.Module) and not any(
        name.rpartition(".")[2] == "image_newline" for name, _ in model_or_config.named_parameters()
    ):
        raise ValueError(f"{type(model_or_config).__name__} has no image_newline parameter; its LLaVA-NeXT token "
                         "layout (one newline token after each crop-grid row) does not apply")
    pinpoints = [[int(v) for v in point] for point in cfg.image_grid_pinpoints]
    image_processor = processor.image_processor
    processor_points = getattr(image_processor, "image_grid_pinpoints", None)
    if processor_points is None or [[int(v) for v in point] for point in processor_points] != pinpoints:
        raise ValueError(f"the image processor's image_grid_pinpoints {processor_points} differ from the model's "
                         f"{pinpoints}")
    if any(h % tile or w % tile for h, w in pinpoints):
        raise ValueError(f"image_grid_pinpoints {pinpoints} are not multiples of the tile size {tile}")
    if _resize_square(image_processor) != tile or _crop_square(image_processor) != tile:
        raise ValueError(f"the image processor's size {image_processor.size} and crop_size "
                         f"{image_processor.crop_size} are not the vision tower's {tile}x{tile} tile")
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), pinpoints)  # pinpoints are [height, width]
    rows_full, cols_full = best_h // tile * side, best_w // tile * side  # the crop tiles' patches, side by side
    # unpad_image (and the processor's _get_unpadded_features): drop `pad` rows (or columns) at each end; its
    # int(round(x, 7)) truncates x, rounding only float noise (35.9999999 -> 36).
    r0, r1, c0, c1 = 0, rows_full, 0, cols_full
    if width / height > cols_full / rows_full:
        pad = (rows_full - int(round(height * (cols_full / width), 7))) // 2
        r0, r1 = pad, rows_full - pad
    else:
        pad = (cols_full - int(round(width * (rows_full / height), 7))) // 2
        c0, c1 = pad, cols_full - pad
    # The image processor (get_patch_output_size, then _pad_for_patching): the image resized to new_w x new_h
    # keeping its aspect ratio, pasted at (left, top) of the best_w x best_h canvas; patch cells are patch pixels.
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * (best_w / width)), best_h)
    else:
        new_w, new_h = min(math.ceil(width * (best_h / height)), best_w), best_h
    left, top = (best_w - new_w) // 2, (best_h - new_h) // 2
    box = (min(max((c0 * patch - left) * width / new_w, 0.0), float(width)),
           min(max((r0 * patch - top) * height / new_h, 0.0), float(height)),
           min(max((c1 * patch - left) * width / new_w, 0.0), float(width)),
           min(max((r1 * patch - top) * height / new_h, 0.0), float(height)))
    rows, cols = r1 - r0, c1 - c0
    row_starts = n_base + torch.arange(rows) * (cols + 1)  # each row: cols cells, then its newline
    crop_tokens = (row_starts[:, None] + torch.arange(cols)[None, :]).flatten()
    grids = (PatchGrid("base", (0.0, 0.0, float(width), float(height)), (side, side), base_tokens),
             PatchGrid("crops", box, (rows, cols), crop_tokens))
    return ImageTokenLayout(n_base + rows * (cols + 1), grids, row_starts + cols)


def _size_field(size: Any, key: str) -> int | None:
    """A field of an image processor's ``size``/``crop_size`` (a ``SizeDict`` or a plain dict)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _resize_square(image_processor: Any) -> int | None:
    """The side of the square LLaVA-NeXT's image processor squashes the base tile to, or None if not square."""
    size = image_processor.size
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height is not None and width is not None:
        return height if height == width else None
    return _size_field(size, "shortest_edge")


def _crop_square(image_processor: Any) -> int | None:
    crop = getattr(image_processor, "crop_size", None)
    if crop is None or not getattr(image_processor, "do_center_crop", False):
        return _resize_square(image_processor)
    height, width = _size_field(crop, "height"), _size_field(crop, "width")
    return height if height == width else None


def _centre_crop_box(image_processor: Any, width: int, height: int, tile: int) -> tuple[float, float, float, float]:
    """The region of a ``width x height`` image that LLaVA-1.5's image processor keeps: resized (shortest edge to
    ``size``, the long edge truncated: ``get_resize_output_image_size``), then centre-cropped to ``crop_size``
    (offsets floored), in original pixels."""
    size = image_processor.size
    new_h, new_w = height, width
    if getattr(image_processor, "do_resize", True):
        edge, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
        if edge is not None and longest is None:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = edge, int(edge * long / short)
            new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        elif _size_field(size, "height") is not None and _size_field(size, "width") is not None:
            new_h, new_w = _size_field(size, "height"), _size_field(size, "width")
        else:
            raise ValueError(f"image processor size {size} is not supported (expected shortest_edge or height/width)")
    crop_h, crop_w = new_h, new_w
    if getattr(image_processor, "do_center_crop", False):
        crop_h, crop_w = _size_field(image_processor.crop_size, "height"), _size_field(image_processor.crop_size,
                                                                                       "width")
    if (crop_h, crop_w) != (tile, tile) or crop_h > new_h or crop_w > new_w:
        raise ValueError(f"the image processor gives a {crop_w}x{crop_h} crop of a {new_w}x{new_h} resize, not the "
                         f"vision tower's {tile}x{tile} tile cut from inside the image")
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return (left * width / new_w, top * height / new_h, (left + crop_w) * width / new_w,
            (top + crop_h) * height / new_h)


def _check_processor_count(processor: Any, patch: int) -> None:
    """The processor counts a tile as ``side**2 + num_additional_image_tokens`` tokens, less one when its strategy
    is ``"default"``; the model fills ``side**2`` (the CLS token dropped). Refuse a processor that disagrees."""
    proc_patch = getattr(processor, "patch_size", None)
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    dropped = int(getattr(processor, "vision_feature_select_strategy", None) == "default")
    if proc_patch != patch or extra != dropped:
        raise ValueError(f"the processor (patch_size {proc_patch}, num_additional_image_tokens {extra}, strategy "
                         f"{getattr(processor, 'vision_feature_select_strategy', None)!r}) does not expand <image> into the tokens the "
                         f"model fills (patch {patch}, CLS dropped); load both with lineofsight.models.load_vlm")


def format_prompt(processor: Any, question: str, image: bool = True) -> str:
    """``question`` in the model's prompt format, ready for ``processor(text=..., images=...)``.

    Uses the processor's chat template when it has one (for llava-v1.6-mistral this gives
    ``[INST] <image>\\nWhat is shown in this image? [/INST]``); otherwise the LLaVA-NeXT-Mistral
    form :data:`MISTRAL_PROMPT`. ``image=False`` formats a text-only turn.
    """
    image_token = getattr(processor, "image_token", None) or "<image>"
    if getattr(processor, "chat_template", None):
        content: list[dict[str, str]] = [{"type": "image"}] if image else []
        content.append({"type": "text", "text": question})
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    if image:
        return MISTRAL_PROMPT.format(image=image_token, question=question)
    return MISTRAL_TEXT_PROMPT.format(question=question)


def answer_token_ids(processor: Any, prompt: str, answer: str) -> list[int]:
    """The token ids of ``answer`` exactly as the model writes it after ``prompt`` (a string from
    :func:`format_prompt`), without EOS: what teacher forcing appends to score the answer.

    The assistant turn is read off the processor's chat template (render a turn, keep what precedes the
    content: ``" "`` for LLaVA-NeXT-Mistral, whose turn is ``" " + answer + "</s>"``), else the
    :data:`MISTRAL_PROMPT` turn ``" " + answer``. The ids are those of ``prompt + turn`` past the ids of
    ``prompt`` alone (no special tokens added to either), so "goldfish" after ``[/INST]`` is the Mistral tokens
    ``▁gold``, ``fish``, not those of "goldfish" tokenized alone at the start of a text (``▁gold`` is not
    ``gold``). A one-letter answer ("A") works the same way.

    Raises:
        ValueError: naming ``answer``, when ``prompt``'s ids are not a prefix of the answered text's (the
            answer's first token merges with the prompt's last), the answer adds no token, or the tokenizer
            writes an unknown token (the model could not write the answer).
    """
    tok = processor.tokenizer
    text = prompt + _assistant_prefix(processor) + answer
    asked = tok(prompt, add_special_tokens=False)["input_ids"]
    answered = tok(text, add_special_tokens=False)["input_ids"]
    if answered[: len(asked)] != asked or len(answered) == len(asked):
        raise ValueError(f"answer {answer!r}: its tokens after the prompt cannot be separated from the prompt's "
                         f"(the prompt's {len(asked)} ids are not a prefix of the answered text's)")
    ids = [int(i) for i in answered[len(asked) :]]
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(f"answer {answer!r}: the tokenizer has no token for part of it ({tok.unk_token!r})")
    return ids


def _assistant_prefix(processor: Any) -> str:
    """What the prompt format puts between the generation prompt and the answer's text (``" "`` in the
    LLaVA-NeXT-Mistral templates); read off the chat template by rendering a turn with a marker answer."""
    if not getattr(processor, "chat_template", None):
        return " "  # MISTRAL_PROMPT ends with [/INST]; the model answers " " + answer
    marker = "\ue000answer\ue000"
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    asked = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    turn = processor.apply_chat_template(
        [*user, {"role": "assistant", "content": [{"type": "text", "text": marker}]}], tokenize=False)
    if not turn.startswith(asked) or marker not in turn[len(asked) :]:
        raise ValueError("the processor's chat template does not render an assistant turn after its generation "
                         "prompt; cannot tell how the model's answer starts")
    return turn[len(asked) :].split(marker)[0]


def position_ids(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids counted over each row's real tokens, so a left-padded row gets the positions it
    would have alone (a forward without them numbers the pads too and shifts every rotary angle)."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The last hidden states ``[B, T, D]`` (the final norm's output, what the output embedding reads), from a
    forward that computes logits for the last position only (``logits_to_keep=1``; for losses on a few
    positions: :func:`lineofsight.metrics.caption_token_nll`). Not stopped by an exception at the output
    embedding: measured, that path held about 0.8 GB more at the peak of a 7-way fork at the real width."""
    import inspect

    from lineofsight.hooks import Trace

    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with Trace(model, final_norm_name(model), retain_output=True) as trace:
        model(**inputs, use_cache=False, **keep)
    return trace.output


def vlm_inputs(model: nn.Module, processor: Any, images: list[Any], prompts: list[str]) -> dict[str, Any]:
    """Model inputs for a batch of (image, prompt) rows, on the model's device.

    Steering sweeps repeat images and prompts: a batch of the rollouts' work units is typically one
    image, the paper's ten questions and many strengths ``k``. Here each distinct image object
    (by identity) is preprocessed and sent through the vision tower once, whatever the number of
    prompts and strengths it comes with, and each distinct (image, prompt) pair is tokenized once;
    the rows index into the results. Each prompt holds exactly one ``processor.image_token``.

    Returns ``input_ids`` and ``attention_mask`` (left padding if the tokenizer pads left), plus
    either ``mm_encoder_outputs`` (the image features, one entry per row, which transformers'
    LLaVA forward takes instead of pixels; the features can be reused for several forwards) or,
    for a model whose forward does not take them, ``pixel_values``/``image_sizes`` per row.
    Either way ``model(**inputs)`` computes what ``model(**processor(text=prompts,
    images=images))`` does, with the same ``input_ids`` and ``attention_mask``.
    """
    import inspect

    import torch

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; vlm_inputs takes one image per row")
    bad = [p for p in prompts if p.count(processor.image_token) != 1]
    if bad:
        raise ValueError(f"each prompt needs exactly one {processor.image_token!r}; got {bad[0]!r}")
    image_ids: dict[int, int] = {}
    image_of_row = [image_ids.setdefault(id(image), len(image_ids)) for image in images]
    pair_ids: dict[tuple[int, str], int] = {}
    pair_of_row = [pair_ids.setdefault((i, prompt), len(pair_ids)) for i, prompt in zip(image_of_row, prompts)]
    first_row_of_image = [image_of_row.index(i) for i in range(len(image_ids))]
    first_row_of_pair = [pair_of_row.index(u) for u in range(len(pair_ids))]

    pixels, n_image_tokens = _preprocess_images_once(model, processor, [images[r] for r in first_row_of_image],
                                                     [prompts[r] for r in first_row_of_image])
    # The processor's text path: each <image> becomes n_image_tokens[i] copies of itself, then the
    # tokenizer (with the processor's text kwargs: only return_tensors and padding here).
    texts = [prompts[r].replace(processor.image_token, processor.image_token * n_image_tokens[image_of_row[r]])
             for r in first_row_of_pair]
    text = processor.tokenizer(texts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    pair_index, image_index = torch.tensor(pair_of_row), torch.tensor(image_of_row)
    inputs: dict[str, Any] = {"input_ids": text["input_ids"][pair_index].to(device),
                              "attention_mask": text["attention_mask"][pair_index].to(device)}
    pixel_values = pixels["pixel_values"].to(device, model.dtype)
    image_kw = {"image_sizes": pixels["image_sizes"].to(device)} if "image_sizes" in pixels else {}
    takes_features = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
    if takes_features and hasattr(model, "get_image_features"):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        with torch.no_grad():
            per_image = model.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kw).pooler_output
        inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[per_image[i] for i in image_of_row])}
    else:
        inputs["pixel_values"] = pixel_values[image_index.to(device)]
        inputs.update({name: value[image_index.to(device)] for name, value in image_kw.items()})
    return inputs


def _preprocess_images_once(model: nn.Module, processor: Any, images: list[Any],
                            prompts: list[str]) -> tuple[dict[str, Any], list[int]]:
    """One processor call on distinct ``images`` (each with one of its prompts): the image
    processor's outputs, and how many image tokens the processor expands each image's
    ``<image>`` into (LLaVA-NeXT: depends on the image size).

    The count is read off the processor's own ``input_ids`` rather than recomputed from its
    private token-count helper (``_get_num_multimodal_tokens``, which reads ``size`` where
    ``__call__`` reads the processed pixels), so it is exact for any processor that expands the
    placeholder by repetition."""
    out = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    n_image_tokens = (out["input_ids"] == image_token_id(model)).sum(1).tolist()
    return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}, n_image_tokens


def mlp_output_directions(model: nn.Module, block: int) -> torch.Tensor:
    """The output directions of decoder block ``block``'s MLP neurons: the columns of its down-projection
    (the ``Linear`` from ``intermediate_size`` to ``hidden_size``; ``down_proj`` in Mistral, Llama and Qwen2
    blocks), as unit-norm rows ``[d_mlp, d_model]`` in float32 on the weights' device.

    Neuron ``j`` of block ``block`` adds ``act_j * W_down[:, j]`` to the residual, so these directions span what
    the block's MLP writes into the residual stream at layer ``block + 1``. Found by structure (the one Linear of
    that shape in the block, or the one named ``down_proj`` among several); :class:`UserError` otherwise.
    """
    import torch.nn as nn
    import torch.nn.functional as F

    names = layer_names(model)
    if not 0 <= block < len(names):
        raise UserError(f"decoder block {block} does not exist: this model has blocks 0..{len(names) - 1}")
    cfg = text_config(model)
    d_mlp, d_model = getattr(cfg, "intermediate_size", None), cfg.hidden_size
    found = [(name, m) for name, m in model.get_submodule(names[block]).named_modules()
             if isinstance(m, nn.Linear) and m.in_features == d_mlp and m.out_features == d_model]
    if len(found) > 1:
        found = [(name, m) for name, m in found if name.rpartition(".")[2] == "down_proj"]
    if len(found) != 1:
        raise UserError(f"cannot find the MLP output projection of {type(model).__name__}'s block {block}: "
                        f"expected one Linear from intermediate_size {d_mlp} to hidden_size {d_model} (a down_proj)")
    return F.normalize(found[0][1].weight.detach().float().T, dim=-1)
