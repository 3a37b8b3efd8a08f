"""The playground page in a real headless Chromium (Debian's, driven by Playwright): two variants side by
side, streamed answers equal to the library's generation, TTFT and tokens/s shown, a screenshot checked.

No skip: without the browser this test fails and says how to install it (scripts/setup.sh does).
"""

from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
PROMPT = "What is 12 + 7?"


def test_playground_compares_two_variants_in_a_browser(server, reference, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `apt-get install -y chromium chromium-driver`"
    screenshot = tmp_path / "playground.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model-a').options.length >= 4")
            page.select_option("#model-a", "base")
            page.select_option("#model-b", "math")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_function("['a', 'b'].every(s => document.querySelector('#pane-' + s + ' .stats')"
                                   ".dataset.done === '1')", timeout=60_000)
            answers = page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.textContent)")
            stats = page.eval_on_selector_all(".stats", "els => els.map(e => [e.textContent, e.dataset.ttft])")
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()

    assert answers == [reference(m, PROMPT, chat=True, max_tokens=12).text for m in ("base", "math")]
    for text, ttft in stats:
        assert text.startswith("TTFT ") and "tok/s" in text and "12 tokens" in text, text
        assert 0 < float(ttft) < 30
    image = Image.open(screenshot)
    assert image.format == "PNG" and image.size == (VIEWPORT["width"], VIEWPORT["height"])
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is blank"
