"""BDC: Boost, Disentangle, and Customize (arXiv 2502.12492)."""
