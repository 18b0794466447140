"""Serving a family: its tiers over an OpenAI-compatible API, one trunk in memory."""
