"""Authentication and authorisation (Cerberus): who is calling, and what they may do.

Authentication (API keys, JWT bearer tokens from OIDC issuers, client certificates of
node agents, the owning user on the local unix socket) turns a request into a
`Principal`; authorisation maps its roles to permissions (`rbac`) and confines it to
its tenant (the owner lookups of `tartarus.server.access`). The aiohttp middleware in
`tartarus.server.access` applies both to every route, WebSocket and SSE included.
"""
