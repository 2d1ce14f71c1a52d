"""The racer service."""
