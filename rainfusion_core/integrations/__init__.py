"""Integrations with model libraries (imported on demand; their packages are optional)."""
