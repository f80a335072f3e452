"""Secrets: references resolved to values at exec time, never stored or shown.

A sandbox is created with `secrets: {ENV_NAME: "provider:name"}`; each command run in
it gets the resolved values as environment variables. Providers: `env:` and `file:`
(the server's own environment and files, for operators), `local:` (the encrypted local
store, envelope encryption with AES-256-GCM) and `vault:` (HashiCorp Vault KV v2). Every
value resolved is registered with the redactor, which scrubs it from logs, problem
responses and the audit log.
"""
