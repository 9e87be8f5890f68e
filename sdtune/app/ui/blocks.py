"""The Gradio UI and API of gradio_app.py: its tabs in one Blocks, the header's model status, and the Stop buttons.

Generation runs one request at a time through the queue (sdtune/app/ui/controls.py); each tab's module holds its
controls and its handlers keep the API's parameter names.
"""

from functools import partial
from pathlib import Path

import gradio as gr

from sdtune.app.model_info import served_base_name
from sdtune.app.service import Service
from sdtune.app.ui.captions_tab import captions_tab
from sdtune.app.ui.compare_tab import COMPARE_TAB, compare_tab
from sdtune.app.ui.controls import default_size
from sdtune.app.ui.handlers import Handlers
from sdtune.app.ui.models_tab import Pickers, follow_changes, models_tab
from sdtune.app.ui.recall_tab import IMAGE_TAB, INFO_TAB, TEXT_TAB, png_info_tab, wire
from sdtune.app.ui.tabs import batch_tab, image_tab, text_tab
from sdtune.app.ui.train_api import train_endpoints
from sdtune.app.ui.train_tab import CompareTargets, train_tab

CSS_PATH = Path(__file__).with_name("style.css")  # the layout's and the result images' styles


def model_status(service: Service) -> str:
    """The header's line on what is served (the models a user can choose: a comparison's borrowed checkpoints left
    out), re-read at each page load and after each add and remove (models_tab.follow_changes)."""
    registry, names = service.registry, service.models.names
    lines = [f"Models: {', '.join(names)} on {service.backend.device.type}."]
    for name, spec in registry.specs.items():
        if spec.lora and name in names:
            base = served_base_name(registry.specs, spec)
            lines.append(f"**{name}** is a LoRA on `{base}`, at scale {spec.lora_scale:g} unless a request "
                         "sets its own.")
    for name, reason in registry.errors.items():
        lines.append(f"**{name} failed to load** and is unavailable: {reason}")
    return "\n\n".join(lines)


def backend_status(service: Service) -> None:
    """The generation backend's own status (Ray Serve: which replicas are up), read on page load and on Refresh;
    nothing for the local backend."""
    if service.backend.status() is None:
        return
    with gr.Row():
        status = gr.Markdown(service.backend.status)
        refresh = gr.Button("Refresh", size="sm", scale=0)
    refresh.click(service.backend.status, None, status, queue=False, api_visibility="private")


def build_ui(service: Service, jobs=None, captions=None) -> gr.Blocks:
    """The app; with `jobs` (a sdtune.jobs.api.TrainingJobs, gradio_app.py --train) also the Train tab and the
    training API, and with `captions` (a sdtune.app.captions.CaptionFolders, also --train's) the Captions tab."""
    names, handlers = service.registry.names, Handlers(service)
    # delete_cache: Gradio copies every upload and output into its temp folder; drop copies older than a day
    with gr.Blocks(title="sdtune", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# sdtune: stock and fine-tuned Stable Diffusion", elem_classes=["sdtune-header"])
        status = partial(model_status, service)
        header = gr.Markdown(status(), elem_classes=["sdtune-header"])
        # re-read at each page load; a callable value would also make it a public endpoint named after the callable
        demo.load(status, None, header, queue=False, api_visibility="private")
        backend_status(service)
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id=TEXT_TAB):
                text_event, text_stop, text_form = text_tab(handlers, names, default_size(service))
            with gr.Tab("Image to image", id=IMAGE_TAB):
                image_event, image_stop, image_form = image_tab(handlers, names)
            with gr.Tab("Compare", id=COMPARE_TAB):
                _, compare_stop, compare_models, (compare_prompt, compare_seed) = compare_tab(
                    handlers, names, default_size(service))
            with gr.Tab("Random-model batch"):
                _, batch_stop, batch_models = batch_tab(handlers, names, service.allowed_root_shown)
            with gr.Tab("PNG info", id=INFO_TAB):
                info = png_info_tab(service.registry)
            with gr.Tab("Models"):
                added, removed, own, base = models_tab(service.models, service.models.root_shown)
            if captions is not None:
                with gr.Tab("Captions"):
                    captions_tab(captions)
            if jobs is not None:  # gradio_app.py --train only (README, "Training in the app")
                with gr.Tab("Train"):
                    train_base = train_tab(jobs, service,
                                           CompareTargets(tabs, compare_prompt, compare_models, compare_seed))
        pickers = Pickers([text_form.model, image_form.model, *own.single], [compare_models, batch_models])
        bases = [base] if jobs is None else [base, train_base]
        follow_changes(service.models, [added, removed], pickers, bases, header, status)
        wire(text_form, image_form, info, tabs, service.registry, {TEXT_TAB: text_event, IMAGE_TAB: image_event})
        for button in (text_stop, image_stop, batch_stop, compare_stop):
            # a running generation stops at its next denoising step (a batch or comparison keeps what it finished
            # before: so it is stopped by its flag, not cancelled); a queued text or image request is cancelled, a
            # queued batch or comparison finds its flag set when it starts and ends at once
            button.click(handlers.stops.stop, None, None, cancels=[text_event, image_event],
                         api_visibility="private", queue=False)
        if jobs is not None:
            train_endpoints(jobs)
    return demo
