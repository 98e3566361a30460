"""Reports: parameters, FLOPs, sizes, latency."""
