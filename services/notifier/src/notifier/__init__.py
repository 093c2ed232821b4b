"""Notifier service of the wallet platform."""
