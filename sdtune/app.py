"""gradio_app.py's command line: load the models, build the UI, launch."""

import argparse
import logging
import os
import tempfile
from pathlib import Path

from sdtune.errors import SdtuneError, exit_on_error
from sdtune.logs import setup_logging
from sdtune.registry import ModelRegistry, read_model_list
from sdtune.serving import DEFAULT_MAX_REQUEST_COST, Service
from sdtune.webui import build_ui

logger = logging.getLogger("sdtune.app")

AUTH_VARIABLE = "SDTUNE_AUTH"
# show_error: a file Gradio itself cannot open (not an image) reaches API clients with its reason. No allowed_paths:
# Gradio copies each file a handler returns into its cache under a secret-keyed hash and serves only that copy, so
# a session can fetch what it was given and nothing else of the output folder (run log, other runs).
LAUNCH_OPTIONS = dict(show_error=True, max_file_size="50mb")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve Stable Diffusion models with Gradio.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="configs/models.yaml", help="YAML list of {name, path} to serve.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Also open a public Gradio share link.")
    parser.add_argument("--auth", default=None,
                        help=f"user:password required to open the app (or set {AUTH_VARIABLE}).")
    parser.add_argument("--allowed-root", "--allowed_root", dest="allowed_root", default="data/input_images",
                        help="The batch tab reads folders under this one only.")
    parser.add_argument("--output_dir", "--output-dir", default="outputs/app",
                        help="Where generated PNGs, batch zips and runs.jsonl go; inside the working directory or "
                             "the temp folder (Gradio hands out copies of files from there only). Never served.")
    parser.add_argument("--max_request_cost", "--max-request-cost", type=float, default=None,
                        help="Most work one request may ask for, in megapixel-steps (width x height x steps x "
                             "images / 10^6; image to image: steps x strength); a random batch is bounded per image. "
                             "Default by device: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MAX_REQUEST_COST.items()))
    parser.add_argument("--lazy", action="store_true", help="Load each model on first use instead of at start.")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--cache_dir", "--cache-dir", dest="cache_dir", default=None,
                        help="Where hub models are cached.")
    return parser


def parse_auth(value: str | None):
    """'user:password' -> (user, password); None when no authentication is wanted."""
    value = value or os.environ.get(AUTH_VARIABLE)
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise SdtuneError(f"--auth / {AUTH_VARIABLE} must be user:password.")
    return user, password


def check_output_dir(path) -> None:
    """Gradio refuses to hand out a returned file from outside the working directory and the temp folder."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in (os.getcwd(), tempfile.gettempdir())):
        raise SdtuneError(f"--output_dir {path} must be inside the working directory or {tempfile.gettempdir()}: "
                         "Gradio hands out copies of generated files from there only.")


@exit_on_error()
def main(argv=None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    check_output_dir(args.output_dir)
    if args.share and auth is None:
        logger.warning("--share without --auth: anyone with the link can use your GPU. Add --auth user:password.")
    registry = ModelRegistry(read_model_list(args.models), device=args.device, cache_dir=args.cache_dir,
                             lazy=args.lazy)
    if not args.lazy and len(registry.errors) == len(registry.names):
        logger.error("No model could be loaded; the app starts so the errors can be read in it.")
    Path(args.allowed_root).mkdir(parents=True, exist_ok=True)  # the batch tab's folder mode works on a fresh clone
    service = Service(registry, args.output_dir, args.allowed_root, max_request_cost=args.max_request_cost)
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, prevent_thread_lock=True,
                **LAUNCH_OPTIONS)
    if args.share and not demo.share_url:
        logger.warning("The share link could not be created (no internet access?); serving locally only.")
    demo.block_thread()
