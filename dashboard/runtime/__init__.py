"""The project's runtime: settings, root URLs, the WSGI entry point and its API handler, gunicorn's
config, the database backend, the embedded Redis and the health endpoint.
"""
