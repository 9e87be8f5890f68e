"""Which rows the validation loss is computed on: a --validation_split of the training rows, or the rows of
--validation_data_dir. Light (no diffusers): the data check runs it too, before any model loads."""

import argparse
import logging
import os

from sdtune.data.dataset import hold_out, load_rows, screen_rows
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)


def split_validation_rows(args, rows):
    """(the positions in screened `rows` to train on, the held-out rows or None), as --validation_split or
    --validation_data_dir ask. The rows of --validation_data_dir are screened as the training rows are."""
    if args.validation_split is not None:
        training, held = hold_out(len(rows), args.validation_split, args.seed)
        logger.info("Validation loss: %d of %d usable rows held out of training (--validation_split %g).",
                    len(held), len(rows), args.validation_split)
        return training, rows.select(held)
    everything = list(range(len(rows)))
    if args.validation_data_dir is None:
        return everything, None
    return everything, load_validation_folder(args)


def load_validation_folder(args):
    """The usable rows of --validation_data_dir, read and screened as --train_data_dir's are."""
    if not os.path.isdir(args.validation_data_dir):
        raise SdtuneError(f"--validation_data_dir {args.validation_data_dir}: no such folder (give an imagefolder "
                          "laid out like --train_data_dir's: images plus metadata.jsonl).")
    folder_args = argparse.Namespace(**{**vars(args), "train_data_dir": args.validation_data_dir,
                                        "dataset_name": None, "max_train_samples": None})
    try:
        held = load_rows(folder_args)
        screened = screen_rows(held, args.image_column, args.caption_column)
    except SdtuneError as error:  # its messages speak of --train_data_dir, whose reader it borrows
        raise SdtuneError(f"--validation_data_dir {args.validation_data_dir}: {error}") from error
    logger.info("Validation loss on %s: %s", args.validation_data_dir, screened.summary())
    return held.select(screened.usable)
