"""Peer servers the benchmark compares Sluice with (started as subprocesses)."""
