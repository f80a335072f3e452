"""Enforcement (Erinyes and Cocytus): what happens to sandboxes that break the rules,
and the record of everything that went wrong.

- Alecto (`fury: timeout`): a sandbox past its deadline is killed within a second, by
  the node manager's deadline loop (`tartarus.node.manager`).
- Tisiphone (`limits`, `fury: resource-limit`): memory and CPU use against the
  sandbox's limits, with warn, throttle, kill or quarantine actions per policy.
- Megaera (`violations`, `fury: policy-violation`): policy violations recorded against
  a sandbox and its tenant.
- Cocytus (`log`, `records.ErrorRecord`): structured error records (category, sandbox,
  node, message, trace), queryable, purged after their retention.

Every enforcement action is an `EnforcementEvent` in the events log.
"""
