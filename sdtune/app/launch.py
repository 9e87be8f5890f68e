"""gradio_app.py's command line: load the models, build the UI, launch."""

import logging
import os
import tempfile
from pathlib import Path

from sdtune.app.flags import parse_auth
from sdtune.app.service import Service
from sdtune.app.ui.blocks import CSS_PATH, build_ui
from sdtune.errors import SdtuneError
from sdtune.generation.backend import LocalBackend
from sdtune.generation.registry import ModelRegistry, read_model_list
from sdtune.logs import setup_logging

logger = logging.getLogger("sdtune.app.launch")

# show_error: a file Gradio itself cannot open (not an image) reaches API clients with its reason. No allowed_paths:
# Gradio copies each file a handler returns into its cache under a secret-keyed hash and serves only that copy, so
# a session can fetch what it was given and nothing else of the output folder (run log, other runs). css_paths: the
# UI's layout and image styles (Gradio 6 takes custom CSS at launch, no longer in gr.Blocks).
LAUNCH_OPTIONS = dict(show_error=True, max_file_size="50mb", css_paths=[CSS_PATH])


def check_output_dir(path) -> None:
    """Gradio refuses to hand out a returned file from outside the working directory and the temp folder."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in (os.getcwd(), tempfile.gettempdir())):
        raise SdtuneError(f"--output_dir {path} must be inside the working directory or {tempfile.gettempdir()}: "
                         "Gradio hands out copies of generated files from there only.")


def generation_backend(args, registry: ModelRegistry):
    """Where generation runs: in this process, or on Ray Serve replicas (Ray is imported for --backend ray only)."""
    if args.backend == "local":
        return LocalBackend(registry)
    from sdtune.app import ray_backend

    return ray_backend.start(registry, args.replicas, args.autoscale, args.ray_address, args.replica_cpus,
                             args.models_per_replica, args.device)


def training_jobs(args, registry: ModelRegistry, auth: bool, models):
    """--train's queue under OUTPUT_DIR/jobs, its scheduler started: jobs found running from an earlier app are
    watched again, those that died with it are marked interrupted. Bases: the served models' folders and
    --models_root; data: --data_root. A job that ends done has its model served (sdtune/app/job_models.py) until
    the job is deleted."""
    from sdtune.app.job_models import serve_finished, unserve_deleted
    from sdtune.jobs.api import TrainingJobs  # only with --train

    served = [Path(spec.path) for spec in registry.specs.values() if Path(spec.path).is_dir()]
    jobs = TrainingJobs(jobs_root(args), args.data_root, [*served, Path(args.models_root)], auth=auth,
                        on_done=lambda finished: serve_finished(models, finished))
    jobs.on_delete(lambda output: unserve_deleted(models, output))
    jobs.runner.tick()
    jobs.runner.start_scheduler()
    return jobs


def jobs_root(args) -> Path:
    return Path(args.output_dir) / "jobs"


def caption_folders(args, registry: ModelRegistry):
    """--train's Captions tab: the caption files of folders under --data_root, captioners from --models_root or the
    hub, run on the app's device."""
    from sdtune.app.captions import CaptionFolders

    Path(args.data_root).mkdir(parents=True, exist_ok=True)  # the tab works on a fresh clone
    return CaptionFolders(args.data_root, args.models_root, str(registry.device), models_root_shown=args.models_root)


def serve(args) -> None:
    """Load the models, build the UI and serve it until interrupted."""
    setup_logging()
    auth = parse_auth(args.auth)
    check_output_dir(args.output_dir)
    if args.share and auth is None:
        logger.warning("--share without --auth: anyone with the link can use your GPU. Add --auth user:password.")
    # with --backend ray the models load in the replicas (on --device): this process's registry only describes them,
    # on the CPU, so that the app never opens a CUDA context on a GPU a replica holds
    device = args.device if args.backend == "local" else "cpu"
    registry = ModelRegistry(read_model_list(args.models), device=device, cache_dir=args.cache_dir,
                             lazy=args.lazy or args.backend == "ray", compile=args.compile,
                             previews=args.backend == "local")
    if not args.lazy and len(registry.errors) == len(registry.names):
        logger.error("No model could be loaded; the app starts so the errors can be read in it.")
    Path(args.allowed_root).mkdir(parents=True, exist_ok=True)  # the batch tab's folder mode works on a fresh clone
    backend = generation_backend(args, registry)
    service = Service(registry, args.output_dir, args.allowed_root, max_request_cost=args.max_request_cost,
                      backend=backend, models_root=args.models_root)
    if args.train:  # finished jobs' models are served from their folders (before restore: it serves them again)
        service.models.allow_root(jobs_root(args))
    service.models.restore()  # the models added while serving before, after the configured list
    jobs = training_jobs(args, registry, auth is not None, service.models) if args.train else None
    if jobs is not None and args.backend == "local":  # README "Training jobs": one device, two jobs
        from sdtune.jobs.sharing import generation_gate

        service.device_gate = generation_gate(jobs, registry)
    demo = build_ui(service, jobs, caption_folders(args, registry) if args.train else None)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, prevent_thread_lock=True,
                **LAUNCH_OPTIONS)
    if args.share and not demo.share_url:
        logger.warning("The share link could not be created (no internet access?); serving locally only.")
    demo.block_thread()
