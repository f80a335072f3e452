"""Iris: the Model Context Protocol server (`tartarus mcp`)."""
