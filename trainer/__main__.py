"""``python -m trainer`` (and ``torchrun -m trainer``): the same as the ``trainer`` command."""
import sys

from trainer.cli import main

sys.exit(main())
