"""`python -m ebmm_cli` runs the CLI (and lets `torchrun -m ebmm_cli` start it)."""

from ebmm_cli.cli import main

main()
