"""Export profiles shipped with edgetl (YAML; read through edgetl.core.shipped).

This file makes the folder package data."""
