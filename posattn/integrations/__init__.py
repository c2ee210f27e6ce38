"""Patching third-party model code to use posattn ops (imports its library lazily)."""
