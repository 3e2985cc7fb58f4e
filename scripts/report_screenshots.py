"""Screenshots of a report's sections for the docs, taken in headless Chromium (Debian's, driven by playwright).

    python scripts/report_screenshots.py phivision-demo/report.html docs/

writes ``docs/report-<section>.png`` for the summary, training, price and category sections: 1280 px wide
viewport, reduced to a 256-colour palette so each file stays small.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
SECTIONS = ("summary", "training", "price", "category")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(args.report.resolve().as_uri(), wait_until="load")
            for section in SECTIONS:
                shot = Image.open(io.BytesIO(page.locator(f"#{section}").screenshot()))
                path = args.out / f"report-{section}.png"
                shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
                    path, optimize=True
                )
                print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
