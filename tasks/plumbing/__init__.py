"""Plumbing: the Redis connection and queues, and the hand-written SQL of the hot paths. Imports
nothing above it.
"""
