"""Telemetry: Prometheus metrics, Redis counters and the queue-depth history the dashboard
charts.
"""
