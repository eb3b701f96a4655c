"""Dataclass fields that several scripts declare, defined once so that a flag means the same thing everywhere.

Each returns a ``dataclasses.field`` for a script's argument class; the scripts only say what their data holds.
"""

from __future__ import annotations

from dataclasses import field

STACKLLAMA_DATASET = "lvwerra/stack-exchange-paired"


def dataset_name_field(default: str = STACKLLAMA_DATASET, reads: str = "The data"):
    """``--dataset_name``: where the rows come from (the data-dir flags name sub-folders of it)."""
    return field(default=default, metadata={"help": f"{reads}: a Hub id, a local folder (with the data dirs as its "
                                                    "sub-folders), a data file or a save_to_disk folder "
                                                    "(. = the sample data)."})


def split_field(reads: str = "the rows"):
    """``--split``: the split of ``--dataset_name`` read."""
    return field(default="train", metadata={"help": f"Split of {reads}."})


def overwrite_output_dir_field(holds: str = "a final model"):
    """``--overwrite_output_dir``: a finished output folder is replaced instead of refused."""
    return field(default=False, metadata={"help": f"Replace {holds} already in --output_dir."})


def data_dir_field(default: str, holds: str):
    """``--subset`` (StackLLaMA's name) and the ``--*_data_dir`` flags: a sub-folder of ``--dataset_name``."""
    return field(default=default, metadata={"help": f"The data_dir inside --dataset_name that holds {holds}."})
