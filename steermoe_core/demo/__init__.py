"""The offline demo behind `make demo` / `steermoe demo`."""
