"""The feature browser's pages in headless Chromium, from file:// and over HTTP.

``fake_site`` writes a small site in the data format the pages read (40 live latents with known
statistics, a few thumbnails); the pages from ``sae/evaluation/browser`` are copied in as the writer
does. One browser serves the whole module.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lineofsight import chromium

ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = ROOT / "sae" / "evaluation" / "browser"

D_SAE = 48
DEAD = [5, 11, 17, 23, 29, 35, 41, 47]
LIVE = [i for i in range(D_SAE) if i not in DEAD]
VOCAB = ["▁red", "▁circle", "▁blue", "▁square", "▁green", "▁triangle", "▁big", "▁small"]
TYPES = ["image", "text_in_context", "text_only"]
THRESHOLDS = {"image_only": 0.9, "text_only": 0.1, "dense": 0.1}
N_RECORDS = 6
CLASSES = {"steering": {"red@blue": [[LIVE[3], 0.5], [LIVE[30], -0.4], [LIVE[12], 0.2]]},
           "probes": {"Ball": [[LIVE[7], 0.3]]}}


def _columns() -> dict:
    """Known, pairwise distinct statistics per live latent (row k is latent LIVE[k])."""
    n = len(LIVE)
    return {
        "id": LIVE,
        "freq": [round(0.001 + (7 * k % n) / 200, 4) for k in range(n)],
        "freq_image": [round((11 * k % n) / 100, 3) for k in range(n)],
        "freq_text_in_context": [round((13 * k % n) / 100, 3) for k in range(n)],
        "freq_text_only": [round((17 * k % n) / 100, 3) for k in range(n)],
        "max": [round(0.5 + (19 * k % n) / 8, 3) for k in range(n)],
        "mean": [round(0.2 + (23 * k % n) / 20, 3) for k in range(n)],
        "modality": [round(k / (n - 1), 3) for k in range(n)],
        "top_tokens": [[] if k % 10 == 9 else [k % 8, (k + 3) % 8] for k in range(n)],
    }


def _b64(values) -> str:
    return base64.b64encode(bytes(values)).decode("ascii")


def _heat(rows: int, cols: int, seed: int) -> list[int]:
    """Row-major uint8 heat with some zero cells."""
    return [0 if (i + seed) % 3 == 0 else (37 * (i + seed)) % 255 + 1 for i in range(rows * cols)]


def _latent(k: int, cols: dict) -> dict:
    lid = LIVE[k]
    stats = {name: cols[name][k] for name in ("freq", "freq_image", "freq_text_in_context", "freq_text_only", "max",
                                             "mean", "modality")}
    images = []
    for j in range(3):
        record, seed = (lid + j) % N_RECORDS, lid + j
        images.append({"record": record, "thumb": f"thumbs/{record}.jpg", "value": round(stats["max"] * (1 - 0.2 * j), 3),
                       "caption": f"record {record} caption",
                       # two "crops" grids: a family whose tiles are grids of their own (Idefics3, OneVision)
                       "grids": [{"name": "base", "box": [0, 0, 1, 1], "shape": [2, 2], "heat": _b64(_heat(2, 2, seed))},
                                 {"name": "crops", "box": [0.0, 0.25, 0.5, 0.75], "shape": [4, 2],
                                  "heat": _b64(_heat(4, 2, seed))},
                                 {"name": "crops", "box": [0.5, 0.25, 1.0, 0.75], "shape": [4, 2],
                                  "heat": _b64(_heat(4, 2, seed + 7))}]})
    tokens = ["▁a", "▁red", "▁circle", "▁on", "▁blue"]
    texts = [{"record": 1, "type": "text_in_context", "value": stats["max"], "peak": 1, "tokens": tokens,
              "acts": _b64([0, 255, 128, 0, 7])},
             {"record": 4, "type": "text_only", "value": round(0.7 * stats["max"], 3), "peak": 2, "tokens": tokens,
              "acts": _b64([0, 9, 255, 3, 0])}]
    edges = [round(0.01 * 10 ** (3 * b / 8), 4) for b in range(9)]
    return {
        "id": lid, "layer": 2, "stats": stats, "images": images, "texts": texts,
        "histogram": {"edges": edges, "counts": {t: [(lid + b * (i + 1)) % 7 for b in range(8)]
                                                 for i, t in enumerate(TYPES)}},
        "logits": {"promoted": [["▁red", 1.5], ["▁circle", 0.7]], "suppressed": [["▁blue", -0.9]]},
        "cosines": {"steering": [["red@blue", 0.31]] if k % 2 else [], "probes": []},
    }


def fake_site(folder: Path) -> Path:
    """Write a feature-browser site with the fake data above into ``folder`` (pages copied from the project)."""
    from PIL import Image

    folder = Path(folder)
    shutil.copytree(BROWSER_DIR, folder, dirs_exist_ok=True)
    (folder / "data" / "latents").mkdir(parents=True, exist_ok=True)
    (folder / "thumbs").mkdir(exist_ok=True)
    cols = _columns()
    index = {
        "meta": {"title": "fake layer 2 SAE", "sae": "fake", "model": "toy", "layer": 2, "d_sae": D_SAE,
                 "activation": "topk", "n_records": N_RECORDS, "n_skipped": 0, "token_types": TYPES,
                 "n_tokens": {"image": 600, "text_in_context": 90, "text_only": 90}, "thresholds": THRESHOLDS,
                 "top_n": 3},
        "columns": cols, "vocab": VOCAB, "dead": DEAD,
        "dense": [i for i, f in zip(LIVE, cols["freq"]) if f > THRESHOLDS["dense"]],
        "classes": CLASSES,
    }
    (folder / "data" / "index.js").write_text(f"window.LOS_INDEX = {json.dumps(index)};\n")
    for k, lid in enumerate(LIVE):
        page = _latent(k, cols)
        # as the writer stores them: each image names a layout of the page and carries one heat string per grid
        page["layouts"] = [[{key: g[key] for key in ("name", "box", "shape")} for g in page["images"][0]["grids"]]]
        page["images"] = [{**{k2: v for k2, v in im.items() if k2 != "grids"}, "layout": 0,
                           "heat": [g["heat"] for g in im["grids"]]} for im in page["images"]]
        (folder / "data" / "latents" / f"{lid}.js").write_text(f"window.LOS_LATENT = {json.dumps(page)};\n")
    for r in range(N_RECORDS):
        Image.new("RGB", (64, 48), (40 * r, 200 - 30 * r, 90)).save(folder / "thumbs" / f"{r}.jpg")
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return fake_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def driver():
    with chromium.headless_chromium() as drv:
        yield drv


def _wait(drv, css: str, timeout: float = 10.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def _ids(drv) -> list[int]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#latents tr.latent-row')).map(r => +r.dataset.id)")


def _set(drv, element_id: str, value: str) -> None:
    """Set an input/select and fire the event the page listens to, as a user would."""
    event = "input" if element_id == "search" else "change"
    drv.execute_script(f"const e = document.getElementById('{element_id}'); e.value = arguments[0];"
                       f"e.dispatchEvent(new Event('{event}'));", value)


def _open_index(drv, url: str) -> None:
    drv.get(url)
    _wait(drv, "#latents tr.latent-row")


def test_index_table_sort_search_filter(driver, site):
    from selenium.webdriver.common.by import By

    cols = _columns()
    _open_index(driver, (site / "index.html").as_uri())
    assert _ids(driver) == LIVE  # default: ascending id, 40 < 100 rows per page
    _set(driver, "page-size", "all")
    assert _ids(driver) == LIVE
    assert driver.find_element(By.ID, "count").text == f"{len(LIVE)} of {len(LIVE)} live latents"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#modality-svg rect.bar")) == 20
    assert sum(int(r.get_attribute("data-count")) for r in driver.find_elements(By.CSS_SELECTOR, "#modality-svg rect"))\
        == len(LIVE)

    # Sorting: a statistic's first click is descending, the second ascending.
    by_max = [i for _, i in sorted(zip(cols["max"], LIVE))]
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="max"]').click()
    assert _ids(driver) == by_max[::-1]
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="max"]').click()
    assert _ids(driver) == by_max
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="freq_text_only"]').click()
    assert _ids(driver)[:5] == [i for _, i in sorted(zip(cols["freq_text_only"], LIVE), key=lambda p: (-p[0], p[1]))][:5]
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="id"]').click()
    assert _ids(driver) == LIVE

    # Search: top-token text (case-insensitive, "▁" read as a space), an exact id, a class name.
    circle = VOCAB.index("▁circle")
    _set(driver, "search", "CIRCLE")
    assert _ids(driver) == [i for i, t in zip(LIVE, cols["top_tokens"]) if circle in t]
    _set(driver, "search", " sq")
    assert _ids(driver) == [i for i, t in zip(LIVE, cols["top_tokens"]) if VOCAB.index("▁square") in t]
    _set(driver, "search", str(LIVE[7]))
    assert _ids(driver) == [LIVE[7]]
    assert driver.find_element(By.ID, "count").text == f"1 of {len(LIVE)} live latents"
    _set(driver, "search", str(DEAD[0]))
    assert _ids(driver) == []
    _set(driver, "search", "red@blue")
    assert _ids(driver) == sorted(p[0] for p in CLASSES["steering"]["red@blue"])
    _set(driver, "search", "ball")
    assert _ids(driver) == [LIVE[7]]
    _set(driver, "search", "")

    # Filter by modality score.
    m = dict(zip(LIVE, cols["modality"]))
    for value, keep in (("image_only", lambda s: s >= 0.9), ("text_only", lambda s: s <= 0.1),
                        ("shared", lambda s: 0.1 < s < 0.9), ("all", lambda s: True)):
        _set(driver, "filter", value)
        assert _ids(driver) == [i for i in LIVE if keep(m[i])], value
    dead_text = driver.find_element(By.CSS_SELECTOR, "#dead summary").text
    assert dead_text.startswith(f"{len(DEAD)} dead latents")
    assert chromium.js_errors(driver) == []


def test_latent_page_images_and_texts(driver, site):
    from selenium.webdriver.common.by import By

    _open_index(driver, (site / "index.html").as_uri())
    driver.find_element(By.CSS_SELECTOR, f'#latents tr.latent-row[data-id="{LIVE[1]}"] a').click()
    _wait(driver, "canvas.heatmap[data-heat-cells]")
    latent = _latent(1, _columns())
    assert driver.current_url.endswith(f"latent.html?id={LIVE[1]}")

    def heat_cells(grid: str) -> list[int]:
        _wait(driver, f'canvas.heatmap[data-grid="{grid}"]')
        canvases = driver.find_elements(By.CSS_SELECTOR, "canvas.heatmap")
        assert len(canvases) == len(latent["images"])
        assert all(c.get_attribute("data-grid") == grid for c in canvases)
        return [int(c.get_attribute("data-heat-cells")) for c in canvases]

    def nonzero(grid: str) -> list[int]:  # per image, over every grid of that name
        return [sum(sum(v > 0 for v in base64.b64decode(g["heat"])) for g in im["grids"] if g["name"] == grid)
                for im in latent["images"]]

    assert heat_cells("crops") == nonzero("crops")  # the crops grid is the default
    assert all(n > 0 for n in nonzero("crops"))
    driver.find_element(By.CSS_SELECTOR, '#grid-toggle input[value="base"]').click()
    assert heat_cells("base") == nonzero("base")
    size = driver.execute_script("const c = document.querySelector('canvas.heatmap'); return [c.width, c.height]")
    assert size == [64, 48]  # drawn at the thumbnail's size: the image loaded

    contexts = driver.find_elements(By.CSS_SELECTOR, "#texts .context")
    assert len(contexts) == len(latent["texts"])
    peaks = [c.find_element(By.CSS_SELECTOR, ".peak").text for c in contexts]
    assert peaks == [t["tokens"][t["peak"]].replace("▁", " ") for t in latent["texts"]]
    assert [c.find_element(By.CSS_SELECTOR, ".label").text for c in contexts] == [
        {"text_in_context": "in context", "text_only": "alone"}[t["type"]] for t in latent["texts"]]
    shaded = driver.execute_script(
        "return Array.from(document.querySelectorAll('#texts .context:first-child .t'))"
        ".map(s => s.style.backgroundColor !== '')")
    assert shaded == [a > 0 for a in base64.b64decode(latent["texts"][0]["acts"])]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#histograms svg")) == len(TYPES)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#promoted li")) == 2
    assert driver.find_element(By.ID, "steering-box").is_displayed()  # k = 1: one steering cosine
    assert not driver.find_element(By.ID, "probes-box").is_displayed()
    assert chromium.js_errors(driver) == []

    driver.get((site / "latent.html").as_uri() + f"?id={DEAD[0]}")
    _wait(driver, "#message:not([hidden])")
    assert driver.find_element(By.ID, "message").text == f"latent {DEAD[0]} has no page (dead latent?)"
    # The missing file is a failed load (a network error), never an uncaught JavaScript error.
    assert [e for e in chromium.js_errors(driver) if "ERR_FILE_NOT_FOUND" not in e] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_site_over_http(driver, site):
    from selenium.webdriver.common.by import By

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=site,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"{base}/index.html", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        _open_index(driver, f"{base}/index.html")
        assert _ids(driver) == LIVE
        driver.get(f"{base}/latent.html?id={LIVE[0]}")
        _wait(driver, "canvas.heatmap[data-heat-cells]")
        assert driver.find_elements(By.CSS_SELECTOR, "#texts .peak")
        assert chromium.js_errors(driver) == []
    finally:
        server.kill()
        server.wait()


def test_missing_binary_is_a_user_error(tmp_path):
    from lineofsight.cli import UserError

    with pytest.raises(UserError, match="chromium not found: install Debian's chromium"), \
            chromium.headless_chromium(chromium=tmp_path / "chromium"):
        pass
    with pytest.raises(UserError, match="chromedriver not found: install Debian's chromium-driver"), \
            chromium.headless_chromium(chromium=sys.executable, chromedriver=tmp_path / "chromedriver"):
        pass


def test_the_writers_site_on_the_toy(driver, toy_browser_site):
    """The site browse_features.py wrote for the toy: every live latent is a row, sorting and search work, and a
    latent page shows its images with non-empty heatmaps and its text contexts, with no JavaScript errors."""
    from selenium.webdriver.common.by import By

    site = toy_browser_site
    metrics = json.loads((site / "browser.json").read_text())
    _open_index(driver, (site / "index.html").as_uri())
    _set(driver, "page-size", "all")
    ids = _ids(driver)
    assert len(ids) == metrics["n_live"] and ids == sorted(ids)
    driver.find_element(By.CSS_SELECTOR, 'th[data-sort="max"]').click()
    by_max = _ids(driver)
    text = (site / "data" / "index.js").read_text()
    index = json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))
    maxima = dict(zip(index["columns"]["id"], index["columns"]["max"], strict=True))
    assert [maxima[i] for i in by_max] == sorted(maxima.values(), reverse=True)
    _set(driver, "search", str(by_max[0]))
    assert _ids(driver) == [by_max[0]]
    _set(driver, "search", "")
    first = next(i for i in by_max if (site / "data" / "latents" / f"{i}.js").read_text().count('"layout"') > 0)
    page_text = (site / "data" / "latents" / f"{first}.js").read_text()
    page = json.loads(page_text[page_text.index("=") + 1 :].strip().rstrip(";"))
    driver.get((site / "latent.html").as_uri() + f"?id={first}")
    _wait(driver, "canvas.heatmap[data-heat-cells]")
    cells = [int(c.get_attribute("data-heat-cells")) for c in driver.find_elements(By.CSS_SELECTOR, "canvas.heatmap")]
    assert len(cells) == len(page["images"]) and all(n > 0 for n in cells)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#texts .context")) == len(page["texts"])
    assert chromium.js_errors(driver) == []


def test_screenshots_of_the_writers_site(run_in, toy_browser_site, tmp_path):
    """scripts/screenshot_browser.py: a PNG of the index and of a latent with images; a folder without a site is one
    line, exit 2."""
    from PIL import Image

    proc = run_in("scripts/screenshot_browser.py", "--site", str(toy_browser_site), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("browser_index.png", "browser_latent.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] >= 1000
    latent = int(proc.stdout.strip().rsplit("latent ", 1)[1].rstrip(")"))
    page = (toy_browser_site / "data" / "latents" / f"{latent}.js").read_text()
    assert '"layout":' in page  # the page shown has top images
    proc = run_in("scripts/screenshot_browser.py", "--site", str(tmp_path), "--out", str(tmp_path))
    assert proc.returncode == 2 and "holds no feature-browser site" in proc.stderr.strip().splitlines()[-1]
