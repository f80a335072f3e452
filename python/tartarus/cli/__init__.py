"""The `tartarus` command line."""
