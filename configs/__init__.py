"""Shipped pipeline recipes (YAML), found with importlib.resources in a checkout or an installed wheel."""
