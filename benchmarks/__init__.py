"""threadline's benchmarks: ``python -m benchmarks --help``."""
