"""The Python SDK: `from tartarus import Sandbox` (async) or `tartarus.sync.Sandbox`.

Every call goes to a Tartarus server over HTTP: `TARTARUS_URL` if set, else the local
server on a unix socket in the runtime dir, started on first use.
"""
