"""Thin helpers; reuse compressed-tensors' before adding one here."""
