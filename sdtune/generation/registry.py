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
import weakref
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

from sdtune.errors import SdtuneError
from sdtune.generation.adapters import activate_adapters, check_adapter
from sdtune.generation.compiling import AdapterSlot, compile_unet_for_serving
from sdtune.generation.lora_stack import StackError
from sdtune.generation.preview import latent_preview
from sdtune.limits import check_lora_scale

logger = logging.getLogger(__name__)

SHAREABLE = ("vae", "text_encoder", "unet", "safety_checker")  # components with weights
ADAPTER_COMPONENTS = ("unet", "text_encoder")  # where diffusers puts a LoRA's layers (kohya files: both)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # hub id or local pipeline folder
    revision: str | None = None
    variant: str | None = None
    lora: str | None = None  # a LoRA adapter on `path`: an output folder of --lora_rank, or a .safetensors file
    lora_scale: float = 1.0  # how much of the adapter: 0 is the base model
    unet: str | None = None  # a UNet folder in place of the base's: a full fine-tune's checkpoint-N/unet
    single_file: str | None = None  # a single-file SD v1 checkpoint, read with the configs of the pipeline at `path`
    allow_pickle: bool = False  # a .ckpt single file: read with torch.load(weights_only=True); off unless asked

    def __post_init__(self):
        check_lora_scale(self.lora_scale, f"Model '{self.name}': lora_scale")  # the app offers it as the default


class ModelUnavailable(SdtuneError, RuntimeError):
    """A model that is not in the list or failed to load. Still a RuntimeError: the batches record it as a failed
    image or batch and go on, as they do for other runtime failures."""


class ModelRefused(SdtuneError, ValueError):
    """A model that cannot be added or removed as asked (a duplicate name, the last model); the message names the
    field."""


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
    """What identifies a base pipeline: models with the same source share one (and its adapters)."""
    return spec.path, spec.revision, spec.variant, spec.unet, spec.single_file


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


