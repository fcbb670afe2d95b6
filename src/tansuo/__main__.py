"""``python -m tansuo``: the command line (what ``torchrun -m tansuo train RECIPE`` runs in each process)."""

from tansuo.cli import main

main()
