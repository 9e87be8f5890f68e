"""Generation on Ray Serve (`gradio_app.py --backend ray`): the app stays the front end (checks, PNG saving, run log)
and each generation runs on a replica of the `Generator` deployment, one per GPU (or per --replica_cpus CPUs), on
this machine or across a Ray cluster. Imported only for --backend ray.

Models are multiplexed: a request carries its model's name as its multiplexed model id, Serve sends it to a replica
that already holds that model when one is free, and a replica keeps at most --models_per_replica models loaded,
evicting the least recently used one to load another (a LoRA model costs only its adapter when its base is loaded).
"""

import asyncio
import logging
import socket
import threading
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import RayServeException

from sdtune.errors import SdtuneError
from sdtune.generation.core import Interrupted, images_to_images, text_to_images
from sdtune.generation.registry import ModelRegistry, ModelSpec, looks_local

logger = logging.getLogger(__name__)

APP, DEPLOYMENT = "sdtune", "Generator"
CONNECT_SECONDS = 5.0  # how long a --ray_address head may take to accept a connection before we give up
POLL_SECONDS = 0.2  # how often a request waiting on a replica looks at its Stop flag


class ReplicaLost(SdtuneError, RuntimeError):
    """A request whose replica died twice in a row (a RuntimeError: a batch records it in the image's row)."""


class HeldModel:
    """A model in a replica's multiplexing cache. Serve calls `__del__` when it evicts the model, which unloads it from
    the replica's registry; Python calls it again when the object is collected, and only the first call counts."""

    def __init__(self, registry: ModelRegistry, name: str):
        self.registry, self.name, self.held = registry, name, False
        registry.get(name)  # loads it, or raises ModelUnavailable to this request alone
        self.held = True

    def __del__(self):
        if self.held:
            self.held = False
            self.registry.unload(self.name)


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=1)
class Generator:
    """One replica: a registry on its device whose loaded models Serve's multiplexing bounds. It runs one request at
    a time: models on one base share its pipeline and switch adapters per request, and the device runs one anyway."""

    def __init__(self, specs: list[ModelSpec], device: str, threads: int, models_per_replica: int, compile: bool):
        torch.set_num_threads(threads)
        self.registry = ModelRegistry(specs, device=device, lazy=True, compile=compile)

        async def hold(model: str) -> HeldModel:
            return await asyncio.to_thread(HeldModel, self.registry, model)

        # wired here rather than by decorating a method: the cache's size is a flag
        self.hold = serve.multiplexed(max_num_models_per_replica=models_per_replica)(hold)

    async def text_to_images(self, lora_scale, prompt, seeds, settings):
        return await self._generate(text_to_images, lora_scale, prompt, seeds, settings)

    async def images_to_images(self, lora_scale, images, prompts, seeds, settings, resolution):
        return await self._generate(images_to_images, lora_scale, images, prompts, seeds, settings, resolution)

    async def _generate(self, core, lora_scale, *args):
        """Run the generation core on the request's model in a worker thread. A cancelled request (the app's Stop)
        sets the core's stop flag and waits for it to end at its next denoising step before the replica takes the
        next request, which would otherwise share the pipeline with it."""
        model = serve.get_multiplexed_model_id()
        await self.hold(model)
        pipeline, stop = self.registry.get(model, lora_scale), threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(core, pipeline, *args, stop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([work])
            raise


class RayBackend:
    """The app's side of the deployment, with LocalBackend's calls (sdtune/generation/backend.py). A call whose replica
    dies mid-request is sent once more, to another replica: generation is deterministic, so it gives the same image."""

    def __init__(self, handle, registry: ModelRegistry, concurrency: int, device: str):
        self.handle, self.registry = handle, registry
        self.device = torch.device(device)  # the replicas': the app's own process generates nothing
        self.concurrency = concurrency  # requests the app lets run at once: one per replica at most

    def load(self, model: str, lora_scale: float | None = None) -> None:
        """Nothing loads here (a replica loads a model on its first request there); an unlisted model is refused."""
        self.registry.require_listed(model)

    # `preview` is accepted and not called: the replicas send back finished images only, so the app shows no live
    # previews over Ray
    def text_to_images(self, model, lora_scale, prompt, seeds, settings, stop=None, preview=None):
        return self.call("text_to_images", model, stop, lora_scale, prompt, seeds, settings)

    def images_to_images(self, model, lora_scale, images, prompts, seeds, settings, resolution, stop=None,
                         preview=None):
        return self.call("images_to_images", model, stop, lora_scale, images, prompts, seeds, settings, resolution)

    def call(self, method: str, model: str, stop: threading.Event | None, *args):
        lost = None
        for _ in range(2):
            response = getattr(self.handle.options(multiplexed_model_id=model), method).remote(*args)
            try:
                return wait_for(response, stop)
            except RayActorError as error:  # ActorDiedError, ActorUnavailableError: Serve does not resend it
                lost = error
                logger.warning("A replica stopped during a request for '%s'; sending it once more.", model)
        raise ReplicaLost(f"Two replicas stopped while generating with '{model}' ({type(lost).__name__}); the "
                          "service keeps running on the others: send the request again.")

    def status(self) -> str:
        """Which replicas are up, as Ray Serve sees them now."""
        deployment = serve.status().applications[APP].deployments.get(DEPLOYMENT)
        if deployment is None:
            return "**Ray Serve**: the deployment is not running."
        # the states are str enums (RUNNING, STARTING, ...): lower() reads their values
        states = ", ".join(f"{count} {state.lower()}" for state, count in deployment.replica_states.items())
        detail = f": {deployment.message}" if deployment.message else ""
        return f"**Ray Serve replicas**: {states or 'none'} (deployment {deployment.status.lower()}{detail})."


def wait_for(response, stop: threading.Event | None):
    """The response's images, a replica's own error (ModelUnavailable, GenerationError) raised as itself; Stop
    cancels the request, which ends its generation at the next denoising step."""
    while True:
        try:
            return response.result(timeout_s=POLL_SECONDS)
        except TimeoutError:
            if stop is not None and stop.is_set():
                response.cancel()
                raise Interrupted("Generation stopped.") from None
        except RayTaskError as error:
            raise error.cause from None


def start(registry: ModelRegistry, replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
          address: str | None = None, replica_cpus: int = 1, models_per_replica: int = 3,
          device: str = "auto") -> RayBackend:
    """Deploy `Generator` serving the registry's models and return the app's backend for it. Without `address` a
    local cluster just big enough for the replicas starts; with one, the replicas must fit the cluster."""
    replicas = replicas or 1
    least, most = autoscale or (replicas, replicas)
    connect(address, most * replica_cpus)
    device = replica_device(device, ray.cluster_resources().get("GPU", 0))
    resources = {"num_cpus": replica_cpus, "num_gpus": 1 if device == "cuda" else 0}
    check_fits(least, resources)
    scaling = ({"autoscaling_config": {"min_replicas": least, "max_replicas": most}} if autoscale
               else {"num_replicas": replicas})
    specs = [absolute(spec) for spec in registry.specs.values()]
    app = Generator.options(ray_actor_options=resources, **scaling).bind(specs, device, replica_cpus,
                                                                         models_per_replica, registry.compile)
    serve.start(proxy_location="Disabled")  # the app calls the replicas through a handle: no HTTP proxy
    try:
        handle = serve.run(app, name=APP, route_prefix=None)
    except RayServeException as error:
        raise SdtuneError(f"The Ray Serve deployment did not start: {error}") from error
    logger.info("Ray Serve: %s replica(s) of %s on %s", autoscale or replicas, DEPLOYMENT, device)
    return RayBackend(handle, registry, most, device)


def connect(address: str | None, num_cpus: int) -> None:
    """Join the cluster at `address`, or start a local one with `num_cpus` CPUs; a program (or test) already
    connected keeps its cluster."""
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False)  # no dashboard: processes and a port the app not needs
        return
    check_reachable(address)
    try:  # an address that accepts the connection but is no Ray head fails after Ray's own retries (20-40 s)
        ray.init(address=address)
    except ConnectionError as error:
        raise SdtuneError(f"--ray_address {address}: no Ray cluster found ({error}). Start one with `ray start "
                          "--head`, or leave --ray_address out for a local one.") from error


