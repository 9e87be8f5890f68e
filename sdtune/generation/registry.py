"""Served and scored models: each loaded once, with identical components shared between them.

After this project's fine-tune only the UNet differs from the stock model, so two models cost one pipeline plus one
UNet: every component folder gets a content fingerprint, and a component whose fingerprint is already loaded is
passed to `from_pretrained` instead of being loaded again. Only safetensors are ever read.

A LoRA model is a base plus an adapter: every model on the same base uses that base's one pipeline, each LoRA model
as a named adapter on it, and `get` switches the active adapter rather than loading anything.
"""

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from sdtune.errors import SdtuneError
from sdtune.generation.adapters import activate_adapter, check_adapter
from sdtune.generation.compiling import AdapterSlot, compile_unet_for_serving
from sdtune.generation.preview import latent_preview
from sdtune.limits import check_lora_scale

logger = logging.getLogger(__name__)

SHAREABLE = ("vae", "text_encoder", "unet", "safety_checker")  # components with weights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # hub id or local pipeline folder
    revision: str | None = None
    variant: str | None = None
    lora: str | None = None  # a LoRA adapter on `path`: an output folder of --lora_rank, or a .safetensors file
    lora_scale: float = 1.0  # how much of the adapter: 0 is the base model

    def __post_init__(self):
        check_lora_scale(self.lora_scale, f"Model '{self.name}': lora_scale")  # the app offers it as the default


class ModelUnavailable(SdtuneError, RuntimeError):
    """A model that is not in the list or failed to load. Still a RuntimeError: the batches record it as a failed
    image or batch and go on, as they do for other runtime failures."""


def read_model_list(path) -> list[ModelSpec]:
    """The `models:` list of a YAML file such as configs/models.yaml."""
    if not Path(path).is_file():
        raise SdtuneError(f"Model list {path} not found; see configs/models.yaml for the format.")
    entries = (yaml.safe_load(Path(path).read_text()) or {}).get("models") or []
    specs = [ModelSpec(**entry) for entry in entries]
    check_unique_names(specs, path)
    return specs


def parse_model_flags(values: list[str]) -> list[ModelSpec]:
    """`name=path[,lora=ADAPTER][,lora_scale=S]` from the command line, or a single YAML model list."""
    if len(values) == 1 and values[0].endswith((".yaml", ".yml")):
        return read_model_list(values[0])
    specs = []
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise SdtuneError(f"--models {value}: expected name=path_or_hub_id, "
                              "e.g. stock=CompVis/stable-diffusion-v1-4")
        path, *options = path.split(",")
        specs.append(ModelSpec(name, path, **lora_options(value, options)))
    check_unique_names(specs, "--models")
    return specs


def lora_options(value: str, options: list[str]) -> dict:
    """The `lora=` and `lora_scale=` options of a --models value."""
    settings = dict(option.partition("=")[::2] for option in options)
    unknown = sorted(set(settings) - {"lora", "lora_scale"})
    if unknown:
        raise SdtuneError(f"--models {value}: unknown options {unknown}; expected "
                          "name=path[,lora=ADAPTER][,lora_scale=0.8], e.g. pokemon-lora=CompVis/stable-diffusion-v1-4,"
                          "lora=./sd-pokemon-lora")
    if "lora_scale" in settings:
        try:
            settings["lora_scale"] = float(settings["lora_scale"])
        except ValueError as error:
            raise SdtuneError(f"--models {value}: lora_scale must be a number.") from error
    return settings


