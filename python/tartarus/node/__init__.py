"""Node sandbox manager (Hecatoncheir): the hundred hands that hold a host's sandboxes.

By default it runs inside `tartarus serve` (the embedded node agent): it creates
sandboxes through the unified runtime, keeps their records in SQLite, stops them at
their deadline, and reconciles records with what is really running after a restart.
"""
