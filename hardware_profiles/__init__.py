"""Shipped hardware profiles (YAML), found with importlib.resources in a checkout or an installed wheel."""
