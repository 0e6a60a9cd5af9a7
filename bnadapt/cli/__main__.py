"""``python -m bnadapt.cli ...`` (what torchrun runs: ``torchrun --nproc_per_node=K -m bnadapt.cli certify ...``)."""

import sys

from bnadapt.cli import main

sys.exit(main())
