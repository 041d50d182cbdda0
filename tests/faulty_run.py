"""Imported by a run under test (``imports: [faulty_run]``): its checkpoint writes go through ``faulty_writer``."""
from pathlib import Path

import faulty_writer
from trainer import checkpoint, disk

disk.atomic_write = faulty_writer.wrap(disk.atomic_write)
checkpoint.WRITER_SCRIPT = Path(faulty_writer.__file__)
