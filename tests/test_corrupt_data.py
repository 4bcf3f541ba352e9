"""Bad inputs that are not the project's own artifacts: images, ShareGPT4V records, text files, models.

A single bad image or record is skipped and counted; a bad file the run depends on is a one-line
:class:`UserError` naming it; a model folder that asks to run its own code is refused before
transformers could run or ask about it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest

from lineofsight.cli import UserError

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG; 30000 x 30000 compresses to ~109 KB (the measured bomb) in ~0.2 s."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(height // 1000)] + [z.compress(row * (height % 1000)),
                                                                               z.flush()])
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bilevel_png(30000, 30000))
    return path


def test_decompression_bomb_is_skipped_as_too_large(bomb):
    from lineofsight.data import SkipCounter, load_image

    assert bomb.stat().st_size < 200_000
    skips = SkipCounter()
    assert load_image(bomb, skips) is None
    assert skips.counts == {"too large": 1} and skips.examples["too large"] == [str(bomb)]
    assert "1 too large" in skips.summary()


def test_bomb_warning_made_an_error_is_skipped_too(tmp_path):
    """Between PIL's limit and twice it, PIL only warns (and decodes); under ``-W error`` the warning
    is raised, and counted like the bomb."""
    from PIL import Image

    from lineofsight.data import SkipCounter, load_image

    path = tmp_path / "big.png"
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)
    path.write_bytes(bilevel_png(side, side))
    skips = SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_image(path, skips) is None
    assert skips.counts == {"too large": 1}


def test_bomb_among_good_images_in_the_harvest_loader(bomb, small_world, tmp_path):
    """The SAE harvest decodes in background threads (harvest.ImageLoader): the bomb is skipped and
    counted, the good images around it arrive, with or without threads."""
    import dataclasses

    from lineofsight.data import SkipCounter, read_sharegpt4v
    from lineofsight.harvest import record_batches

    records = read_sharegpt4v(small_world / "sharegpt4v.json", limit=4)
    for rec in records:
        (tmp_path / rec.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_world / rec.image, tmp_path / rec.image)
    shutil.copy(bomb, tmp_path / "bomb.png")
    records[1] = dataclasses.replace(records[1], image="bomb.png")
    for threads in (0, 2):
        skips = SkipCounter()
        batches = list(record_batches(records, range(4), tmp_path, 2, skips, threads=threads))
        assert [idx for idx, _, _ in batches] == [[0], [2, 3]]
        assert all(im.size[0] < 1000 for _, _, ims in batches for im in ims)
        assert skips.counts == {"too large": 1}


@pytest.mark.parametrize("value, ok", [(None, True), (1, True), (336, True), (8192, True), (0, False), (-5, False),
                                       (8193, False), (100_000, False), (True, False)])
def test_check_resize(value, ok, tmp_path):
    from lineofsight.data import check_resize, load_image

    if ok:
        assert check_resize(value) == value
        return
    with pytest.raises(UserError, match=r"--resize .*: expected a side length in pixels from 1 to 8192"):
        check_resize(value)
    with pytest.raises(UserError, match="--resize"):
        load_image(tmp_path / "any.png", resize=value)


# ---------------------------------------------------------------------------------------------
# ShareGPT4V records
# ---------------------------------------------------------------------------------------------

GOOD = {"id": "g", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                        {"from": "gpt", "value": " A red circle. "}]}
MALFORMED, UNUSABLE = "malformed record", "no image or caption"

# (record, why it is skipped; None: usable)
RECORDS = [
    (GOOD, None),
    (7, MALFORMED),
    ("a string", MALFORMED),
    (None, MALFORMED),
    ([GOOD], MALFORMED),
    ({**GOOD, "conversations": ["human: What?", "gpt: A circle."]}, MALFORMED),  # turns that are strings
    ({**GOOD, "conversations": {"from": "gpt", "value": "A circle."}}, MALFORMED),  # not a list
    ({**GOOD, "conversations": "What? A circle."}, MALFORMED),
    ({k: v for k, v in GOOD.items() if k != "conversations"}, MALFORMED),
    ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": 42}]}, MALFORMED),
    ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": ["A", "circle"]}]}, MALFORMED),
    ({**GOOD, "conversations": [{"from": "human", "value": None}, GOOD["conversations"][1]]}, MALFORMED),
    ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt"}]}, MALFORMED),
    ({**GOOD, "image": 12}, MALFORMED),
    ({**GOOD, "image": ["x.png"]}, MALFORMED),
    ({**GOOD, "conversations": [{"from": ["gpt"], "value": "x"}, *GOOD["conversations"]]}, None),  # odd turn ignored
    ({**GOOD, "image": ""}, UNUSABLE),
    ({k: v for k, v in GOOD.items() if k != "image"}, UNUSABLE),  # a text-only conversation
    ({**GOOD, "conversations": GOOD["conversations"][:1]}, UNUSABLE),
    ({**GOOD, "conversations": []}, UNUSABLE),
    ({**GOOD, "id": 5, "conversations": [*GOOD["conversations"], {"from": "gpt", "value": 3}]}, None),  # later turns
]


def _write(tmp_path: Path, obj, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_sharegpt4v_records_of_the_wrong_shape_are_skipped_and_counted(tmp_path, capsys):
    from lineofsight.data import SkipCounter, read_sharegpt4v

    path = _write(tmp_path, [rec for rec, _ in RECORDS])
    skips = SkipCounter()
    records = read_sharegpt4v(path, skips=skips)
    assert len(records) == sum(why is None for _, why in RECORDS)
    assert records[0].question == "What?" and records[0].caption == "A red circle." and records[0].image == "x.png"
    assert records[-1].id == "5" and records[-1].caption == "A red circle."
    expected = {why: sum(w == why for _, w in RECORDS) for why in (MALFORMED, UNUSABLE)}
    assert dict(skips.counts) == expected
    assert skips.examples[MALFORMED][0] == "data.json record 1"
    assert capsys.readouterr().err == ""  # the caller's counter reports
    # Without a counter the skips are not silent: one warning line.
    assert len(read_sharegpt4v(path)) == len(records)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: --data {path}: skipped") and "malformed record" in err[0]


def test_sharegpt4v_limit_counts_usable_records(tmp_path):
    from lineofsight.data import SkipCounter, read_sharegpt4v

    path = _write(tmp_path, [GOOD, 7, GOOD, GOOD])
    skips = SkipCounter()
    assert len(read_sharegpt4v(path, limit=2, skips=skips)) == 2 and skips.total == 1


@pytest.mark.parametrize("content, message", [
    ([7, "x", {"image": "a.png"}], r"--data .*data.json: none of its 3 records is a usable ShareGPT4V record "
                                  r"\(skipped 3: 3 malformed record"),
    ([], r"none of its 0 records is a usable"),
    ({"records": [GOOD]}, r"--data .*data.json should be a list, not a JSON object"),
    (b"[{\"id\": 1,", r"--data .*data.json is not valid JSON \(Expecting"),
    (b"[\"caf\xe9\"]", r"--data .*data.json is not UTF-8 text \(byte 0xe9 on line 1\)"),
    (None, r"--data .*data.json does not exist"),
])
def test_unusable_sharegpt4v_file(content, message, tmp_path):
    from lineofsight.data import read_sharegpt4v

    path = tmp_path / "data.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _write(tmp_path, content)
    with pytest.raises(UserError, match=message):
        read_sharegpt4v(path)


def test_limit_and_offset_must_make_sense(tmp_path):
    from lineofsight.data import HeldOutRecords, read_sharegpt4v

    path = _write(tmp_path, [GOOD])
    for limit in (0, -3):
        with pytest.raises(UserError, match="--limit must be positive"):
            read_sharegpt4v(path, limit=limit)
        with pytest.raises(UserError, match="--limit must be positive"):
            HeldOutRecords(data=path, limit=limit)
    with pytest.raises(UserError, match="--offset must be >= 0"):
        HeldOutRecords(data=path, offset=-1)
    with pytest.raises(UserError, match="has no records after --offset 1"):
        HeldOutRecords(data=path, offset=1).read_records()
    assert len(HeldOutRecords(data=_write(tmp_path, [GOOD, 7, GOOD], "two.json")).read_records()) == 2


# ---------------------------------------------------------------------------------------------
# Text files: UTF-8 or a one-line error naming the file
# ---------------------------------------------------------------------------------------------


def _class_index(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "imagenet_class_index.json").write_text(json.dumps({"0": ["n0", "circle"], "1": ["n1", "square"]}))
    return root


def test_pairs_file_must_be_utf8(tmp_path):
    from lineofsight.data import ClassIndex, read_class_pairs

    path = tmp_path / "pairs.txt"
    path.write_bytes(b"circle@square\ncaf\xe9@square\n")  # Latin-1
    with pytest.raises(UserError, match=r"pairs file .*pairs.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_class_pairs(path)
    path.write_bytes("\ufeffcircle@square\r\n".encode())  # a BOM and CRLF from a Windows editor are fine
    assert read_class_pairs(path, ClassIndex.read(_class_index(tmp_path / "in"))) == [("circle", "square")]
    with pytest.raises(UserError, match=r"pairs file .*nothing.txt does not exist"):
        read_class_pairs(tmp_path / "nothing.txt")
    with pytest.raises(UserError, match=r"pairs file .* is a folder, not a file"):
        read_class_pairs(tmp_path)


def test_classes_file_and_class_index_must_be_utf8(tmp_path):
    from lineofsight.data import ClassIndex, select_classes

    index = ClassIndex.read(_class_index(tmp_path / "in"))
    (tmp_path / "classes.txt").write_bytes(b"circle\n\xff\xfesquare\n")
    with pytest.raises(UserError, match=r"--classes file .*classes.txt is not UTF-8 text \(byte 0xff on line 2\)"):
        select_classes(index, str(tmp_path / "classes.txt"))
    (tmp_path / "in" / "imagenet_class_index.json").write_bytes(b'{"0": ["n0", "caf\xe9"]}')
    with pytest.raises(UserError, match=r"class index .*imagenet_class_index.json is not UTF-8 text"):
        ClassIndex.read(tmp_path / "in")
    (tmp_path / "in" / "imagenet_class_index.json").write_text('[["n0", "circle"]]')
    with pytest.raises(UserError, match=r"imagenet_class_index.json should be a JSON object, not a list"):
        ClassIndex.read(tmp_path / "in")


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

# A model's own code, as auto_map points to it. transformers copies it into its modules cache
# before importing it, so the marker it leaves is an absolute path, not next to __file__.
EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlavaNextConfig
class EvilConfig(LlavaNextConfig):
    model_type = "evil"
"""


