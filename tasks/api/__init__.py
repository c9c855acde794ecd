"""The client API: HTTP views, URL routes, the OpenAPI document and the per-key admission rules
(rate limit, blocking waits).
"""
