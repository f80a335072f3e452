"""Moirai and Hades: where each sandbox runs.

- `registry` (Hades): nodes join with their capacity, labels and taints, heartbeat within
  a TTL, and are removed when they stop; reservations hold capacity for a sandbox from
  placement until it ends. SQLite for one API server, Redis (`registry_redis`) for many.
- `scheduler` (Moirai): filters nodes (capacity, backend, labels, taints, affinity and
  anti-affinity, pools) and scores the rest (least-loaded or bin-packing).
- `heat` (Phlegethon): cold / warm / hot / inferno from a request and its history, each
  routed to its pools; the quarantine pool (Typhon) takes only flagged work.
"""
