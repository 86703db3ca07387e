"""Benchmarks: ``python -m bench.mixed_adapters``, ``python -m bench.adapter_latency``; each ends with one JSON line."""
