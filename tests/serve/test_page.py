"""The upload page in headless Chromium (Debian's /usr/bin/chromium driven by playwright): pick a photo, click,
see the answer. Fails, never skips, when Chromium is missing: CI installs it."""

from __future__ import annotations

from pathlib import Path

import httpx
from PIL import Image
from serve_helpers import ServerThread, png_bytes

from phivision.answer.calibration import PriceCalibration
from phivision.runs import load_model
from phivision.serve.server import ServeLimits, create_app

CHROMIUM = "/usr/bin/chromium"


def test_page_uploads_and_shows_the_answer(lora_run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "bag.png"
    photo.write_bytes(png_bytes(size=(120, 90)))
    loaded = load_model(lora_run, device="cpu")
    loaded.calibration = PriceCalibration((0.5, 1.0, 2.0, 3.0))  # as RUN/calibration.json would give it
    with ServerThread(create_app(loaded, ServeLimits(max_new_tokens=40))) as server:
        expected = httpx.post(
            f"{server.url}/v1/predict",
            files={"image": ("bag.png", photo.read_bytes(), "image/png")},
            timeout=120,
        ).json()
        errors: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 900, "height": 700})
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                page.on("pageerror", lambda err: errors.append(str(err)))
                page.goto(server.url + "/")
                assert page.locator("#result").is_hidden()
                page.set_input_files("#file", str(photo))
                page.click("#submit")
                page.wait_for_selector("#result", state="visible", timeout=60_000)

                assert page.inner_text("#answer") == (expected["answer"] or "(empty answer)")
                for field in ("title", "category"):
                    shown = page.inner_text(f"#{field}")
                    assert shown == (expected[field] or "not found in the answer")
                low, high = expected["price_low"], expected["price_high"]
                assert low < expected["price"] < high  # a constrained answer always has a price
                assert page.inner_text("#range") == f"{low:,.2f} to {high:,.2f} (80% range)"
                assert page.evaluate("document.getElementById('preview').naturalWidth") == 120
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

                # An error from the API is shown on the page, not swallowed.
                text_file = tmp_path / "notes.txt"
                text_file.write_text("not a photo")
                page.set_input_files("#file", str(text_file))
                page.click("#submit")
                page.wait_for_selector("#status.error", timeout=60_000)
                assert "not_an_image" in page.inner_text("#status")
            finally:
                browser.close()
    # The 415 above is reported by the browser as a failed resource load; nothing else may appear.
    assert [e for e in errors if "415" not in e] == []
    with Image.open(tmp_path / "page.png") as shot:
        histogram = shot.convert("L").histogram()
    assert sum(1 for count in histogram if count) > 10  # rendered content, not a blank page
