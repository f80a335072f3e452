"""Olympus: the HTTP API (`tartarus serve`), where every sandbox on a host is managed.

An aiohttp application under `/v1` with an embedded node agent (`tartarus.node`),
listening on a unix socket in the user's runtime dir, or on TCP when asked.
"""
