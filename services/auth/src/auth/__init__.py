"""Auth service of the wallet platform."""
