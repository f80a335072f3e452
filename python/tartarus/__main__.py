"""`python -m tartarus` is the `tartarus` command."""

from tartarus.cli.entry import main

main()
