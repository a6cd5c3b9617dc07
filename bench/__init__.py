"""The benchmarks behind bench/RESULTS.md: `python -m bench.<script>`; bench/README.md lists them."""
