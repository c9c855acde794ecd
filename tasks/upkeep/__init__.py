"""Upkeep: the reconciler, retention cleanup, bulk operator actions and the periodic jobs that run
them.
"""
