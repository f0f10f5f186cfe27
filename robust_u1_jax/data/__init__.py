"""Data: corruption library, built-in shapes world, sources, transforms and Grain pipelines."""
