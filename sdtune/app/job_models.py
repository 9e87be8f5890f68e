"""A finished training job's model on the served list: the training queue's on_done listener (launch.py wires it),
which adds the job's output folder through the model manager under the job's name. The manager then tells every
model picker (its on_change) and keeps the addition in models_added.yaml, so the model is served again after a
restart. A LoRA job's output goes on the served base it was trained on (its training_config.yaml names it), a full
fine-tune's output is a pipeline folder of its own (sdtune/app/model_sources.py)."""

import logging
import re
from pathlib import Path

from sdtune.app.models import ModelManager
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)


def served_name(job_name: str, job_id: int, taken) -> str:
    """The job's name as a model name (letters, digits, '_' and '-'); `NAME-ID` when a served model has it already."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", job_name)[:56] or "job"
    return name if name not in taken else f"{name}-{job_id}"


def serve_finished(manager: ModelManager, finished) -> str | None:
    """Serve a FinishedJob's model (sdtune/jobs/api.py); returns its served name, or None (logged) when it cannot
    be served: its base is not served, it does not load, or the backend serves a fixed list (--backend ray)."""
    name = served_name(finished.name, finished.id, manager.registry.names)
    try:
        line = manager.add(name, str(finished.output))
    except SdtuneError as error:
        logger.error("Training job %d (%s) is done, but its model is not served: %s Add it in the Models tab.",
                     finished.id, finished.name, error)
        return None
    logger.info("Training job %d (%s) is done. %s", finished.id, finished.name, line)
    return name


def unserve_deleted(manager: ModelManager, output: Path) -> list[str]:
    """Stop serving every model read from a training job's `output` folder, which is about to be deleted (a request
    using one finishes first: the manager frees a busy model after it); returns their names."""
    inside = [name for name in manager.names if _reads_from(manager.registry.specs[name], output)]
    removed = []
    for name in inside:
        try:
            logger.info("%s (its training job is deleted)", manager.remove(name))
            removed.append(name)
        except SdtuneError as error:  # a fixed list (--backend ray): the job's files go all the same
            logger.error("The model %r of a deleted training job is still listed: %s", name, error)
    return removed


def _reads_from(spec, folder: Path) -> bool:
    """Whether a served model reads any of its files from under `folder`."""
    return any(path is not None and Path(path).resolve().is_relative_to(folder.resolve())
               for path in (spec.path, spec.lora, spec.unet, spec.single_file))
