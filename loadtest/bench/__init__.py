"""The side-by-side benchmark behind bench.md: targets (processes), peers (installs), scenarios,
markdown. Run it with `python -m loadtest.bench --help`."""
