"""The model manager: models added and removed while the app serves (the Models tab; /add_model, /remove_model and
/list_models). A path under --models_root becomes a ModelSpec by what it holds (sdtune.app.model_sources); the
additions are kept in OUTPUT_DIR/models_added.yaml and served again at the next start, after the configured list.

Only the local backend can change what it serves: with --backend ray the replicas serve the list they started with.
"""

import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from sdtune.app.model_info import model_info
from sdtune.app.model_sources import SourceError, check_name, describe, is_model_folder, spec_for
from sdtune.generation.registry import ModelRefused, ModelRegistry, ModelUnavailable
from sdtune.training.checkpoints import list_checkpoints

logger = logging.getLogger(__name__)

ADDED_FILE = "models_added.yaml"  # in the app's output folder
FINAL = "final"  # a run's final model, beside its checkpoints


def borrowed_name(run: str, item: str) -> str:
    """The served name of a run's checkpoint (or final model) in a comparison: `my-run-checkpoint-500`."""
    return check_name(f"{re.sub(r'[^A-Za-z0-9_-]', '_', run)[:40]}-{item}")


@dataclass(frozen=True)
class Addition:
    """What a user asked to add, as it is kept in ADDED_FILE: re-read and re-checked at each start."""
    name: str
    path: str  # relative to the models root
    base: str = ""  # the served model a LoRA (or a checkpoint, or a single file's configs) is on; "" = from its files
    lora_scale: float | None = None
    allow_pickle: bool = False


