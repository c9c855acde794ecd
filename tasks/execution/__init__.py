"""Execution: runners, the RQ worker classes and the code that runs one task inside a job."""
