"""A screenshot of one tab of the app as a 1366x768 browser window shows it, for README's pictures under docs/.

Starts the app in this process on a model list (the tiny world's by default, so it runs on a CPU in seconds), opens
it in Debian's chromium driven by Playwright, picks the tab, fills fields by their labels, clicks a button, waits for
the tab's result image (components of class sdtune-result) and saves the window as a PNG. From the repository root,
after `make demo` (which trains outputs/tiny-finetuned, the list's second model):

    python docs/screenshot.py --tab "Text to image" --fill "Prompt=$PROMPT" --fill Steps=20 --fill Seed=3 \
        --click Generate --output docs/app-text2img.png
    python docs/screenshot.py --tab Compare --fill "Prompt=$PROMPT" --fill Values=3 --fill Seed=1 --fill Steps=20 \
        --click Compare --output docs/app-compare.png

with PROMPT="a drawing of a yellow creature with long ears on a white background" (configs/tiny_prompts.txt).
The Train tab's picture is of a finished job: with --train_job the app has a Train tab, the recipe's job (the
--train_flags YAML over it) is trained through its queue first (about 3 minutes for this one on 2 CPU cores), and the
shot waits for the job's loss plots and validation grid:

    python docs/screenshot.py --models configs/models-tiny-stock.yaml --tab Train --train_job tiny-lora \
        --train_flags "$(cat docs/screenshot-job.yaml)" --window 1366x1300 --output docs/app-train.png

A field is a labelled box (Prompt) or a slider's number box (Steps, Width). Without --click the tab is shown as it
opens.
"""

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import this sdtune

from sdtune.app.launch import LAUNCH_OPTIONS  # noqa: E402
from sdtune.app.service import Service  # noqa: E402
from sdtune.app.ui.blocks import build_ui  # noqa: E402
from sdtune.generation.registry import ModelRegistry, read_model_list  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's: Playwright downloads none
# Without these, chromium tries to reach Google's services at start, which a closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
RESULT_WAIT_MS = 300_000  # a generation on a CPU: seconds for the tiny world, minutes for SD v1-4
# Done: no component shows Gradio's progress overlay (its status tracker is hidden when idle), and every result image
# shown has loaded its file (Gradio's gallery loads lazily, so a visible img may still be empty).
FINISHED = """() => [...document.querySelectorAll("[data-testid=status-tracker]")]
        .every(e => e.classList.contains("hide"))
    && [...document.querySelectorAll(".sdtune-result img")].every(img => !img.offsetParent || img.complete)"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="configs/models-tiny.yaml", help="the app's model list")
    parser.add_argument("--tab", default="Text to image", help="the tab to show, by its title")
    parser.add_argument("--fill", action="append", default=[], metavar="LABEL=VALUE",
                        help="set the field with this label before clicking (repeatable)")
    parser.add_argument("--click", help="the button to click in the tab (e.g. Generate); left out: no click")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--window", default="1366x768", help="the browser window's inner size, WIDTHxHEIGHT")
    parser.add_argument("--train_job", metavar="RECIPE",
                        help="with a Train tab: train a job of configs/RECIPE.yaml first and show it")
    parser.add_argument("--train_flags", default="", help="the job's other trainer flags as YAML (the tab's Advanced)")
    args = parser.parse_args(argv)
    args.fields = [split_field(text, parser) for text in args.fill]
    try:
        args.width, args.height = (int(side) for side in args.window.split("x"))
    except ValueError:
        parser.error(f"--window {args.window} must be WIDTHxHEIGHT, e.g. 1366x768")
    return args


def split_field(text: str, parser) -> tuple[str, str]:
    label, equals, value = text.partition("=")
    if not equals or not label:
        parser.error(f"--fill {text} must be LABEL=VALUE, e.g. Prompt=a red circle")
    return label, value


def start_app(models, folder: Path, jobs=None):
    """The app on the listed models, on the CPU, serving in a background thread; its outputs go to `folder`. With
    `jobs` (a TrainingJobs) it has the Train tab and serves each job that ends done, as gradio_app.py --train does."""
    service = Service(ModelRegistry(read_model_list(models), device="cpu"), folder / "outputs", folder / "inputs")
    if jobs is not None:
        from sdtune.app.job_models import serve_finished

        service.models.allow_root(jobs.jobs_root)
        jobs.on_done(lambda finished: serve_finished(service.models, finished))
    demo = build_ui(service, jobs)
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **LAUNCH_OPTIONS)
    return demo


def training_jobs(folder: Path):
    """The Train tab's queue in `folder`, on this repository's data/ and tinyworld/ models."""
    from sdtune.jobs.api import TrainingJobs

    repository = Path(__file__).resolve().parents[1]
    return TrainingJobs(folder / "jobs", repository / "data", [repository / "tinyworld", repository / "models"])


def train(jobs, recipe: str, flags: str) -> None:
    """One job of `recipe` with the `flags` YAML over it, trained to its end through the queue and trainer process
    the Train tab uses."""
    from sdtune.jobs.api import wait_for
    from sdtune.jobs.store import ENDED

    job_id = jobs.start(None, recipe, recipe, None, flags)
    ended = wait_for(jobs, job_id, ENDED, timeout=3600)
    if ended["state"] != "done":
        raise SystemExit(f"The job ended {ended['state']}: " + "\n".join(jobs.status(None, job_id)["log_tail"]))


def fill(page, label: str, value: str) -> None:
    """Type `value` into a shown field: the number box of the slider called `label`, else the text or number box whose
    label starts with `label` ("Seed" for "Seed (0 to ...)"; a box's name includes its info text). Role queries skip
    hidden tabs' fields."""
    slider = page.get_by_role("spinbutton", name=f"number input for {label}", exact=True)
    if slider.count():
        slider.first.fill(value)
        slider.first.press("Enter")  # a slider takes a typed number when it is entered
        return
    named = re.compile("^" + re.escape(label))
    page.get_by_role("textbox", name=named).or_(page.get_by_role("spinbutton", name=named)).first.fill(value)


def wait_for_result(page, timeout_ms: int = RESULT_WAIT_MS) -> None:
    """Wait until the shown tab has a result image and its request has finished."""
    from playwright.sync_api import expect

    expect(page.locator(".sdtune-result img:visible").first).to_be_visible(timeout=timeout_ms)
    page.wait_for_function(FINISHED, timeout=timeout_ms)


def screenshot(url: str, args) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            page.get_by_role("tab", name=args.tab, exact=True).click()
            expect(page.get_by_role("tab", name=args.tab, exact=True)).to_have_attribute("aria-selected", "true")
            for label, value in args.fields:
                fill(page, label, value)
            if args.train_job:  # the newest job is shown once the tab's timer has read it
                expect(page.locator(".block").filter(has_text="Validation grids").locator("img").first).to_be_visible(
                    timeout=60_000)
                page.wait_for_function(FINISHED, timeout=60_000)
            if args.click:
                page.get_by_role("button", name=args.click, exact=True).click()
                wait_for_result(page)
            page.evaluate("window.scrollTo(0, 0)")  # the window as it opens: clicks scroll their target into view
            page.screenshot(path=args.output)
        finally:
            browser.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdtune-screenshot-") as folder:
        jobs = training_jobs(Path(folder)) if args.train_job else None
        demo = start_app(args.models, Path(folder), jobs)
        try:
            if jobs is not None:
                train(jobs, args.train_job, args.train_flags)
            screenshot(demo.local_url, args)
        finally:
            demo.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
