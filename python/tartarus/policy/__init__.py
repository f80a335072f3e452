"""Themis and the Judges: policy documents and admission.

Before a sandbox is created the Judges rule on it (`judges.Judges`): Rhadamanthus
checks the security policy (templates, backends, network, secrets, dangerous flag
combinations), operator plugins add their own rulings, Minos holds the tenant's quota
(concurrent sandboxes, CPU, memory, per-template instances), and Aeacus writes the
decision to the append-only, hash-chained audit log. Themis keeps the versioned policy
documents the Judges read (`themis.PolicyStore`).
"""
