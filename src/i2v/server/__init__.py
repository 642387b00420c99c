"""The HTTP service: Replicate's prediction API in front of a GPU worker process.

Nothing in this package imports torch or the engine except `worker.py`'s child process entry point.
"""
