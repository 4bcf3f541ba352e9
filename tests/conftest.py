"""Tiny random LLaVA-style models built from config, and the real Mistral v1 tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

IMAGE_SIZE, PATCH = 32, 8
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )


def _text_config(backbone: str, n_layers: int = 3):
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32064, max_position_embeddings=1024,
    )
    cls = {"mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig,
           "qwen2": transformers.Qwen2Config}[backbone]
    return cls(**common)


FAMILY_KINDS = ("llava_onevision", "qwen2_5_vl", "gemma3", "idefics3")
"""The families beyond LLaVA, each built by ``tests/family_<kind>.py`` with its checkpoint's real chat template."""


def build_tiny(kind: str, n_layers: int = 3, seed: int = 0):
    """(model, processor) for ``kind`` in next-mistral, next-llama, next-qwen2, llava15 and :data:`FAMILY_KINDS`."""
    import importlib

    import transformers

    if kind in FAMILY_KINDS:
        return importlib.import_module(f"family_{kind}").build(n_layers=n_layers, seed=seed)
    torch.manual_seed(seed)
    backbone = kind.split("-")[-1] if kind.startswith("next") else "llama"
    common = dict(
        vision_config=_vision_config(), text_config=_text_config(backbone, n_layers),
        image_token_index=32000, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    tok = mistral_tokenizer()
    if kind.startswith("next"):
        cfg = transformers.LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common)
        model = transformers.LlavaNextForConditionalGeneration(cfg)
        image_processor = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=PINPOINTS,
        )
        processor = transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )
    else:
        cfg = transformers.LlavaConfig(**common)
        model = transformers.LlavaForConditionalGeneration(cfg)
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )
        processor = transformers.LlavaProcessor(
            image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )
    return model.eval(), processor


def mistral_tokenizer():
    """The real LLaVA-NeXT-Mistral tokenizer (lineofsight.stand_in)."""
    from lineofsight.stand_in import mistral_v1_tokenizer

    return mistral_v1_tokenizer()


def images(sizes, seed: int = 0):
    """Random RGB PIL images of the given (width, height) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="session")
def tiny_models():
    """Cache of tiny models by kind, built once per session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny(kind)
        return cache[kind]

    return get


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def load_script(relpath: str):
    """Import a single-file script (``probes/train_probe.py``) as a module, to call its ``main``."""
    import importlib.util

    path = ROOT / relpath
    name = "script_" + relpath.replace("/", "_").replace("-", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaVA-NeXT (Mistral) saved with save_pretrained: a stand-in for any --model dir."""
    path = tmp_path_factory.mktemp("tiny_vlm")
    model, processor = build_tiny("next-mistral", n_layers=3, seed=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory):
    """``get(kind)``: a tiny random model of ``kind`` saved with save_pretrained (built once per session)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            model, processor = build_tiny(kind, n_layers=3, seed=1)
            model.save_pretrained(path)
            processor.save_pretrained(path)
            cache[kind] = path
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small shape world (ImageNet + ShareGPT4V layouts) in a temp folder."""
    from lineofsight.toy import generate_world

    root = tmp_path_factory.mktemp("world")
    return generate_world(root / "world", seed=0, n_train_per_class=6, n_val_per_class=2, n_captions=16)


def pixels_only(model, monkeypatch) -> None:
    """Make ``model.forward`` take pixels only (no precomputed image features), like a model whose forward has
    no ``mm_encoder_outputs``: the other path of :func:`lineofsight.models.vlm_inputs`."""
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids=None, attention_mask=None, pixel_values=None,
                        image_sizes=None, **kw: forward(input_ids=input_ids, attention_mask=attention_mask,
                                                       pixel_values=pixel_values, image_sizes=image_sizes, **kw))


@pytest.fixture
def run_in(capsys):
    """Run a script's command line in this process (no interpreter + torch start-up per call): the same parse,
    one-line error and exit code as ``python script ...``, returned like subprocess.run's result."""
    from lineofsight.cli import run as run_cli

    modules: dict[str, object] = {}

    def call(script: str, *args: str) -> subprocess.CompletedProcess:
        module = modules.setdefault(script, load_script(script))
        capsys.readouterr()
        try:
            run_cli(module.main, module.Config, list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out.out, out.err)

    return call


BROWSER_LAYER, BROWSER_D_SAE, BROWSER_RECORDS, BROWSER_TOP_N = 2, 48, 6, 3


@pytest.fixture(scope="session")
def toy_browser_site(tmp_path_factory):
    """The feature browser (sae/evaluation/browse_features.py) on the toy's first 6 held-out records, for a random SAE
    at layer 2 whose latents fire on ~15 % of the tokens (the last four never), with steering vectors and a probe at
    that layer: ``<tmp>/site/browser``; the inputs are in ``<tmp>/inputs`` (``sae``, ``vectors``, ``probes``)."""
    from PIL import Image

    from lineofsight.data import HeldOutRecords
    from lineofsight.harvest import Harvester
    from lineofsight.models import load_vlm
    from lineofsight.probes import save_probe
    from lineofsight.sae import SAEConfig, SparseAutoencoder
    from lineofsight.steering import save_vectors

    model, processor = load_vlm("toy")
    root = tmp_path_factory.mktemp("browser")
    inputs = root / "inputs"
    held_out = HeldOutRecords()
    records = held_out.read_records()[:2]
    images = [Image.open(held_out.root / r.image).convert("RGB") for r in records]
    x = Harvester(model, processor, [BROWSER_LAYER])([r.caption for r in records], images, [0, 1]).acts[:, 0]
    sae = SparseAutoencoder(SAEConfig(d_in=128, d_sae=BROWSER_D_SAE, layer=BROWSER_LAYER), seed=3)
    sae.set_scale_from(x)
    with torch.no_grad():
        sae.b_enc -= sae.pre_acts(x).quantile(0.85, dim=0)
        sae.b_enc[-4:] = -1e4
    sae.save(inputs / "sae")
    gen = torch.Generator().manual_seed(0)
    save_vectors(inputs / "vectors", {("circle", "square", BROWSER_LAYER): torch.randn(128, generator=gen),
                                      ("star", "ring", BROWSER_LAYER): torch.randn(128, generator=gen)},
                 {"method": "test"})
    probe = {"weight": torch.randn(3, 128, generator=gen), "bias": torch.zeros(3), "mean": torch.zeros(128),
             "std": torch.rand(128, generator=gen) + 0.5}
    save_probe(inputs / "probes", BROWSER_LAYER, probe, ["circle", "square", "star"], "mean")
    browse = load_script("sae/evaluation/browse_features.py")
    out = root / "site" / "browser"
    browse.main(browse.Config(sae=inputs / "sae", limit=BROWSER_RECORDS, batch_size=BROWSER_RECORDS,
                              top_n=BROWSER_TOP_N, vectors=inputs / "vectors", probes=inputs / "probes", out=out,
                              load_threads=0))
    return out
