"""Load vision-language models and answer structural questions about them.

This is the one module that knows how transformers lays out a vision-language model: LLaVA-NeXT, LLaVA-1.5,
LLaVA-OneVision, Qwen2.5-VL, Gemma 3 and Idefics3 (:data:`FAMILIES`; :func:`family` -- what differs between them).
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
- :func:`format_prompt` -- a question in the model's prompt format (its chat template); :func:`assistant_prefix`
  -- what precedes the model's answer; :func:`answer_token_ids` -- the ids of an answer exactly as the model writes
  it after such a prompt (what teacher forcing appends); :func:`image_placeholder` / :func:`image_prompt` -- the text
  of one image in a prompt, and the image alone.
- :func:`processor_inputs` -- the processor's call for (prompt, image) rows; :func:`collate_inputs` -- single rows'
  processor outputs batched exactly as one call would; :func:`prompt_positions` -- position ids for a cached prefill
  (Qwen2.5-VL's 3-D M-RoPE ids included).
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
import functools
import itertools
import math
import os
import re
from collections.abc import Sequence
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
    "FAMILIES",
    "Family",
    "ImageTokenLayout",
    "PatchGrid",
    "SUPPORTED_MODEL_TYPES",
    "Dtype",
    "answer_token_ids",
    "assistant_prefix",
    "check_layer",
    "check_model",
    "TOKEN_KEYS",
    "collate_inputs",
    "family",
    "final_norm_gain",
    "final_norm_name",
    "format_prompt",
    "image_token_id",
    "image_token_layout",
    "image_placeholder",
    "image_prompt",
    "image_token_mask",
    "layer_names",
    "load_vlm",
    "mlp_output_directions",
    "n_layers",
    "position_ids",
    "processor_inputs",
    "prompt_positions",
    "residual_site",
    "resolve_model_path",
    "text_config",
    "vlm_inputs",
]

Dtype = Literal["float32", "bfloat16", "float16"]
"""A model or storage dtype, as every script's ``--dtype`` / ``--save-dtype`` spells it."""
DTYPES: tuple[str, ...] = get_args(Dtype)



