"""Many hosts: API servers sharing Redis, and node agents (Hecatoncheir) on each worker.

- `coordinator`: an API server's part (queue, scheduling, forwarding, reaping);
- `node_agent`: `tartarus agent --join URL`, a `tartarus serve` that takes its work from
  the fleet;
- `book`, `state`: the shared records and how they are opened from `--state URL`;
- `routes`, `proxy`, `metrics`, `wire`: the HTTP surface between them.
"""