def check_unique_names(specs, source) -> None:
    names = [spec.name for spec in specs]
    if not names:
        raise SdtuneError(f"{source}: the model list is empty.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SdtuneError(f"{source}: duplicate model names {duplicates}.")


def source_of(spec: ModelSpec) -> tuple:
    """What identifies a base pipeline: models with the same source share one."""
    return spec.path, spec.revision, spec.variant


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 elsewhere (fp16 on CPU is slow, and on MPS it can give black images)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def local_folder(spec: ModelSpec, cache_dir=None) -> Path:
    """The pipeline's files on disk: the folder itself, or the hub snapshot (downloaded if needed and allowed)."""
    if Path(spec.path).is_dir():
        return Path(spec.path)
    if looks_local(spec.path):
        raise FileNotFoundError(f"no pipeline folder at {spec.path}")
    folder = DiffusionPipeline.download(spec.path, revision=spec.revision, variant=spec.variant,
                                        cache_dir=cache_dir, use_safetensors=True)
    return Path(folder)


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("namespace/name")."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def component_fingerprint(folder: Path, variant: str | None) -> str:
    """A digest of a component's config and the weights that would be loaded from it."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            digest.update(path.name.encode() + _config_digest(path).encode())
        elif _is_loaded_weight(path.name, variant):
            digest.update(path.name.encode() + _file_digest(path).encode())
    return digest.hexdigest()


def _config_digest(path: Path) -> str:
    """A config's settings without the bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...) that a
    re-save changes."""
    settings = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _is_loaded_weight(name: str, variant: str | None) -> bool:
    if not name.endswith(".safetensors"):
        return False
    parts = name.split(".")
    return (variant in parts[1:-1]) if variant else len(parts) == 2


_digests: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    """Content hash; a hub snapshot's file is a link to a blob already named by its hash, which is reused."""
    if path.is_symlink() and "blobs" in Path(os.readlink(path)).parts:
        return Path(os.readlink(path)).name
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


class ModelRegistry:
    """Loads the listed pipelines on one device, once each, sharing identical components."""

    def __init__(self, specs: list[ModelSpec], device="auto", dtype=None, cache_dir=None, lazy=False,
                 compile=False, previews=False):
        self.previews = previews  # fit each VAE's live-preview map at load (the app), not in the first request
        self.compile = compile  # --compile: each base's UNet, its LoRA models in one hotswapped slot (compiling.py)
        self._slots: dict[tuple, AdapterSlot] = {}  # with compile: (path, revision, variant) -> its adapter slot
        self.specs = {spec.name: spec for spec in specs}
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = dtype or default_dtype(self.device)
        self.cache_dir = cache_dir
        self.errors: dict[str, str] = {}  # name -> why it could not be loaded
        self._pipelines: dict[str, StableDiffusionPipeline] = {}
        self._bases: dict[tuple, StableDiffusionPipeline] = {}  # (path, revision, variant) -> its one pipeline
        self._components: dict[str, torch.nn.Module] = {}  # fingerprint -> loaded module
        self._lock = threading.Lock()
        if not lazy:
            for name in self.specs:
                self.try_load(name)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def configured_scale(self, name: str) -> float | None:
        """The LoRA scale `name` is listed with; None for a model without an adapter (or not listed)."""
        spec = self.specs.get(name)
        return spec.lora_scale if spec is not None and spec.lora else None

    def require_listed(self, name: str) -> None:
        if name not in self.specs:
            raise ModelUnavailable(f"Unknown model '{name}'; available: {', '.join(self.specs)}.")

    def try_load(self, name: str) -> bool:
        """Load a model, recording (not raising) a failure so that the other models keep serving."""
        try:
            self.get(name)
            return True
        except ModelUnavailable:
            return False

    def get(self, name: str, lora_scale: float | None = None) -> StableDiffusionPipeline:
        """The loaded pipeline of `name`, loading it on first use, with `name`'s LoRA adapter (at `lora_scale`, default
        the spec's) or none active. Models on one base share its pipeline: generate before the next `get`."""
        self.require_listed(name)
        if name not in self._pipelines:  # loaded ones skip the lock: no waiting while another model loads
            with self._lock:  # concurrent first requests must not load the same model twice
                if name not in self._pipelines:
                    self._pipelines[name] = self._load(self.specs[name])
        spec = self.specs[name]
        scale = spec.lora_scale if lora_scale is None else lora_scale
        if self.compile:
            self._slots[source_of(spec)].activate(spec.lora, scale)
        else:
            activate_adapter(self._pipelines[name], spec.name if spec.lora else None, scale)
        return self._pipelines[name]

    def _load(self, spec: ModelSpec) -> StableDiffusionPipeline:
        try:
            pipeline = self._base(spec)
            if spec.lora:
                if looks_local(spec.lora) and not Path(spec.lora).exists():
                    raise FileNotFoundError(f"no LoRA adapter at {spec.lora}")
                check_adapter(pipeline.lora_state_dict(spec.lora)[0], pipeline)  # diffusers would only warn
                # a folder, a diffusers or kohya .safetensors file, or a hub id; diffusers removes a half-loaded one
                if self.compile:  # swapped into the base's slot now, so that a broken adapter fails here too
                    self._slots[source_of(spec)].activate(spec.lora, spec.lora_scale)
                else:
                    pipeline.load_lora_weights(spec.lora, adapter_name=spec.name)
        except Exception as error:  # a broken model must not take the others down
            self.errors[spec.name] = f"{type(error).__name__}: {error}"
            logger.error("Model '%s' (%s) failed to load: %s", spec.name, spec.lora or spec.path,
                         self.errors[spec.name])
            raise ModelUnavailable(f"Model '{spec.name}' could not be loaded: {self.errors[spec.name]}") from error
        self.errors.pop(spec.name, None)
        return pipeline

    def _base(self, spec: ModelSpec) -> StableDiffusionPipeline:
        """The pipeline at `spec.path`, loaded once for every model (plain or LoRA) on it."""
        source = source_of(spec)
        if source not in self._bases:
            pipeline = self._load_pipeline(spec)
            if self.compile:  # the slot's layers must exist before the UNet compiles
                adapters = [other.lora for other in self.specs.values() if other.lora and source_of(other) == source]
                self._slots[source] = AdapterSlot(pipeline, adapters)
                compile_unet_for_serving(pipeline.unet)
            self._bases[source] = pipeline
        return self._bases[source]

    def _load_pipeline(self, spec: ModelSpec) -> StableDiffusionPipeline:
        folder = local_folder(spec, self.cache_dir)
        fingerprints = {c: component_fingerprint(folder / c, spec.variant) for c in SHAREABLE if (folder / c).is_dir()}
        shared = {c: self._components[f] for c, f in fingerprints.items() if f in self._components}
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, dtype=self.dtype, variant=spec.variant, use_safetensors=True, **shared)
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        if self.previews:  # models sharing this VAE share its map
            latent_preview(pipeline.vae)
        for component, fingerprint in fingerprints.items():
            self._components.setdefault(fingerprint, getattr(pipeline, component))
        logger.info("Loaded '%s' from %s (shared: %s)", spec.name, spec.path, ", ".join(shared) or "nothing")
        return pipeline

    def native_resolution(self, name: str) -> int:
        """The image size the model was trained at (512 for SD v1), read from its configs without loading it."""
        self.require_listed(name)
        try:
            folder = local_folder(self.specs[name], self.cache_dir)
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ModelUnavailable(f"Model '{name}' has no readable unet/vae config: {error}") from error
        return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)

    def unload(self, name: str) -> None:
        """Forget `name` (a LoRA model: delete its adapter) so that its memory is freed once nothing else loaded uses
        it: a base stays while a model on it is loaded, a component while a pipeline shares it; with `compile`, a base
        and its adapter slot always stay. A Ray replica calls this when multiplexing evicts a model; unloading one that
        is not loaded does nothing."""
        with self._lock:
            pipeline = self._pipelines.pop(name, None)
            if pipeline is None:
                return
            if self.compile:  # a compiled base and its adapter slot stay: loading them again would recompile
                return
            if self.specs[name].lora:
                pipeline.delete_adapters(name)
            loaded = list(self._pipelines.values())
            self._bases = {source: base for source, base in self._bases.items() if any(base is p for p in loaded)}
            kept = {id(getattr(p, component, None)) for p in loaded for component in SHAREABLE}
            self._components = {key: module for key, module in self._components.items() if id(module) in kept}
