"""`python -m edgesvd …` runs the command line (also under `torchrun … -m edgesvd`)."""

from edgesvd.cli import main

main()
