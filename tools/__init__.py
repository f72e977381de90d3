"""Developer tools (benchmarks and checks that are no part of the bundle's jobs)."""
