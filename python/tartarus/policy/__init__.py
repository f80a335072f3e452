"""Policy and admission (Themis and the Judges): policy documents and admission.

Before a sandbox is created the Judges rule on it (`judges.Judges`): Rhadamanthus
(`security_policy.SecurityJudge`) checks the security policy (templates, backends,
network, secrets, dangerous flag combinations), operator plugins add their own rulings,
Minos (`quotas.QuotaKeeper`) holds the tenant's quota (concurrent sandboxes, CPU,
memory, per-template instances), and Aeacus (`audit_log.AuditLog`) writes the decision
to the append-only, hash-chained audit log. Themis keeps the versioned policy documents
the Judges read (`store.PolicyStore`). Verdicts still name the judges by their myth
(`rhadamanthus`, `minos`): that is what the API and the audit log record.
"""