class ModelManager:
    """Adds and removes the registry's models at runtime, confined to one folder, and remembers the additions."""

    def __init__(self, registry: ModelRegistry, models_root, output_dir, models_root_shown: str | None = None,
                 local: bool = True):
        self.registry, self.local = registry, local
        self.root = Path(models_root).resolve()
        # as the operator gave it when relative; an absolute one by its last part only: messages show no server path
        self.root_shown = models_root_shown or (Path(models_root).name if Path(models_root).is_absolute()
                                                else str(models_root))
        self.added_file = Path(output_dir) / ADDED_FILE
        self.extra_roots: list[Path] = []  # allow_root's: folders the app itself fills (training jobs)
        self._lock = threading.Lock()  # one change at a time, so the file matches what is served
        self._borrowed: Counter[str] = Counter()  # a run's checkpoint served for comparisons -> comparisons using it
        self._listeners: list[Callable[[], None]] = []  # told after each add and remove (the UI's model pickers)

    @property
    def names(self) -> list[str]:
        """The models a user can choose: all served but a comparison's borrowed checkpoints."""
        return [name for name in self.registry.names if name not in self._borrowed]

    def allow_root(self, folder) -> None:
        """Accept models under `folder` too: one the app fills itself (the training jobs' root, from which a
        finished job's model is served). Its additions are kept by absolute path; call this before `restore`."""
        self.extra_roots.append(Path(folder).resolve())

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def add(self, name: str, path: str, base: str = "", lora_scale=None, allow_pickle: bool = False) -> str:
        """Serve `path` as `name`; returns a line saying what was added. Bad input raises a SourceError or
        ModelRefused naming the field; a model that fails to load raises ModelUnavailable; nothing served changes."""
        self._check_local()
        with self._lock:
            addition = Addition(check_name(name), self._relative(path), (base or "").strip(), lora_scale,
                                bool(allow_pickle))
            self._add(addition)
            self._write([*self._read(), addition])
        self._changed()
        return f"Added '{addition.name}': {describe(self.registry.specs[addition.name])}."

    def remove(self, name: str) -> str:
        self._check_local()
        with self._lock:
            busy = self.registry.remove(name)
            self._write([a for a in self._read() if a.name != name])
        self._changed()
        when = "when the request using it ends" if busy else "now"
        return f"Removed '{name}'; its weights are freed {when}."

    def listing(self) -> list[dict]:
        """Every served model: its name, what it is and whether it loaded."""
        added = self._added_names()
        return [{"name": name, "kind": describe(spec), **model_info(spec), "added": name in added,
                 "error": self.registry.errors.get(name, "")} for name, spec in self.registry.specs.items()]

    def trigger_words(self, name: str) -> list[str]:
        spec = self.registry.specs.get(name)
        return model_info(spec).get("trigger_words", []) if spec else []

    def restore(self) -> None:
        """At start: serve the models added before, each checked again; one that fails is logged and left out."""
        for addition in self._read():
            try:
                self._add(addition)
            except (SourceError, ModelRefused, ModelUnavailable) as error:
                logger.error("Model '%s' added earlier is not served: %s", addition.name, error)

    def run_choices(self, run: str) -> list[str]:
        """What of a training run can be compared: its checkpoints, oldest first, and FINAL once it has its final
        model."""
        folder = self._confined(run, "run")
        checkpoints = [path.name for path in list_checkpoints(folder)]
        final = [FINAL] if is_model_folder(folder) else []
        if not checkpoints and not final:
            raise SourceError(f"run: {run} has no checkpoint-N folders and no final model.")
        return checkpoints + final

    @contextmanager
    def borrowed(self, run: str, chosen: list[str]):
        """A run's chosen checkpoints (and FINAL), served for the length of the `with` block under names of their
        own; yields [(name, label)]. One already borrowed by another comparison is shared, and removed (its weights
        freed) when the last one using it ends. Nothing is remembered across restarts."""
        self._check_local()
        choices = self.run_choices(run)
        unknown = [item for item in chosen if item not in choices]
        if unknown:
            raise SourceError(f"checkpoints: {unknown} are not in the run; it has {', '.join(choices)}.")
        folder = self._confined(run, "run")
        taken = []
        try:
            for item in chosen:
                name = borrowed_name(folder.name, item)
                with self._lock:
                    if not self._borrowed[name]:
                        path = folder if item == FINAL else folder / item
                        self._add_spec(spec_for(name, path, self.registry))
                    self._borrowed[name] += 1
                taken.append((name, item))
            yield taken
        finally:
            for name, _ in taken:
                with self._lock:
                    self._borrowed[name] -= 1
                    if not self._borrowed[name]:
                        del self._borrowed[name]
                        with suppress(ModelUnavailable, ModelRefused):  # already removed in the Models tab
                            self.registry.remove(name)

    def _add(self, addition: Addition) -> None:
        self._add_spec(spec_for(addition.name, self._confined(addition.path), self.registry, addition.base,
                                addition.lora_scale, addition.allow_pickle))

    def _add_spec(self, spec) -> None:
        try:
            self.registry.add(spec)
        except ModelUnavailable as error:  # diffusers' reason may quote the file's path
            raise ModelUnavailable(self._hide_root(str(error))) from None

    def _check_local(self) -> None:
        if not self.local:
            raise ModelRefused("With --backend ray the replicas serve the models listed at start; add models to "
                               "--models and restart to serve more.")

    def _relative(self, path: str) -> str:
        resolved = self._confined(path)
        return str(resolved.relative_to(self.root)) if resolved.is_relative_to(self.root) else str(resolved)

    def _confined(self, path: str, field: str = "path") -> Path:
        """`path` (relative to the models root, or absolute) resolved; refused outside the root or when missing."""
        given = str(path or "").strip()
        if not given:
            raise SourceError(f"{field}: empty; give a folder or file under the models root {self.root_shown}.")
        resolved = (self.root / given).resolve()  # an absolute `given` replaces the root; links are followed
        shown = Path(given).name if Path(given).is_absolute() else given  # no server path in a message
        if not any(resolved.is_relative_to(root) for root in (self.root, *self.extra_roots)):
            raise SourceError(f"{field}: {shown} is outside the models root {self.root_shown}.")
        if not resolved.exists():
            raise SourceError(f"{field}: {shown} does not exist under the models root {self.root_shown}.")
        return resolved

    def _hide_root(self, message: str) -> str:
        return message.replace(str(self.root), self.root_shown)

    def _read(self) -> list[Addition]:
        if not self.added_file.is_file():
            return []
        try:
            entries = (yaml.safe_load(self.added_file.read_text()) or {}).get("models") or []
            return [Addition(**entry) for entry in entries]
        except (OSError, yaml.YAMLError, TypeError, AttributeError) as error:
            logger.error("%s cannot be read (%s); no added model is served from it.", self.added_file, error)
            return []

    def _added_names(self) -> set[str]:
        return {addition.name for addition in self._read()}

    def _write(self, additions: list[Addition]) -> None:
        """Replace the file in one rename, so that a crash never leaves half of it."""
        self.added_file.parent.mkdir(parents=True, exist_ok=True)
        staging = self.added_file.with_name(self.added_file.name + ".tmp")
        staging.write_text(yaml.safe_dump({"models": [asdict(a) for a in additions]}, sort_keys=False))
        os.replace(staging, self.added_file)
