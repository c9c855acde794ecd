"""Delivery: callbacks to client URLs - scheduling, signing, retry policy, SSRF checks, the HTTP
client and per-endpoint caps.
"""
