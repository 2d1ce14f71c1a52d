"""The privacy service."""
