"""Benchmarks: mmdd's distillation path against a re-implementation of the reference loops."""
