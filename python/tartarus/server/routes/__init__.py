"""The `/v1` endpoints, one module per resource; each module has a `routes` table."""
