"""The lab, apart from the product: benchmarks (`scripts.bench`), the bundled model's recipe
(`scripts.bundled_model`) and the predictor-quality figures of docs/RESULTS.md (`scripts.results`). Run every
module from the repository root as `python -m scripts.<package>.<module> ...`."""
