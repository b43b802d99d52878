"""Integrations for pipeline authors: PyTorch state helpers and framework callbacks.

Each module here imports its framework at import time; only a running pipeline imports
them, never the CLI's start-up.
"""
