"""End to end in a real headless browser (Debian's chromium driven by Playwright): open, generate, see the image."""

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

# Without these, chromium tries to reach Google's services at start, which a closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def test_generate_an_image_in_the_browser(app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(app["url"])
            page.get_by_label("Prompt", exact=True).first.fill("a red circle on a white background")
            for name, value in [("Width", "64"), ("Height", "64"), ("Steps", "3")]:
                box = page.get_by_role("spinbutton", name=name).first
                box.fill(value)
                box.press("Enter")
            page.get_by_role("button", name="Generate").first.click()
            image = page.locator("img[src*='00-stock-']").first
            expect(image).to_be_visible(timeout=60_000)
            assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) == 64
            expect(page.get_by_text("Models: stock, tuned, broken")).to_be_visible()
            # the LoRA scale appears, at the model's listed scale, only once a LoRA model is chosen
            scale = page.get_by_label("LoRA scale").first
            expect(scale).to_be_hidden()
            page.get_by_label("Model", exact=True).first.click()
            page.get_by_role("option", name="lora", exact=True).click()
            expect(scale).to_be_visible()
            expect(scale).to_have_value("0.5")
        finally:
            browser.close()


def generate_in(page, url, prompt: str, seed: int) -> None:
    page.goto(url)
    page.get_by_label("Prompt", exact=True).first.fill(prompt)
    for name, value in [("Width", "64"), ("Height", "64"), ("Steps", "2"), ("Seed", str(seed))]:
        box = page.get_by_role("spinbutton", name=name).first
        box.fill(value)
        box.press("Enter")
    page.get_by_role("button", name="Generate").first.click()


def test_each_session_has_its_own_history_and_send_to_fills_image_to_image(app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            pages = {seed: browser.new_context().new_page() for seed in (111, 222)}  # two users, two sessions
            for seed, page in pages.items():
                generate_in(page, app["url"], f"session {seed}", seed)
            for seed, page in pages.items():
                other = 333 - seed
                history = page.locator("#text2img-history")
                expect(history.locator(f"img[src*='-stock-{seed}.png']")).to_be_visible(timeout=60_000)
                expect(history.locator(f"img[src*='-stock-{other}.png']")).to_have_count(0)
            page = pages[111]
            page.get_by_role("button", name="Send to image→image").first.click()
            expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true")
            expect(page.get_by_label("Prompt", exact=True).filter(visible=True)).to_have_value("session 111")
        finally:
            browser.close()
