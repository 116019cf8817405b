"""`python -m slmctl` is the `slmctl` command."""

from slmctl.cli import main

main()