def check_reachable(address: str) -> None:
    """Fail within CONNECT_SECONDS for a HOST:PORT that does not answer: ray.init would wait far longer."""
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not port.isdigit():
        return  # "auto": Ray looks for a cluster on this machine and says at once if there is none
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise SdtuneError(f"--ray_address {address}: cannot reach a Ray head there within {CONNECT_SECONDS:g} s "
                          f"({error}). Check the address (`ray start --head` prints it).") from error


def replica_device(device: str, gpus: float) -> str:
    """The replicas' device: a GPU each when the cluster has GPUs (and --device allows), else the CPU (or --device)."""
    if device in ("auto", "cuda") and gpus >= 1:
        return "cuda"
    if device == "cuda":
        raise SdtuneError("--device cuda, but the Ray cluster has no GPU.")
    return "cpu" if device == "auto" else device


def check_fits(replicas: int, resources: dict) -> None:
    """Refuse replicas the cluster cannot hold: Serve would wait for them forever."""
    total = ray.cluster_resources()
    for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        needed = replicas * resources[name]
        if needed > total.get(key, 0):
            raise SdtuneError(f"{replicas} replicas need {needed:g} {key}s; the Ray cluster has "
                              f"{total.get(key, 0):g}. Lower --replicas (or --replica_cpus) or add machines.")


def absolute(spec: ModelSpec) -> ModelSpec:
    """A spec whose local paths are absolute: a replica's working directory is Ray's, not the app's."""
    def resolved(path):
        return str(Path(path).expanduser().resolve()) if path and (Path(path).exists() or looks_local(path)) else path
    return replace(spec, path=resolved(spec.path), lora=resolved(spec.lora))
