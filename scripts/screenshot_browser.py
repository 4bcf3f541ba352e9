"""Screenshots of a feature-browser site (sae/evaluation/browse_features.py) in headless Chromium, for REPORT.md.

Opens the site from ``file://``, as a reader would: ``<out>/browser_index.png`` (the index) and
``<out>/browser_latent.png`` (the page of ``--latent``, default: the live latent with the highest max activation
among those whose top images fire most, i.e. the first row of the index sorted by max with images). Fails, exit 2,
when a page logs a JavaScript error.

    python scripts/screenshot_browser.py --site results/browser --out results
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Config:
    """Screenshot options."""

    site: Path = Path("results/browser")
    """The site folder (holds index.html)."""
    out: Path = Path("results")
    """Folder for browser_index.png and browser_latent.png."""
    latent: int | None = None
    """The latent whose page to capture (default: the highest-max latent with top images)."""


def _data(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))


def main(cfg: Config) -> None:
    from lineofsight.chromium import headless_chromium, js_errors, screenshot
    from lineofsight.cli import UserError

    site = cfg.site.resolve()
    if not (site / "index.html").is_file() or not (site / "data" / "index.js").is_file():
        raise UserError(f"--site {cfg.site} holds no feature-browser site (index.html, data/index.js)")
    latent = cfg.latent
    if latent is None:
        cols = _data(site / "data" / "index.js")["columns"]
        by_max = sorted(zip(cols["max"], cols["id"], strict=True), reverse=True)
        latent = next((i for _, i in by_max if _data(site / "data" / "latents" / f"{i}.js")["images"]), by_max[0][1])
    cfg.out.mkdir(parents=True, exist_ok=True)
    with headless_chromium() as driver:
        screenshot(driver, (site / "index.html").as_uri(), cfg.out / "browser_index.png", wait_for="tr.latent-row")
        screenshot(driver, (site / "latent.html").as_uri() + f"?id={latent}", cfg.out / "browser_latent.png",
                   wait_for="#title")
        errors = js_errors(driver)
    if errors:
        raise UserError(f"the site logged JavaScript errors: {errors[0]}")
    print(f"wrote {cfg.out}/browser_index.png and browser_latent.png (latent {latent})")


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
