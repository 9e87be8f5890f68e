"""gradio_app.py's command line: its flags and the checks that need no model. This module imports nothing heavy, so
`--help` and a mistyped flag answer at once; gradio_app.py parses here first and imports torch, diffusers and Gradio
only when there is work to do. (The other commands' flags: sdtune/training/config.py, sdtune/evaluation/flags.py,
sdtune/batch/cli.py, equally light.)"""

import argparse
import importlib.util
import os

from sdtune.errors import SdtuneError
from sdtune.generation.flags import DEVICES, add_compile_flag
from sdtune.limits import DEFAULT_MAX_REQUEST_COST

AUTH_VARIABLE = "SDTUNE_AUTH"


def app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradio_app.py", description="Serve Stable Diffusion models with Gradio.",
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
                             "images / 10^6; image to image: steps x strength); a random batch is bounded per "
                             "image. Default by device: "
                             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MAX_REQUEST_COST.items()))
    parser.add_argument("--models_root", "--models-root", dest="models_root", default=".",
                        help="The Models tab and /add_model add models from under this folder only (and with --train, "
                             "a job's base model is a served model or a folder under it). Added models are kept in "
                             "OUTPUT_DIR/models_added.yaml and served again at the next start.")
    parser.add_argument("--lazy", action="store_true", help="Load each model on first use instead of at start.")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--cache_dir", "--cache-dir", dest="cache_dir", default=None,
                        help="Where hub models are cached.")
    add_ray_flags(parser)
    add_compile_flag(parser)
    add_train_flags(parser)
    return parser


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Training jobs from the app (sdtune/jobs): their API endpoints exist only with --train."""
    train = parser.add_argument_group("training jobs (README, \"Training jobs\")")
    train.add_argument("--train", action="store_true",
                       help="Serve the training jobs' API (/train_start, /train_status, /train_stop, /train_resume, "
                            "/train_list) and the Captions tab: jobs train in their own process, one at a time, "
                            "their folders under OUTPUT_DIR/jobs. With --share or a --host other than this machine "
                            "it needs --auth.")
    train.add_argument("--data_root", "--data-root", dest="data_root", default="data",
                       help="With --train: jobs read training data, and the Captions tab edits caption files, in "
                            "folders under this one only.")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """Where generation runs: in the app's process, or on a Ray Serve deployment (sdtune/app/ray_backend.py)."""
    ray = parser.add_argument_group("Ray Serve backend (pip install -r requirements-serve.txt)")
    ray.add_argument("--backend", default="local", choices=["local", "ray"],
                     help="local: generate in the app's process; ray: on Ray Serve replicas, one per GPU (or per "
                          "--replica_cpus CPUs), the app being their front end.")
    ray.add_argument("--replicas", type=int, default=None, help="Replicas to run (default 1).")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="Let Ray Serve scale the replicas between MIN and MAX with the load, instead of --replicas.")
    ray.add_argument("--ray_address", default=None,
                     help="A running Ray cluster: auto (the one this machine belongs to) or HOST:PORT of its head. "
                          "Default: start a local one for this app.")
    ray.add_argument("--replica_cpus", type=int, default=1,
                     help="CPUs each replica takes (and torch threads it runs); on GPUs each replica also takes one "
                          "GPU.")
    ray.add_argument("--models_per_replica", type=int, default=3,
                     help="Models one replica keeps loaded; loading one more evicts the least recently used.")


RAY_FLAGS = ("replicas", "autoscale", "ray_address", "replica_cpus", "models_per_replica")


def parse_app_args(argv=None) -> argparse.Namespace:
    args = app_parser().parse_args(argv)
    if args.max_request_cost is not None and not args.max_request_cost > 0:
        raise SdtuneError(f"--max_request_cost must be above 0, not {args.max_request_cost}.")
    check_ray_flags(args)
    check_train_flags(args)
    return args


LOOPBACK_HOSTS = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_train_flags(args: argparse.Namespace) -> None:
    """Training from a browser writes files and spends the GPU for hours: --train reachable from other machines
    (--share, or a --host other than loopback) only for signed-in users, each controlling their own jobs."""
    if not args.train:
        return
    exposed = "--share" if args.share else None if is_loopback(args.host) else f"--host {args.host}"
    if exposed and parse_auth(args.auth) is None:
        raise SdtuneError(f"--train with {exposed} needs --auth user:password (or {AUTH_VARIABLE}): anyone reaching "
                          "the app could otherwise train on this machine. Add --auth, or serve on 127.0.0.1.")


def check_ray_flags(args: argparse.Namespace) -> None:
    """The Ray flags' values, and Ray itself when --backend ray asks for it (found without importing it)."""
    if args.backend != "ray":
        given = [f"--{name}" for name in RAY_FLAGS if getattr(args, name) != app_parser().get_default(name)]
        if given:
            raise SdtuneError(f"{', '.join(given)} apply to --backend ray only.")
        return
    if importlib.util.find_spec("ray") is None:
        raise SdtuneError("--backend ray needs Ray Serve: pip install -r requirements-serve.txt "
                          '(or pip install "ray[serve]").')
    if args.replicas is not None and args.autoscale is not None:
        raise SdtuneError("Give --replicas or --autoscale, not both.")
    args.autoscale = parse_autoscale(args.autoscale)
    for name in ("replicas", "replica_cpus", "models_per_replica"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SdtuneError(f"--{name} must be at least 1, not {getattr(args, name)}.")


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    """'MIN:MAX' -> (MIN, MAX), 0 <= MIN <= MAX, MAX >= 1."""
    if value is None:
        return None
    low, separator, high = value.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not separator or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise SdtuneError(f"--autoscale must be MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, e.g. 1:4, "
                          f"not {value}.")
    return bounds


def parse_auth(value: str | None):
    """'user:password' -> (user, password); None when no authentication is wanted."""
    value = value or os.environ.get(AUTH_VARIABLE)
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise SdtuneError(f"--auth / {AUTH_VARIABLE} must be user:password.")
    return user, password
