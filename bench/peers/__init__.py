"""Peer task-queue apps used by bench/bench_peers.py (benchmark-only)."""
