"""One logging set-up for every command line, and the one filter for warnings that are expected.

The project's loggers ("sdtune", "tinyworld") print to the console and, for training, to train.log; other libraries
keep their own settings, so their warnings still show.
"""

import logging
import re
from pathlib import Path

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
PROJECT_LOGGERS = ("sdtune", "tinyworld")

# torchvision is not a dependency: transformers says so, once per image processor class (CLIP's, SigLIP's), each
# time diffusers' pipelines are imported. Only this message is dropped.
TORCHVISION_FALLBACK = re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to ")


class DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


DROP_TORCHVISION_FALLBACK = DropTorchvisionFallback()


def silence_expected_warnings() -> None:
    """Idempotent: a logger keeps one copy of a filter."""
    logging.getLogger("transformers.utils.import_utils").addFilter(DROP_TORCHVISION_FALLBACK)


def setup_logging(level: int = logging.INFO, log_file: Path | None = None) -> None:
    """The project's log lines on the console and, given `log_file`, in it too; replaces an earlier set-up."""
    handlers = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(FORMAT)
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
