"""`python -m deepseek.cli ...` (also under torchrun: `torchrun --nproc_per_node 2 -m deepseek.cli train ...`)."""

import sys

from . import main

sys.exit(main())
