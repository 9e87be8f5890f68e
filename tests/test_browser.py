"""End to end in a real headless browser (Debian's chromium driven by Playwright): open, generate, see the image, and
the layout of issue 11 (controls left and results right on a wide screen, one column on a phone, images whole)."""

import pytest

from docs.screenshot import CHROMIUM, CHROMIUM_FLAGS, fill, wait_for_result

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

WIDE, NARROW = {"width": 1366, "height": 768}, {"width": 412, "height": 915}  # a laptop; a phone (Pixel 7)

# Where the browser draws an image: the img element's box, and inside it the picture itself as object-fit places it
# (contain and scale-down: the whole picture at its aspect ratio; cover and fill: the box, cropping or stretching).
SHOWN_IMAGE = """(img) => {
    const box = img.getBoundingClientRect(), style = getComputedStyle(img);
    const [w, h] = [img.naturalWidth, img.naturalHeight];
    const fit = Math.min(box.width / w, box.height / h);
    const scale = {contain: fit, "scale-down": Math.min(fit, 1), none: 1}[style.objectFit];
    const shown = scale === undefined ? [box.width, box.height] : [w * scale, h * scale];
    return {natural: [w, h], shown, box: [box.left, box.top, box.right, box.bottom],
            rendering: style.imageRendering};
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def generate(page, url: str, width: int, height: int):
    """Open the app, generate one image of this size on the stock model and return its img element."""
    page.goto(url)
    page.get_by_label("Prompt", exact=True).first.fill("a red circle on a white background")
    for label, value in [("Width", width), ("Height", height), ("Steps", 3)]:
        fill(page, label, str(value))
    page.get_by_role("button", name="Generate").first.click()
    wait_for_result(page, timeout_ms=60_000)
    return page.locator(".sdtune-result img[src*='00-stock-']").first


def box(locator) -> tuple[float, float, float, float]:
    found = locator.bounding_box()
    return found["x"], found["y"], found["x"] + found["width"], found["y"] + found["height"]


def test_generate_an_image_in_the_browser(app, browser):
    from playwright.sync_api import expect

    page = browser.new_page()
    image = generate(page, app["url"], 64, 64)
    assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) == 64
    expect(page.get_by_text("Models: stock, tuned, broken")).to_be_visible()
    # the LoRA scale appears, at the model's listed scale, only once a LoRA model is chosen
    scale = page.get_by_label("LoRA scale").first
    expect(scale).to_be_hidden()
    page.get_by_label("Model", exact=True).first.click()
    page.get_by_role("option", name="lora", exact=True).click()
    expect(scale).to_be_visible()
    expect(scale).to_have_value("0.5")
    page.close()


def test_wide_screen_shows_button_and_whole_enlarged_image_and_a_phone_one_column(app, browser, tmp_path):
    page = browser.new_page(viewport=WIDE)
    image = generate(page, app["url"], 128, 64)  # 64 px high and not square: the aspect ratio must survive
    page.evaluate("window.scrollTo(0, 0)")  # what the window shows without scrolling
    page.screenshot(path=tmp_path / "outputs" / "app-1366x768.png")
    button = page.get_by_role("button", name="Generate").first
    shown = page.evaluate(SHOWN_IMAGE, image.element_handle())
    for left, top, right, bottom in [box(button), shown["box"]]:
        assert 0 <= left < right <= WIDE["width"] and 0 <= top < bottom <= WIDE["height"]
    assert box(button)[2] <= shown["box"][0]  # controls on the left, the result on the right
    (width, height), (shown_width, shown_height) = shown["natural"], shown["shown"]
    assert (width, height) == (128, 64)
    assert shown_width / shown_height == pytest.approx(width / height, abs=2 / shown_height)  # within a pixel
    assert shown_height >= 2 * height and shown["rendering"] == "pixelated"  # enlarged, with sharp pixels

    page.set_viewport_size(NARROW)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=tmp_path / "outputs" / "app-412x915.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]  # nothing off the side
    result = page.locator(".sdtune-result").first
    assert box(result)[1] >= box(button)[3]  # one column: the result below the button
    page.close()



def test_each_session_has_its_own_history_and_send_to_fills_image_to_image(app, browser):
    from playwright.sync_api import expect

    pages = {seed: browser.new_context().new_page() for seed in (111, 222)}  # two users, two sessions
    for seed, page in pages.items():
        page.goto(app["url"])
        page.get_by_label("Prompt", exact=True).first.fill(f"session {seed}")
        for label, value in [("Width", 64), ("Height", 64), ("Steps", 2), ("Seed", seed)]:
            fill(page, label, str(value))
        page.get_by_role("button", name="Generate").first.click()
    for seed, page in pages.items():
        history = page.locator("#text2img-history")
        expect(history.locator(f"img[src*='-stock-{seed}.png']")).to_be_visible(timeout=60_000)
        expect(history.locator(f"img[src*='-stock-{333 - seed}.png']")).to_have_count(0)
    page = pages[111]
    page.get_by_role("button", name="Send to image→image").first.click()
    expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_label("Prompt", exact=True).filter(visible=True)).to_have_value("session 111")
    for page in pages.values():
        page.context.close()


@pytest.fixture(scope="module")
def models_app(tmp_path_factory, tiny_pipeline):
    """The app serving the tiny stock model, with a copy of its pipeline folder under its models root to add."""
    import shutil

    from helpers import serve_in_process

    root = tmp_path_factory.mktemp("models-root")
    shutil.copytree(tiny_pipeline, root / "copy")
    for app in serve_in_process(root, root, tiny_pipeline):
        yield {**app, "root": root}


def offered(page, name: str) -> bool:
    """Whether the text-to-image tab's model picker offers `name`, as its open list shows it."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text to image").click()
    page.get_by_label("Model", exact=True).first.click()
    expect(page.get_by_role("option", name="stock", exact=True)).to_be_visible()  # the list is open
    found = page.get_by_role("option", name=name, exact=True).count() > 0
    page.keyboard.press("Escape")
    return found


@pytest.mark.slow
def test_a_model_added_in_the_models_tab_is_offered_without_a_reload_and_removed(models_app, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport=WIDE)
    page.goto(models_app["url"])
    header = page.locator(".prose.sdtune-header").filter(has_text="Models:")  # the markdown, not its block
    expect(header).to_contain_text("Models: stock on cpu.")
    assert not offered(page, "copy")

    page.get_by_role("tab", name="Models").click()
    fill(page, "Name", "copy")
    fill(page, "Path under", "copy")
    page.get_by_role("button", name="Add model").click()
    expect(page.get_by_text("Added 'copy': pipeline copy.")).to_be_visible(timeout=60_000)
    expect(header).to_contain_text("Models: stock, copy on cpu.")  # the same page, not reloaded
    assert offered(page, "copy")

    page.get_by_role("tab", name="Models").click()
    page.get_by_label("Model to remove").click()
    page.get_by_role("option", name="copy", exact=True).click()
    page.get_by_role("button", name="Remove", exact=True).click()
    expect(page.get_by_text("Removed 'copy'")).to_be_visible(timeout=30_000)
    expect(header).to_contain_text("Models: stock on cpu.")
    assert not offered(page, "copy")
    page.close()
