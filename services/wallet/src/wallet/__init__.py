"""Wallet service of the wallet platform."""
