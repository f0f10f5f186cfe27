"""Evaluation: recovery quality and answer accuracy under corruption, and the report."""
