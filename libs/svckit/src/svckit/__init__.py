"""Plumbing shared by every service. Never business rules, models or service imports."""
