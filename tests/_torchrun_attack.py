"""Helper for tests/test_attack_eval.py: ``bnadapt attack`` under torchrun (gloo, CPU, 2 ranks).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_torchrun_attack.py ARGS...

runs ``bnadapt.cli.main(ARGS)`` in every rank with one torch thread.
"""

import sys

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    from bnadapt.cli import main

    sys.exit(main(sys.argv[1:]))