@dataclasses.dataclass(frozen=True)
class Family:
    """A supported vision-language model family: what differs between them, spelled once."""

    model_type: str
    """``config.json``'s ``model_type``."""
    name: str
    """How people call it (``"Qwen2.5-VL"``)."""
    class_name: str
    """The transformers class that loads it (``transformers.<class_name>``)."""
    mrope: bool = False
    """Position ids are 3-D (M-RoPE) and computed by the model from the image grids (``get_rope_index``): never
    pass 1-D ``position_ids``."""
    norm_offset: float = 0.0
    """The final RMSNorm multiplies by ``norm_offset + weight`` (Gemma: ``1 + weight``)."""
    image_markers: tuple[str, str] = ("", "")
    """Text the chat template writes around the placeholder for an image (Qwen2.5-VL's ``<|vision_start|>`` and
    ``<|vision_end|>``; the other families' processors add their markers themselves): see :func:`image_prompt`."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration"),
    Family("llava", "LLaVA-1.5", "LlavaForConditionalGeneration"),
    Family("llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration"),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", mrope=True,
           image_markers=("<|vision_start|>", "<|vision_end|>")),
    Family("gemma3", "Gemma 3", "Gemma3ForConditionalGeneration", norm_offset=1.0),
    Family("idefics3", "Idefics3", "Idefics3ForConditionalGeneration"),
)}
"""The supported families by ``model_type``."""
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
"""``model_type`` values of the configs this project loads."""


def family(model_or_config: Any) -> Family:
    """The :class:`Family` of a model (or its config); ValueError naming the supported ones otherwise."""
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"a {model_type!r} model is not supported; {_supported_text()}")
    return FAMILIES[model_type]


def _supported_text() -> str:
    return "supported families: " + ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())

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
        raise UserError(f"--model {model} is a {model_type!r} model (config.json model_type); {_supported_text()}")
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
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        except (ImportError, AttributeError, OSError) as err:  # a video processor without torchvision
            processor = _image_only_processor(source, config.model_type, err)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
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

    return getattr(transformers, FAMILIES[model_type].class_name)  # check_model admits only SUPPORTED_MODEL_TYPES


_VIDEO_PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "llava_onevision": "LlavaOnevisionProcessor"}
"""Families whose processor also holds a video processor, which transformers builds only with torchvision."""


@functools.cache
def image_only_processor_class(model_type: str) -> type:
    """The processor class of a family in :data:`_VIDEO_PROCESSORS`, without its video processor: what
    :func:`load_vlm` uses where torchvision is not installed (transformers' video processors need it; images and
    text need nothing of them). Same name, same image and text behaviour, saved as the real class."""
    import inspect

    import transformers

    base = getattr(transformers, _VIDEO_PROCESSORS[model_type])
    # The base's signature without video_processor: transformers reads the sub-processors and the settings it saves
    # (num_image_tokens, ...) off the constructor's signature.
    signature = inspect.signature(base.__init__)
    signature = signature.replace(parameters=[p for name, p in signature.parameters.items()
                                              if name != "video_processor"])

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        extra = next((arguments.pop(p.name) for p in signature.parameters.values()
                      if p.kind is inspect.Parameter.VAR_KEYWORD and p.name in arguments), {})
        base.__init__(arguments.pop("self"), video_processor=None, **arguments, **extra)

    __init__.__signature__ = signature  # type: ignore[attr-defined]

    def check_argument_for_proper_class(self: Any, name: str, argument: Any) -> Any:
        if name == "video_processor" and argument is None:
            return None
        return base.check_argument_for_proper_class(self, name, argument)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "check_argument_for_proper_class": check_argument_for_proper_class})


def _image_only_processor(source: str, model_type: str, err: Exception) -> Any:
    """The processor of ``source`` without a video processor (:func:`image_only_processor_class`); re-raises the
    loading error where torchvision is installed or the family has no video processor."""
    import importlib.util

    from transformers import AutoImageProcessor, AutoTokenizer

    if model_type not in _VIDEO_PROCESSORS or importlib.util.find_spec("torchvision") is not None:
        raise err
    cls = image_only_processor_class(model_type)
    settings, _ = cls.get_processor_dict(source)
    kwargs = {k: v for k, v in settings.items() if k not in ("image_processor", "video_processor", "processor_class",
                                                             "tokenizer", "auto_map")}
    return cls(image_processor=AutoImageProcessor.from_pretrained(source, trust_remote_code=False),
               tokenizer=AutoTokenizer.from_pretrained(source, trust_remote_code=False), **kwargs)


def _fix_processor(processor: Any, model: nn.Module) -> None:
    """Make the processor's image-token count agree with the model.

    With the ``default`` feature strategy the CLIP tower's CLS token is dropped after being
    counted, so the processor needs ``num_additional_image_tokens=1``; old processor configs
    lack it and expand ``<image>`` one token short.
    """
    cfg = model.config
    if cfg.model_type not in ("llava_next", "llava"):
        return
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
    """The per-channel scale ``[d_model]`` the final norm applies after normalising (its ``weight``, or Gemma's
    ``1 + weight``: :attr:`Family.norm_offset`; None for a norm without one): what a residual direction is
    multiplied by on its way to the unembedding (the logit lens)."""
    weight = getattr(model.get_submodule(final_norm_name(model)), "weight", None)
    if weight is None:
        return None
    offset = FAMILIES[model.config.model_type].norm_offset if model.config.model_type in FAMILIES else 0.0
    return weight.detach() + offset if offset else weight.detach()


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
    into the image's feature positions, in token order, and the pixel box each grid covers (what the feature
    browser draws heatmaps with). A token's index is its rank among the image's positions in
    :func:`image_token_mask`; family markers (``<|vision_start|>``, ``<start_of_image>``, ``<row_1_col_1>``) are not
    among them.

    ``image_size`` = ``(width, height)`` of the image as given to the processor (PIL ``.size``). Per family:

    - LLaVA-NeXT (anyres, transformers' ``LlavaNextModel.pack_image_features``): the base tile (the image squashed to
      one tile, ``side x side`` tokens), then the crop grid of the best resolution of ``image_grid_pinpoints`` with
      the rows or columns that show only padding removed (``unpad_image``), row-major with one newline token after
      each row. The image processor resizes the image keeping its aspect ratio to fit the best resolution and pads
      it centred (any odd pixel after), so the crop grid's box is the region its remaining cells cover, mapped back
      to the image and clipped to it. LLaVA-1.5: one base grid over the image processor's centre crop, no newlines.
    - LLaVA-OneVision: :func:`_onevision_layout`; Qwen2.5-VL: :func:`_qwen2_5_vl_layout`; Gemma 3:
      :func:`_gemma3_layout`; Idefics3: :func:`_idefics3_layout`.

    Raises:
        ValueError: (one line) an unsupported model type; settings a family's layout does not model (LLaVA: a
            ``vision_feature_select_strategy`` other than ``"default"`` -- ``"full"`` keeps the CLS token, which
            covers no patch --, a model without ``image_newline``, a processor that expands ``<image>`` into a
            different number of tokens than the model fills, or whose resize/crop/pinpoint settings do not match
            the vision tower's tile; the others: see their functions).
    """
    import torch
    from torch import nn

    cfg = getattr(model_or_config, "config", model_or_config)
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image_size {tuple(image_size)} is not a (width, height) of a non-empty image")
    model_type = family(cfg).model_type
    if model_type not in ("llava", "llava_next"):
        return _LAYOUTS[model_type](model_or_config, processor, width, height)
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
    image_processor = processor.image_processor
    if _resize_square(image_processor) != tile or _crop_square(image_processor) != tile:
        raise ValueError(f"the image processor's size {image_processor.size} and crop_size "
                         f"{image_processor.crop_size} are not the vision tower's {tile}x{tile} tile")
    geometry = _anyres_canvas(cfg, processor, width, height, tile, side)
    (r0, r1), (c0, c1), (left, top, new_w, new_h) = geometry.rows, geometry.cols, geometry.image
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