def _tiny_weights() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2, 2)})


def model_folder(tmp_path: Path, source: Path, *, config: dict | None = None, weights: bytes | None = None,
                 drop: tuple[str, ...] = (), files: dict[str, str | bytes] | None = None) -> Path:
    """A model folder: ``source``'s config files (no weights unless given), edited."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in source.iterdir():
        if path.suffix in (".json", ".jinja") and path.name not in drop:
            shutil.copy(path, folder / path.name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    for name, content in (files or {}).items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def _llava_config(tiny_model_dir: Path) -> dict:
    return json.loads((tiny_model_dir / "config.json").read_text())


def _auto_map(cfg: dict) -> dict:
    return {**cfg, "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}}


# (how the folder differs from the tiny LLaVA-NeXT, what check_model must say)
MODEL_CASES = {
    "bert": (lambda c: {"config": {"model_type": "bert", "hidden_size": 8}, "weights": _tiny_weights()},
             r"--model .* is a 'bert' model \(config.json model_type\); supported families: LLaVA-NeXT \(llava_next\), "
             r"LLaVA-1.5 \(llava\), LLaVA-OneVision \(llava_onevision\), Qwen2.5-VL \(qwen2_5_vl\), Gemma 3 \(gemma3\), "
             r"Idefics3 \(idefics3\)$"),
    "gpt2": (lambda c: {"config": {"model_type": "gpt2", "n_layer": 2}, "weights": _tiny_weights()},
             r"is a 'gpt2' model"),
    "no model_type": (lambda c: {"config": {"hidden_size": 8}, "weights": _tiny_weights()}, r"is a None model"),
    "config not JSON": (lambda c: {"files": {"config.json": "{'model_type': 'llava'}"}, "weights": _tiny_weights()},
                        r"--model .*: config .*config.json is not valid JSON"),
    "config not UTF-8": (lambda c: {"files": {"config.json": b"\xff\xfe{}"}}, r"config.json is not UTF-8 text"),
    "config a list": (lambda c: {"files": {"config.json": "[]"}}, r"config.json should be a JSON object, not a list"),
    "auto_map, custom type": (lambda c: {"config": _auto_map({"model_type": "evil"}), "weights": _tiny_weights()},
                              r"config.json asks for custom code shipped with the model \(auto_map\)"),
    "auto_map, llava type": (lambda c: {"config": _auto_map(c), "weights": _tiny_weights()},
                             r"config.json asks for custom code"),
    "auto_map in tokenizer_config": (
        lambda c: {"weights": _tiny_weights(),
                   "files": {"tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["evil.T", None]}})}},
        r"tokenizer_config.json asks for custom code"),
    "no weights": (lambda c: {}, r"--model .*: .*model holds config.json but no weights \(\*\.safetensors\)$"),
    "only pickled weights": (lambda c: {"files": {"pytorch_model.bin": b"PK"}},
                             r"no weights \(\*\.safetensors\); pytorch_model.bin \(pickle\) are not loaded"),
    "empty weights": (lambda c: {"weights": b""},
                      r"--model .*: weights file .*model.safetensors is truncated or not a safetensors file "
                      r"\(header too small\)"),
    "truncated weights": (lambda c: {"weights": _tiny_weights()[:-4]}, r"model.safetensors is truncated or not a "
                                                                       r"safetensors file \(incomplete metadata"),
    "index lists a missing shard": (
        lambda c: {"files": {"model.safetensors.index.json": json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}}),
                             "model-2-of-2.safetensors": _tiny_weights()}},
        r"model.safetensors.index.json lists weights files that are missing: model-1-of-2.safetensors"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_check_model_refuses(case, tiny_model_dir, tmp_path):
    from lineofsight.models import check_model, load_vlm

    change, message = MODEL_CASES[case]
    folder = model_folder(tmp_path, tiny_model_dir, **change(_llava_config(tiny_model_dir)))
    for call in (check_model, load_vlm):
        with pytest.raises(UserError, match=message) as err:
            call(str(folder))
        assert "\n" not in str(err.value)


def test_check_model_passes_the_tiny_model_and_the_toy(tiny_model_dir):
    from lineofsight.models import check_model

    assert check_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert Path(check_model("toy")).name == "model"


def test_auto_map_is_refused_without_prompting_even_with_yes_on_stdin(tiny_model_dir, small_world, tmp_path):
    """Through a real script: exit 2 with one line, and the folder's own code never ran (no marker).

    The control: transformers left to itself (``trust_remote_code`` unset) asks on stdin, takes the
    ``y`` and runs the code, leaving the marker; the same folder through the script leaves none."""
    marker = tmp_path / "RAN"
    folder = model_folder(tmp_path, tiny_model_dir, config=_auto_map({"model_type": "evil"}), weights=_tiny_weights(),
                          files={"evil.py": EVIL_CODE.format(marker=str(marker))})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "HF_MODULES_CACHE": str(tmp_path / "mods")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], input="y\n", capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=120)

    control = run("-c", f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r})")
    assert control.returncode == 0 and marker.read_text() == "custom code ran", control.stderr[-2000:]
    marker.unlink()
    proc = run("probes/compute_image_activations.py", "--model", str(folder), "--imagenet-dir",
               str(small_world / "imagenet"), "--images-per-class", "1", "--out", str(tmp_path / "acts"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "auto_map" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "trust_remote_code" not in proc.stdout
    assert not marker.exists()
    assert not (tmp_path / "acts").exists()


def test_every_loader_gets_trust_remote_code_false(tiny_model_dir, monkeypatch):
    """Defence in depth behind check_model: transformers itself is told never to run a model's code."""
    import transformers

    from lineofsight.models import load_vlm

    seen = {}
    for cls in (transformers.AutoConfig, transformers.AutoProcessor, transformers.LlavaNextForConditionalGeneration):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=cls.__name__, _original=original, **kwargs):
            seen[_name] = kwargs.get("trust_remote_code", "not passed")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_vlm(str(tiny_model_dir))
    assert seen == {"AutoConfig": False, "AutoProcessor": False, "LlavaNextForConditionalGeneration": False}


@pytest.mark.parametrize("broken, message", [
    ({"tokenizer.json": "{not json"}, r"its processor \(tokenizer and image processor files\) could not be loaded "
                                      r"\(JSONDecodeError"),
    ({"processor_config.json": None, "preprocessor_config.json": None}, r"its processor .* could not be loaded"),
])
def test_processor_that_fails_to_load(broken, message, tiny_model_dir, tmp_path):
    """The processor loads before the weights (it is the cheaper), so its failure costs no weights read."""
    from lineofsight.models import load_vlm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name, content in broken.items():
        if content is None:
            (folder / name).unlink(missing_ok=True)
        else:
            (folder / name).write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_vlm(str(folder))
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_config(tiny_model_dir, tmp_path):
    from lineofsight.models import load_vlm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cfg = _llava_config(tiny_model_dir)
    cfg["text_config"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"--model .*: its weights could not be loaded \(RuntimeError"):
        load_vlm(str(folder))
