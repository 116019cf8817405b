"""Measuring how fast models serve: latency, throughput, memory bandwidth."""