def _qwen2_5_vl_layout(model_or_config: Any, processor: Any, width: int, height: int) -> ImageTokenLayout:
    """Qwen2.5-VL: the image processor resizes the whole image (no crop, no padding) to ``smart_resize``'s size: each
    side a multiple of ``patch_size * merge_size``, the area within ``[min_pixels, max_pixels]`` (``size``'s
    ``shortest_edge`` / ``longest_edge``), the aspect ratio kept as well as that allows. The vision tower cuts
    ``patch_size`` patches; its merger makes each ``merge_size x merge_size`` block one token. The tower reorders
    the blocks into attention windows (``get_vision_window_index``) and restores the order after the merger, so the
    tokens are the merged cells in raster order: one grid ``"base"`` over the whole image. ValueError: the image
    processor's patch / merge / temporal sizes differ from the tower's, or it does not resize; an aspect ratio
    ``smart_resize`` refuses (over 200)."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cfg = getattr(model_or_config, "config", model_or_config)
    vision, ip = cfg.vision_config, processor.image_processor
    for name, ours in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                       ("temporal_patch_size", "temporal_patch_size")):
        if int(getattr(ip, name)) != int(getattr(vision, ours)):
            raise ValueError(f"the image processor's {name} {getattr(ip, name)} differs from the vision tower's "
                             f"{ours} {getattr(vision, ours)}")
    if not getattr(ip, "do_resize", True):
        raise ValueError("a Qwen2.5-VL image processor with do_resize=False is not supported")
    factor = int(ip.patch_size) * int(ip.merge_size)
    try:
        new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=_size_field(ip.size, "shortest_edge"),
                                    max_pixels=_size_field(ip.size, "longest_edge"))
    except ValueError as err:
        raise ValueError(_first_line(err)) from None
    rows, cols = new_h // factor, new_w // factor
    grid = PatchGrid("base", (0.0, 0.0, float(width), float(height)), (rows, cols), torch.arange(rows * cols))
    return ImageTokenLayout(rows * cols, (grid,), torch.zeros(0, dtype=torch.long))


def _gemma3_layout(model_or_config: Any, processor: Any, width: int, height: int) -> ImageTokenLayout:
    """Gemma 3: the image processor squashes the whole image to the vision tower's square tile (aspect ratio not
    kept); SigLIP cuts ``image_size / patch_size`` patches a side and the projector average-pools them into a
    ``sqrt(mm_tokens_per_image)``-a-side grid, row-major: one grid ``"base"`` over the whole image,
    ``mm_tokens_per_image`` (256) tokens whatever the image. ``\\n\\n<start_of_image>`` and ``<end_of_image>\\n\\n``
    around them are text. With pan and scan (off unless ``processor.images_kwargs["do_pan_and_scan"]``; a call's
    ``do_pan_and_scan=True`` is not visible here) each crop adds one ``"crops"`` grid over its box, after the base.
    ValueError: pooling that does not divide the patch grid; a processor whose ``image_seq_length`` or resize
    differs from the model's."""
    import torch

    cfg = getattr(model_or_config, "config", model_or_config)
    tile, patch = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size)
    n = int(cfg.mm_tokens_per_image)
    side = math.isqrt(n)
    if tile % patch or side * side != n or (tile // patch) % side:
        raise ValueError(f"vision tile {tile} / patch {patch} does not pool evenly into mm_tokens_per_image {n}")
    if int(getattr(processor, "image_seq_length", -1)) != n:
        raise ValueError(f"the processor's image_seq_length {getattr(processor, 'image_seq_length', None)} differs "
                         f"from the model's mm_tokens_per_image {n}")
    ip = processor.image_processor
    if not getattr(ip, "do_resize", True) or (_size_field(ip.size, "height"), _size_field(ip.size, "width")) != (
            tile, tile):
        raise ValueError(f"the image processor does not resize to the vision tower's {tile}x{tile} tile")
    images_kwargs = dict(getattr(processor, "images_kwargs", None) or {})
    boxes = [(0.0, 0.0, float(width), float(height))]
    if images_kwargs.get("do_pan_and_scan"):
        boxes += _gemma3_pan_and_scan_boxes(width, height, int(images_kwargs["pan_and_scan_min_crop_size"]),
                                            int(images_kwargs["pan_and_scan_max_num_crops"]),
                                            float(images_kwargs["pan_and_scan_min_ratio_to_activate"]))
    grids = tuple(PatchGrid("base" if i == 0 else "crops", box, (side, side), torch.arange(n) + i * n)
                  for i, box in enumerate(boxes))
    return ImageTokenLayout(n * len(boxes), grids, torch.zeros(0, dtype=torch.long))


def _gemma3_pan_and_scan_boxes(width: int, height: int, min_crop: int, max_crops: int,
                               min_ratio: float) -> list[tuple[float, float, float, float]]:
    """The crops Gemma 3's image processor cuts from a ``width x height`` image when pan and scan is on
    (``Gemma3ImageProcessorPil.pan_and_scan``: 2..max_crops equal crops along the long side of an image at least
    ``min_ratio`` times longer than wide, none when a crop would be under ``min_crop`` pixels), as boxes in
    original pixels, in the processor's order (row-major); the last crop is clipped at the image edge."""
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = min(max_crops, max(2, min(int(math.floor(width / min_crop)), int(math.floor(width / height + 0.5)))))
        n_h = 1
    else:
        if height / width < min_ratio:
            return []
        n_h = min(max_crops, max(2, min(int(math.floor(height / min_crop)), int(math.floor(height / width + 0.5)))))
        n_w = 1
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop:
        return []
    return [(float(x), float(y), float(min(x + crop_w, width)), float(min(y + crop_h, height)))
            for y, x in itertools.product([crop_h * i for i in range(n_h)], [crop_w * i for i in range(n_w)])]


_IDEFICS3_MAX_SIZE = 4096  # transformers' Idefics3 image processors: the absolute cap of the first resize


def _idefics3_tiles(processor: Any, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    """``(rows, cols, h1, w1, h2, w2)`` of Idefics3's tiling of a ``width x height`` image: ``rows x cols`` tiles of
    the ``h2 x w2`` resize of the ``h1 x w1`` first resize (``rows = cols = 0``: not split, one tile of the whole
    image). The image processor resizes the whole image (no crop, no padding): (1) ``do_resize``: the longest
    edge to ``size["longest_edge"]`` (up or down), the other ``int`` of the kept aspect ratio made even, capped at
    4096; (2) ``do_image_splitting``: each edge up to a multiple of the tile ``max_image_size["longest_edge"]`` (the
    short edge from the long one's aspect, so the aspect changes by up to a tile); (3) tiles row-major when an edge
    exceeds one tile, then the whole image squashed to one tile (the global image). The processor's own count helpers
    (``get_number_of_image_patches``) get (2) wrong when ``longest_edge`` is not a multiple of the tile."""
    ip = processor.image_processor
    tile = _size_field(ip.max_image_size, "longest_edge")
    h, w = height, width
    if getattr(ip, "do_resize", True):
        longest = _size_field(ip.size, "longest_edge")
        if longest is None:
            raise ValueError(f"Idefics3 image processor size {ip.size} has no longest_edge")
        aspect = w / h
        if w >= h:
            w = longest
            h = int(w / aspect)
            h += h % 2
        else:
            h = longest
            w = int(h * aspect)
            w += w % 2
        h, w = max(h, 1), max(w, 1)
        aspect = w / h
        if w >= h and w > _IDEFICS3_MAX_SIZE:
            w, h = _IDEFICS3_MAX_SIZE, int(_IDEFICS3_MAX_SIZE / aspect)
        elif h > w and h > _IDEFICS3_MAX_SIZE:
            h, w = _IDEFICS3_MAX_SIZE, int(_IDEFICS3_MAX_SIZE * aspect)
        h, w = max(h, 1), max(w, 1)
    h1, w1 = h, w
    if not getattr(ip, "do_image_splitting", True):
        return 0, 0, h1, w1, h, w
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    if h > tile or w > tile:
        return h // tile, w // tile, h1, w1, h, w
    return 0, 0, h1, w1, h, w


def _idefics3_layout(model_or_config: Any, processor: Any, width: int, height: int) -> ImageTokenLayout:
    """Idefics3: the tiles of :func:`_idefics3_tiles` (``<fake_token_around_image><row_r_col_c>`` and the tile's
    image tokens each, a ``"\\n"`` after each row of tiles), then the global image (``<global-img>``). Inside a tile
    SigLIP cuts ``side x side`` patches and the connector's pixel shuffle stacks each ``s x s`` block into one token
    (``s = scale_factor``), row-major. Grids: one ``"crops"`` grid per tile (its part of the image), in tile order,
    then ``"base"`` (the global image). The markers and the ``"\\n"`` are text, not image positions. ValueError: a tile (``max_image_size``) other than the tower's
    ``image_size``; a patch grid the pixel shuffle cannot tile; a processor ``image_seq_len`` other than the tokens
    the connector makes per tile."""
    import torch

    cfg = getattr(model_or_config, "config", model_or_config)
    tower, patch, scale = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size), int(cfg.scale_factor)
    if tower % patch or (tower // patch) % scale:
        raise ValueError(f"vision image_size {tower} / patch_size {patch} is not a whole number of "
                         f"{scale}x{scale} pixel-shuffle blocks")
    side = tower // patch // scale
    n_seq = side * side
    if int(processor.image_seq_len) != n_seq:
        raise ValueError(f"the processor's image_seq_len {processor.image_seq_len} is not the {n_seq} tokens the "
                         "connector makes per tile")
    tile = _size_field(processor.image_processor.max_image_size, "longest_edge")
    if tile != tower:
        raise ValueError(f"the image processor's tiles (max_image_size {tile}) are not the vision tower's "
                         f"{tower}x{tower} input")
    rows, cols, _, _, h2, w2 = _idefics3_tiles(processor, width, height)
    grids = []
    for r in range(rows):
        for c in range(cols):  # tile (r, c): pixels [rT, (r+1)T) x [cT, (c+1)T) of the h2 x w2 resize
            box = (width * c * tile / w2, height * r * tile / h2, width * (c + 1) * tile / w2,
                   height * (r + 1) * tile / h2)
            grids.append(PatchGrid("crops", box, (side, side), len(grids) * n_seq + torch.arange(n_seq)))
    grids.append(PatchGrid("base", (0.0, 0.0, float(width), float(height)), (side, side),
                           len(grids) * n_seq + torch.arange(n_seq)))
    return ImageTokenLayout(len(grids) * n_seq, tuple(grids), torch.zeros(0, dtype=torch.long))


def _max_patches(aspect: Any) -> int:
    """``vision_aspect_ratio`` ``"anyres_max_N"`` -> N (transformers parses it with ``int(s.strip("anyres_max_"))``)."""
    found = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if found is None:
        raise ValueError(f"vision_aspect_ratio {aspect!r} is not supported (expected 'anyres_max_N')")
    return int(found.group(1))


def _onevision_layout(model_or_config: Any, processor: Any, width: int, height: int) -> ImageTokenLayout:
    """LLaVA-OneVision: the image tokens of one image alone in its prompt (``batch_num_images == 1``), in token order
    (transformers' ``LlavaOnevisionModel.pack_image_features``):

    1. the base tile: the whole image squashed to the tower's ``T x T`` tile, ``side x side`` tokens row-major
       (``side = T // patch``; SigLIP's strided conv reads ``side * patch`` pixels of the tile: 378 of 384 in the
       real model, so the base grid covers the image's top-left ``378/384`` in each direction); no newline;
    2. the anyres crop grid: the best resolution of ``image_grid_pinpoints`` (``select_best_resolution``), the image
       resized into it keeping its aspect ratio and pasted centred (``get_patch_output_size``, ``_pad_for_patching``),
       cut into ``T x T`` tiles whose ``side x side`` patches form one ``(rows_t * side) x (cols_t * side)`` grid;
       the rows (or columns) that show only padding are dropped (``unpad_image``, ``int(round(x, 7))``), then, when
       ``ratio = sqrt(h * w / (N * side**2)) > 1.1`` (``vision_aspect_ratio = "anyres_max_N"``), the ``h x w`` grid
       is resized bilinearly to ``int(h // ratio) x int(w // ratio)``; each row is followed by one ``image_newline``.

    Grids: ``"base"``; then without the downsampling one ``"crops"`` grid per tile (its kept patches: exact, the
    strip of each tile that no patch reads lies between grids; a first/last kept row or column that reaches past the
    image is a grid of its own, so that clipping it to the image moves no other cell); with it one ``"crops"`` grid
    of the downsampled shape over the kept patches' span (approximate: a bilinear cell mixes the two nearest source
    rows/columns, and the unseen strips are spread over the cells). Boxes are in original pixels, clipped to the image.

    Raises:
        ValueError: (one line) a model type other than ``llava_onevision``; a strategy other than ``"full"`` (SigLIP
            has no CLS token: ``"default"`` drops a patch and the packing fails); a processor that counts other
            tokens than the model fills (``num_image_tokens != side**2``, another strategy or aspect ratio), or
            whose resize/pinpoints are not the tower's tile.
    """
    import torch

    cfg = getattr(model_or_config, "config", model_or_config)
    strategy = cfg.vision_feature_select_strategy
    if strategy != "full":
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported: LLaVA-OneVision's SigLIP has "
                         "no CLS token, only 'full' keeps every patch")
    tile, patch = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size)
    side = tile // patch  # SigLIP's conv (stride = patch) reads side * patch pixels of each tile
    seen = side * patch
    n_base = side * side
    max_patches = _max_patches(cfg.vision_aspect_ratio)
    proc_tokens = getattr(processor, "num_image_tokens", None)
    proc_strategy = getattr(processor, "vision_feature_select_strategy", None)
    if proc_tokens != n_base or proc_strategy not in (None, "full"):
        raise ValueError(f"the processor (num_image_tokens {proc_tokens}, strategy {proc_strategy!r}) does not expand "
                         f"<image> into the tokens the model fills ({side}x{side} patches a tile, strategy 'full')")
    if _max_patches(getattr(processor, "vision_aspect_ratio", None)) != max_patches:
        raise ValueError(f"the processor's vision_aspect_ratio {processor.vision_aspect_ratio!r} differs from the "
                         f"model's {cfg.vision_aspect_ratio!r}")
    image_processor = processor.image_processor
    size, crop = image_processor.size, getattr(image_processor, "crop_size", None)
    resize = (_size_field(size, "height"), _size_field(size, "width"))
    cut = _size_field(crop, "height") if crop is not None else None
    if resize != (tile, tile) or (cut or tile) != tile or getattr(image_processor, "do_center_crop", None):
        raise ValueError(f"the image processor's size {size} / crop_size {crop} is not the vision tower's "
                         f"{tile}x{tile} tile")
    geometry = _anyres_canvas(cfg, processor, width, height, tile, side)
    (r0, r1), (c0, c1), (left, top, new_w, new_h) = geometry.rows, geometry.cols, geometry.image

    def canvas(k: int) -> int:
        """Canvas pixel where global patch row/column ``k`` starts (``k == side * n``: the end of tile n-1's
        patches is given by ``canvas(k - 1) + patch``)."""
        return k // side * tile + k % side * patch

    def box(ra: int, rb: int, ca: int, cb: int) -> tuple[float, float, float, float]:
        """Original-pixel box of patch rows ra..rb-1, columns ca..cb-1 (canvas span from the first's start to the
        last's end), clipped to the image."""
        x0, x1 = canvas(ca), canvas(cb - 1) + patch
        y0, y1 = canvas(ra), canvas(rb - 1) + patch
        return (min(max((x0 - left) * width / new_w, 0.0), float(width)),
                min(max((y0 - top) * height / new_h, 0.0), float(height)),
                min(max((x1 - left) * width / new_w, 0.0), float(width)),
                min(max((y1 - top) * height / new_h, 0.0), float(height)))

    rows, cols = r1 - r0, c1 - c0
    ratio = math.sqrt(rows * cols / (max_patches * side**2))
    downsampled = ratio > 1.1
    if downsampled:  # nn.functional.interpolate(..., [int(h // ratio), int(w // ratio)], mode="bilinear")
        rows, cols = int(rows // ratio), int(cols // ratio)
    row_starts = n_base + torch.arange(rows) * (cols + 1)  # each row: cols cells, then its newline
    base = PatchGrid("base", (0.0, 0.0, width * seen / tile, height * seen / tile), (side, side),
                     torch.arange(n_base))
    grids = [base]
    if downsampled:
        tokens = (row_starts[:, None] + torch.arange(cols)[None, :]).flatten()
        grids.append(PatchGrid("crops", box(r0, r1, c0, c1), (rows, cols), tokens))
    else:
        # A grid per tile; the first/last kept row (column) apart when it reaches past the image, so that clipping
        # its cells to the image leaves the other cells' boxes exact.
        row_cuts = {r0, r1, *range((r0 // side + 1) * side, r1, side)}
        col_cuts = {c0, c1, *range((c0 // side + 1) * side, c1, side)}
        if canvas(r0) < top and r1 - r0 > 1:
            row_cuts.add(r0 + 1)
        if canvas(r1 - 1) + patch > top + new_h and r1 - r0 > 1:
            row_cuts.add(r1 - 1)
        if canvas(c0) < left and c1 - c0 > 1:
            col_cuts.add(c0 + 1)
        if canvas(c1 - 1) + patch > left + new_w and c1 - c0 > 1:
            col_cuts.add(c1 - 1)
        row_cuts, col_cuts = sorted(row_cuts), sorted(col_cuts)
        for ra, rb in zip(row_cuts, row_cuts[1:]):
            for ca, cb in zip(col_cuts, col_cuts[1:]):
                tokens = (row_starts[ra - r0 : rb - r0, None] + torch.arange(ca - c0, cb - c0)[None, :]).flatten()
                grids.append(PatchGrid("crops", box(ra, rb, ca, cb), (rb - ra, cb - ca), tokens))
    return ImageTokenLayout(n_base + rows * (cols + 1), tuple(grids), row_starts + cols)


_LAYOUTS = {"qwen2_5_vl": _qwen2_5_vl_layout, "gemma3": _gemma3_layout, "idefics3": _idefics3_layout,
            "llava_onevision": _onevision_layout}


@dataclasses.dataclass(frozen=True)
class _AnyresCanvas:
    """Where an image lies in LLaVA-NeXT / OneVision's anyres crop grid (:func:`_anyres_canvas`)."""

    rows: tuple[int, int]
    """``(r0, r1)``: the patch rows of the ``best_h x best_w`` canvas the model keeps (``unpad_image``)."""
    cols: tuple[int, int]
    """``(c0, c1)``: the kept patch columns."""
    image: tuple[int, int, int, int]
    """``(left, top, new_w, new_h)``: the resized image's place on the canvas, in canvas pixels."""


def _anyres_canvas(cfg: Any, processor: Any, width: int, height: int, tile: int, side: int) -> _AnyresCanvas:
    """The anyres geometry both LLaVA-NeXT and LLaVA-OneVision share: the best resolution of
    ``image_grid_pinpoints`` for the image, its tiles' ``side x side`` patches side by side with the rows (or
    columns) that show only padding removed (``unpad_image``; its ``int(round(x, 7))`` truncates, rounding only
    float noise: 35.9999999 -> 36), and where the image processor pastes the image resized keeping its aspect ratio
    (``get_patch_output_size``, then centred by ``_pad_for_patching``). ValueError: pinpoints that differ from the
    image processor's or are not multiples of the tile."""
    from transformers.image_processing_utils import select_best_resolution

    pinpoints = [[int(v) for v in point] for point in cfg.image_grid_pinpoints]
    processor_points = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if processor_points is None or [[int(v) for v in point] for point in processor_points] != pinpoints:
        raise ValueError(f"the image processor's image_grid_pinpoints {processor_points} differ from the model's "
                         f"{pinpoints}")
    if any(h % tile or w % tile for h, w in pinpoints):
        raise ValueError(f"image_grid_pinpoints {pinpoints} are not multiples of the tile size {tile}")
    best_h, best_w = select_best_resolution((height, width), pinpoints)  # pinpoints are [height, width]
    rows_full, cols_full = best_h // tile * side, best_w // tile * side  # the crop tiles' patches, side by side
    r0, r1, c0, c1 = 0, rows_full, 0, cols_full
    if width / height > cols_full / rows_full:
        pad = (rows_full - int(round(height * (cols_full / width), 7))) // 2
        r0, r1 = pad, rows_full - pad
    else:
        pad = (cols_full - int(round(width * (rows_full / height), 7))) // 2
        c0, c1 = pad, cols_full - pad
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * (best_w / width)), best_h)
    else:
        new_w, new_h = min(math.ceil(width * (best_h / height)), best_w), best_h
    return _AnyresCanvas((r0, r1), (c0, c1), ((best_w - new_w) // 2, (best_h - new_h) // 2, new_w, new_h))


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


def image_placeholder(processor: Any) -> str:
    """The text a prompt holds for one image, which the processor expands into the image's tokens: the processor's
    ``image_token`` (``<image>``, Qwen2.5-VL's ``<|image_pad|>``; Gemma 3's is ``<start_of_image>``, which it expands
    into ``<image_soft_token>`` x 256 between markers)."""
    return str(getattr(processor, "image_token", None) or "<image>")


def image_prompt(model: nn.Module, processor: Any) -> str:
    """A prompt of the image alone, outside any chat turn (the linear probes' default, as the paper's ``<image>``):
    the placeholder with the markers the family's template writes around it (:attr:`Family.image_markers`)."""
    before, after = family(model).image_markers
    return before + image_placeholder(processor) + after


def format_prompt(processor: Any, question: str, image: bool = True) -> str:
    """``question`` in the model's prompt format, ready for ``processor(text=..., images=...)``: one user turn (the
    image, then the question) and the generation prompt.

    Uses the processor's chat template when it has one (for llava-v1.6-mistral this gives
    ``[INST] <image>\\nWhat is shown in this image? [/INST]``); otherwise the LLaVA-NeXT-Mistral
    form :data:`MISTRAL_PROMPT`. ``image=False`` formats a text-only turn. A template that writes the BOS text
    itself (Gemma 3's ``<bos>``, Idefics3's ``<|begin_of_text|>``) loses it here when the tokenizer adds BOS on its
    own, as the processor's call does: the model then reads one BOS, as in training, not two.
    """
    if getattr(processor, "chat_template", None):
        content: list[dict[str, str]] = [{"type": "image"}] if image else []
        content.append({"type": "text", "text": question})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return _without_template_bos(processor.tokenizer, text)
    if image:
        return MISTRAL_PROMPT.format(image=image_placeholder(processor), question=question)
    return MISTRAL_TEXT_PROMPT.format(question=question)


def _without_template_bos(tokenizer: Any, text: str) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and getattr(tokenizer, "bos_token_id", None) is not None:
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        if added[:1] == [tokenizer.bos_token_id]:
            return text[len(bos) :]
    return text


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
    text = prompt + assistant_prefix(processor) + answer
    asked = tok(prompt, add_special_tokens=False)["input_ids"]
    answered = tok(text, add_special_tokens=False)["input_ids"]
    if answered[: len(asked)] != asked or len(answered) == len(asked):
        raise ValueError(f"answer {answer!r}: its tokens after the prompt cannot be separated from the prompt's "
                         f"(the prompt's {len(asked)} ids are not a prefix of the answered text's)")
    ids = [int(i) for i in answered[len(asked) :]]
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(f"answer {answer!r}: the tokenizer has no token for part of it ({tok.unk_token!r})")
    return ids


def assistant_prefix(processor: Any) -> str:
    """What the prompt format puts between the generation prompt and the answer's text (``" "`` in the
    LLaVA-NeXT-Mistral templates, nothing in Qwen2.5-VL's and Gemma 3's); read off the chat template by rendering a
    turn with a marker answer. A teacher-forced pass reads ``prompt + assistant_prefix(processor) + answer``."""
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


def prompt_positions(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Position ids of a (left-padded) prompt batch for a cached prefill: :func:`position_ids` ``[B, T]``, or for
    an M-RoPE family (:attr:`Family.mrope`, Qwen2.5-VL) the model's own 3-D ids ``[3, B, T]`` (temporal, height,
    width; image tokens at their grid cell, text after them one step at a time, from ``input_ids``,
    ``mm_token_type_ids``, ``image_grid_thw`` and the mask). Either way the next token's ids are
    ``positions[..., -1:] + 1`` (a prompt ends with text, whose components are equal), as ``generate`` counts."""
    if not family(model).mrope:
        return position_ids(inputs["attention_mask"])
    ids, _ = getattr(model, "model", model).get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"])
    return ids


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


TOKEN_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Processor outputs with one entry per token (``[B, T]``): padded, not concatenated, when rows are batched."""


def collate_inputs(tokenizer: Any, parts: Sequence[dict[str, torch.Tensor]],
                   padding_side: str = "right") -> dict[str, torch.Tensor]:
    """One batch from the processor's outputs for single rows (``processor(text=[t], images=[im])`` each), equal to
    what one batched call ``processor(text=texts, images=images, padding=True)`` gives, for every family:

    - token rows (:data:`TOKEN_KEYS`) padded to the longest on ``padding_side``: ``input_ids`` with the pad id,
      the masks and type ids with 0;
    - tiled pixels (``pixel_values [1, n_tiles, 3, H, W]`` of LLaVA-NeXT / OneVision / Idefics3 and Idefics3's
      ``pixel_attention_mask [1, n_tiles, H, W]``) zero-padded over the tiles (the image processors' own padding
      for batching; models drop or ignore all-zero tiles), then stacked;
    - the rest concatenated on dim 0 (LLaVA-1.5 / Gemma 3 pixels, ``image_sizes``, Qwen2.5-VL's flat patch rows
      ``pixel_values [n_patches, C*T*P*P]`` and ``image_grid_thw``).
    """
    import torch
    import torch.nn.functional as F

    width = max((int(part[key].shape[1]) for part in parts for key in TOKEN_KEYS if key in part), default=0)
    out = {}
    for key in parts[0]:
        xs = [part[key] for part in parts]
        if key in TOKEN_KEYS:
            pad = tokenizer.pad_token_id if key == "input_ids" else 0
            if pad is None:
                raise UserError(f"{type(tokenizer).__name__} has no pad token; cannot batch rows")
            xs = [F.pad(x, (0, width - x.shape[1]) if padding_side == "right" else (width - x.shape[1], 0), value=pad)
                  for x in xs]
        elif (key == "pixel_values" and xs[0].dim() == 5) or (key == "pixel_attention_mask" and xs[0].dim() == 4):
            n_tiles = max(int(x.shape[1]) for x in xs)
            xs = [F.pad(x, (0, 0) * (x.dim() - 2) + (0, n_tiles - x.shape[1])) for x in xs]
        out[key] = torch.cat(xs)
    return out


def vlm_inputs(model: nn.Module, processor: Any, images: list[Any], prompts: list[str]) -> dict[str, Any]:
    """Model inputs for a batch of (image, prompt) rows, on the model's device.

    Steering sweeps repeat images and prompts: a batch of the rollouts' work units is typically one
    image, the paper's ten questions and many strengths ``k``. Here each distinct image object
    (by identity) is preprocessed and sent through the vision tower once, whatever the number of
    prompts and strengths it comes with, and each distinct (image, prompt) pair is tokenized once;
    the rows index into the results. Each prompt holds exactly one :func:`image_placeholder`.

    The image's text (the placeholder expanded into its image tokens and the family's markers:
    :func:`_image_text`) is read off one processor call on the distinct images and checked: the first prompt of
    each image tokenizes to exactly the processor's ``input_ids``.

    Returns ``input_ids`` and ``attention_mask`` (left padding if the tokenizer pads left), the per-row inputs the
    family's forward still needs beside the features (Gemma 3's ``token_type_ids``, Qwen2.5-VL's
    ``image_grid_thw`` and ``mm_token_type_ids``), plus either ``mm_encoder_outputs`` (the image features, which
    transformers' forward takes instead of pixels; they can be reused for several forwards) or, for a model whose
    forward does not take them, the pixel inputs per row. Either way ``model(**inputs)`` computes what
    ``model(**processor(text=prompts, images=images))`` does, with the same ``input_ids`` and ``attention_mask``.
    """
    import inspect

    import torch

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; vlm_inputs takes one image per row")
    fam = family(model)
    placeholder = image_placeholder(processor)
    bad = [p for p in prompts if p.count(placeholder) != 1]
    if bad:
        raise ValueError(f"each prompt needs exactly one {placeholder!r}; got {bad[0]!r}")
    image_ids: dict[int, int] = {}
    image_of_row = [image_ids.setdefault(id(image), len(image_ids)) for image in images]
    pair_ids: dict[tuple[int, str], int] = {}
    pair_of_row = [pair_ids.setdefault((i, prompt), len(pair_ids)) for i, prompt in zip(image_of_row, prompts)]
    first_row_of_image = [image_of_row.index(i) for i in range(len(image_ids))]
    first_row_of_pair = [pair_of_row.index(u) for u in range(len(pair_ids))]

    distinct = [images[r] for r in first_row_of_image]
    parts = [dict(processor_inputs(processor, [prompts[r]], [image]).items())
             for r, image in zip(first_row_of_image, distinct)]
    image_texts = [_image_text(fam, processor, model, part, image.size) for part, image in zip(parts, distinct)]
    texts = [prompts[r].replace(placeholder, image_texts[image_of_row[r]]) for r in first_row_of_pair]
    tok = processor.tokenizer
    text = tok(texts, return_tensors="pt", padding=True)
    for i, r in enumerate(first_row_of_image):  # the expansion is the processor's own: same ids
        row = text["input_ids"][pair_of_row[r]][text["attention_mask"][pair_of_row[r]].bool()]
        if not torch.equal(row, parts[i]["input_ids"][0]):
            raise ValueError(f"{type(processor).__name__} tokenizes image {i}'s prompt differently from the expanded "
                             "text lineofsight.models builds for it; this processor version is not supported")
    device = next(model.parameters()).device
    pair_index, image_index = torch.tensor(pair_of_row), torch.tensor(image_of_row)
    inputs: dict[str, Any] = {"input_ids": text["input_ids"][pair_index].to(device),
                              "attention_mask": text["attention_mask"][pair_index].to(device)}
    is_image = inputs["input_ids"] == image_token_id(model)
    if fam.model_type == "gemma3":  # bidirectional attention within each image's soft tokens
        inputs["token_type_ids"] = is_image.long()
    if fam.mrope:  # M-RoPE positions are computed from the image grids and the image positions
        inputs["mm_token_type_ids"] = is_image.int()
    pixels = collate_inputs(tok, [{k: v for k, v in part.items() if k not in TOKEN_KEYS} for part in parts])
    pixels = {k: (v.to(device, model.dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in pixels.items()}
    per_row = {k: pixels[k][image_index.to(device)] for k in ("image_grid_thw",) if k in pixels}
    takes_features = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
    if takes_features and hasattr(model, "get_image_features"):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        with torch.no_grad():  # one entry per image (Gemma 3: per pixel_values row, the image and its crops)
            per_image = model.get_image_features(**pixels, return_dict=True).pooler_output
        if fam.model_type == "gemma3":
            per_image = torch.split(per_image, [int(part["pixel_values"].shape[0]) for part in parts])
        rows = [per_image[i] for i in image_of_row]
        features = torch.cat(rows) if fam.model_type == "gemma3" else rows
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        inputs.update(per_row)
    else:
        inputs.update(_pixels_per_row(fam, pixels, image_of_row))
    return inputs


def processor_inputs(processor: Any, prompts: Sequence[str], images: Sequence[Any], **kwargs: Any) -> Any:
    """``processor(text=prompts, images=...)`` with one image per prompt, as CPU tensors (``padding=True`` when
    several): the images go nested one per row, which every family's processor reads as meant (Gemma 3's reads
    a flat list as all the images of one prompt)."""
    if len(prompts) > 1:
        kwargs.setdefault("padding", True)
    return processor(text=list(prompts), images=[[image] for image in images], return_tensors="pt", **kwargs)


def _image_text(fam: Family, processor: Any, model: nn.Module, part: dict[str, torch.Tensor],
                image_size: tuple[int, int]) -> str:
    """What the processor writes in place of the prompt's placeholder for the image of ``part`` (its output for one
    row): the image token repeated once per feature (LLaVA, LLaVA-NeXT, OneVision, Qwen2.5-VL), Gemma 3's
    ``full_image_sequence`` (``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``), Idefics3's tile
    markers around each tile's image tokens."""
    n_tokens = int((part["input_ids"] == image_token_id(model)).sum())
    if fam.model_type == "gemma3":  # the image, then any pan-and-scan crops (each a pixel_values row)
        return str(processor.replace_image_token({"num_crops": [int(part["pixel_values"].shape[0]) - 1]}, 0))
    if fam.model_type == "idefics3":
        rows, cols, *_ = _idefics3_tiles(processor, *image_size)
        return str(processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0))
    return str(processor.image_token) * n_tokens


def _pixels_per_row(fam: Family, pixels: dict[str, torch.Tensor], image_of_row: list[int]) -> dict[str, Any]:
    """The pixel inputs of each row (for a forward that takes no precomputed features)."""
    import torch

    index = torch.tensor(image_of_row, device=pixels["pixel_values"].device)
    if fam.mrope:  # flat patch rows: each row's image's patches, in row order
        sizes = pixels["image_grid_thw"].prod(-1).tolist()
        chunks = torch.split(pixels["pixel_values"], sizes)
        return {"pixel_values": torch.cat([chunks[i] for i in image_of_row]),
                "image_grid_thw": pixels["image_grid_thw"][index]}
    return {name: value[index] for name, value in pixels.items()}


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
