"""`python -m tartarus` is the `tartarus` command."""

from tartarus.cli.main import main

main()