_tensor_prints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def tensors_fingerprint(module: torch.nn.Module) -> str:
    """A digest of a loaded module's weights (its LoRA layers left out), once per module: what tells a component of a
    single-file checkpoint equal to one already loaded from a folder."""
    if module not in _tensor_prints:
        digest = hashlib.sha256()
        for key, tensor in sorted(module.state_dict().items()):
            if "lora_" in key:
                continue
            digest.update(key.replace(".base_layer", "").encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        _tensor_prints[module] = digest.hexdigest()
    return _tensor_prints[module]


class ModelRegistry:
    """Loads the listed pipelines on one device, once each, sharing identical components.

    Thread-safe for generation: `use(name, scale)` holds the modules a model's adapters live in (its UNet and text
    encoder, which models on one base, or sharing a component, have in common) for a whole generation, so that two
    workers never switch adapters under each other. Models can be added and removed while serving (`add`,
    `remove`); a model removed while a generation uses it is unloaded when that generation ends."""

    def __init__(self, specs: list[ModelSpec], device="auto", dtype=None, cache_dir=None, lazy=False,
                 compile=False, previews=False):
        self.previews = previews  # fit each VAE's live-preview map at load (the app), not in the first request
        self.compile = compile  # --compile: each base's UNet, its LoRA models in one hotswapped slot (compiling.py)
        self._slots: dict[tuple, AdapterSlot] = {}  # with compile: a base's source -> its adapter slot
        self.specs = {spec.name: spec for spec in specs}
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = dtype or default_dtype(self.device)
        self.cache_dir = cache_dir
        self.errors: dict[str, str] = {}  # name -> why it could not be loaded
        self._pipelines: dict[str, StableDiffusionPipeline] = {}
        self._bases: dict[tuple, StableDiffusionPipeline] = {}  # a base's source (source_of) -> its one pipeline
        self._components: dict[str, torch.nn.Module] = {}  # fingerprint -> loaded module
        # Three kinds of lock, always taken in this order: `_loading` (one load or unload at a time), a module's own
        # lock (held by the generation using it), `_lock` (the tables above, held for a moment only).
        self._loading = threading.RLock()
        self._module_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._users: Counter[str] = Counter()  # name -> generations using it now
        self._leaving: dict[str, ModelSpec] = {}  # removed while in use: unloaded when its last generation ends
        self.version = 0  # counts the adds and removes, so that a page can tell its model lists are out of date
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
            self.load(name)
            return True
        except ModelUnavailable:
            return False

    def load(self, name: str) -> StableDiffusionPipeline:
        """The loaded pipeline of `name`, loading it on first use (raises ModelUnavailable). Its adapters are as the
        last generation left them: generate through `use`."""
        spec = self.specs.get(name)
        if spec is None:
            self.require_listed(name)
        return self._loaded(name, spec)

    def _loaded(self, name: str, spec: ModelSpec) -> StableDiffusionPipeline:
        pipeline = self._pipelines.get(name)  # loaded ones skip the lock: no waiting while another model loads
        if pipeline is None:
            with self._loading:  # concurrent first requests must not load the same model twice
                pipeline = self._pipelines.get(name)
                if pipeline is None:
                    pipeline = self._load(spec)
                    with self._lock:
                        self._pipelines[name] = pipeline
        return pipeline

    @contextmanager
    def use(self, name: str, lora_scale: float | None = None, stack: tuple | list = ()):
        """`name`'s pipeline with its adapter at `lora_scale` (default the spec's) or none active, and the LoRA models
        of `stack` ([(name, weight)], on the same base) beside it, held for the length of the `with` block: one
        generation. Others on the same modules wait; `remove` waits for it."""
        names = [name, *(member for member, _ in stack)]
        specs = self._enter(names)
        try:
            self.check_stack(specs[0], specs[1:])
            pipeline = self._loaded(name, specs[0])  # loaded even if removed meanwhile: this request still uses it
            for member, spec in zip(names[1:], specs[1:]):
                self._loaded(member, spec)  # its adapter, on the same base pipeline
            with self._holding(pipeline):
                self._activate(specs[0], pipeline, lora_scale, stack)
                yield pipeline
        finally:
            self._leave(names)

    def check_stack(self, spec: ModelSpec, members: list[ModelSpec]) -> None:
        """Refuse a stack whose members are not LoRA models on `spec`'s base, or any stack on a compiled base (its
        UNet holds one adapter slot)."""
        if not members:
            return
        if self.compile:
            raise StackError("loras: a LoRA stack cannot run with --compile (the compiled UNet has one adapter slot); "
                             "choose one LoRA model, or serve without --compile.")
        for member in members:
            if not member.lora or source_of(member) != source_of(spec):
                raise StackError(f"loras: '{member.name}' is not a LoRA model on the base of '{spec.name}'; a stack "
                                 "holds LoRA models of one base.")

    def get(self, name: str, lora_scale: float | None = None) -> StableDiffusionPipeline:
        """`name`'s pipeline with its adapter switched as `use` does, for a single worker (tests, benchmarks): the
        modules are not held after it returns, so another thread's `use` may switch them before this one generates."""
        with self.use(name, lora_scale) as pipeline:
            return pipeline

    def _enter(self, names: list[str]) -> list[ModelSpec]:
        with self._lock:
            for name in names:
                self.require_listed(name)
            self._users.update(names)
            return [self.specs[name] for name in names]

    def _leave(self, names: list[str]) -> None:
        with self._lock:
            self._users.subtract(names)
            idle = [name for name in set(names) if self._users[name] <= 0]
            for name in idle:
                del self._users[name]
            leaving = [(name, self._leaving[name]) for name in idle if name in self._leaving]
        for name, spec in leaving:
            self._unload(name, spec)

    @contextmanager
    def _holding(self, pipeline):
        """The locks of the modules a generation's adapters live in, in one order for every thread (no deadlock)."""
        modules = [m for m in (getattr(pipeline, c, None) for c in ADAPTER_COMPONENTS) if m is not None]
        with self._lock:
            locks = [self._module_locks.setdefault(m, threading.Lock()) for m in sorted(set(modules), key=id)]
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _activate(self, spec: ModelSpec, pipeline, lora_scale: float | None, stack=()) -> None:
        scale = spec.lora_scale if lora_scale is None else lora_scale
        if self.compile:
            self._slots[source_of(spec)].activate(spec.lora, scale)
            return
        own = [(spec.name, scale)] if spec.lora else []
        adapters = [*own, *stack]
        activate_adapters(pipeline, [name for name, _ in adapters], [weight for _, weight in adapters])

    def _load(self, spec: ModelSpec) -> StableDiffusionPipeline:
        try:
            pipeline = self._base(spec)
            if spec.lora:
                if looks_local(spec.lora) and not Path(spec.lora).exists():
                    raise FileNotFoundError(f"no LoRA adapter at {spec.lora}")
                check_adapter(pipeline.lora_state_dict(spec.lora)[0], pipeline)  # diffusers would only warn
                with self._holding(pipeline):  # adding layers to modules a generation may be using
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
            with self._lock:
                self._bases[source] = pipeline
        return self._bases[source]

    def _load_pipeline(self, spec: ModelSpec) -> StableDiffusionPipeline:
        folder = local_folder(spec, self.cache_dir)
        if spec.single_file:
            return self._load_single_file(spec, folder)
        folders = {c: folder / c for c in SHAREABLE if (folder / c).is_dir()}
        if spec.unet:
            folders["unet"] = Path(spec.unet)
        fingerprints = {c: component_fingerprint(path, spec.variant) for c, path in folders.items()}
        reused = {c: self._components[f] for c, f in fingerprints.items() if f in self._components}
        components = dict(reused)
        if spec.unet and "unet" not in components:  # the checkpoint's UNet, the base's other components
            components["unet"] = UNet2DConditionModel.from_pretrained(spec.unet, torch_dtype=self.dtype,
                                                                      use_safetensors=True)
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, dtype=self.dtype, variant=spec.variant, use_safetensors=True, **components)
        self._finish(pipeline, fingerprints)
        logger.info("Loaded '%s' from %s (shared: %s)", spec.name, spec.unet or spec.path,
                    ", ".join(reused) or "nothing")
        return pipeline

    def _load_single_file(self, spec: ModelSpec, config: Path) -> StableDiffusionPipeline:
        """A single-file checkpoint, read with diffusers' from_single_file against a local pipeline's configs (no
        download). Its components are loaded, then each one whose weights equal a loaded component's is replaced by
        that one (a single file has no per-component files to fingerprint before loading)."""
        if not spec.single_file.endswith(".safetensors") and not spec.allow_pickle:  # whoever built the spec
            raise ModelRefused(f"Model '{spec.name}': {Path(spec.single_file).name} is a pickle; it is read only "
                               "with allow_pickle.")
        pipeline = StableDiffusionPipeline.from_single_file(
            spec.single_file, config=str(config), torch_dtype=self.dtype, local_files_only=True)
        loaded = {tensors_fingerprint(module): module for module in self._components.values()}
        fingerprints = {c: tensors_fingerprint(getattr(pipeline, c)) for c in SHAREABLE
                        if getattr(pipeline, c, None) is not None}
        shared = {c: loaded[f] for c, f in fingerprints.items() if f in loaded}
        pipeline.register_modules(**shared)
        self._finish(pipeline, {c: f for c, f in fingerprints.items() if c not in shared})
        logger.info("Loaded '%s' from a single file (shared: %s)", spec.name, ", ".join(shared) or "nothing")
        return pipeline

    def _finish(self, pipeline, fingerprints: dict[str, str]) -> None:
        """Move a loaded pipeline to the device and offer its components to the models loaded after it."""
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        if self.previews:  # models sharing this VAE share its map
            latent_preview(pipeline.vae)
        with self._lock:
            for component, fingerprint in fingerprints.items():
                self._components.setdefault(fingerprint, getattr(pipeline, component))

    def add(self, spec: ModelSpec) -> None:
        """Serve one more model. It is loaded now, sharing the components already loaded as a model listed at start
        does; one that cannot load is refused (ModelUnavailable) and nothing served changes."""
        with self._loading:
            with self._lock:
                if spec.name in self.specs or spec.name in self._leaving:
                    raise ModelRefused(f"name: '{spec.name}' is already served; choose another name.")
            try:
                pipeline = self._load(spec)
            except ModelUnavailable:
                self.errors.pop(spec.name, None)  # never listed: its error is the caller's, not the header's
                self._prune()  # a base or component loaded for it alone
                raise
            with self._lock:
                self.specs[spec.name] = spec
                self._pipelines[spec.name] = pipeline
                self.version += 1

    def remove(self, name: str) -> bool:
        """Stop serving `name` and free what only it used. A model a generation is using now stays loaded until that
        generation ends (returns True then); new requests for it are refused at once. The last model stays."""
        with self._lock:
            self.require_listed(name)
            if len(self.specs) == 1:
                raise ModelRefused(f"name: '{name}' is the last model served; add another before removing it.")
            spec = self.specs.pop(name)
            self.errors.pop(name, None)
            self.version += 1
            busy = self._users[name] > 0
            if busy:
                self._leaving[name] = spec
        if not busy:
            self._unload(name, spec)
        return busy

    def parameter_bytes(self) -> int:
        """Bytes of the parameters and buffers the loaded models hold, each tensor counted once however many models
        share it: what adding a model costs, and what removing it gives back."""
        with self._lock:
            pipelines = list(self._pipelines.values())
        tensors = {}
        for pipeline in pipelines:
            for component in SHAREABLE:
                module = getattr(pipeline, component, None)
                if module is not None:
                    for tensor in (*module.parameters(), *module.buffers()):
                        tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return sum(tensors.values())

    def native_resolution(self, name: str) -> int:
        """The image size the model was trained at (512 for SD v1), read from its configs without loading it."""
        self.require_listed(name)
        try:
            folder = local_folder(self.specs[name], self.cache_dir)
            unet_folder = Path(self.specs[name].unet) if self.specs[name].unet else folder / "unet"
            unet = json.loads((unet_folder / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ModelUnavailable(f"Model '{name}' has no readable unet/vae config: {error}") from error
        return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)

    def unload(self, name: str) -> None:
        """Forget `name`'s loaded weights (a LoRA model: delete its adapter) so that their memory is freed once
        nothing else loaded uses them: a base stays while a model on it is loaded, a component while a pipeline shares
        it; with `compile`, a base and its adapter slot always stay. It stays listed and loads again on its next use.
        A Ray replica calls this when multiplexing evicts a model; unloading one that is not loaded does nothing."""
        spec = self.specs.get(name) or self._leaving.get(name)
        if spec is not None:
            self._unload(name, spec)

    def _unload(self, name: str, spec: ModelSpec) -> None:
        with self._loading:
            with self._lock:
                pipeline = self._pipelines.pop(name, None)
                self._leaving.pop(name, None)
            if pipeline is None or self.compile:  # a compiled base and its slot stay: loading again would recompile
                return
            if spec.lora:
                with self._holding(pipeline):  # removing layers from modules another generation may be using
                    pipeline.delete_adapters(name)
            self._prune()

    def _prune(self) -> None:
        """Drop the bases and components no loaded model uses, so that their memory can be freed."""
        with self._lock:
            loaded = list(self._pipelines.values())
            self._bases = {source: base for source, base in self._bases.items() if any(base is p for p in loaded)}
            kept = {id(getattr(p, component, None)) for p in loaded for component in SHAREABLE}
            self._components = {key: module for key, module in self._components.items() if id(module) in kept}
