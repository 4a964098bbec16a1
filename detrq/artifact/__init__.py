"""The paper as an artifact: cached file-producing steps, Table 1, Pareto fronts and Table 2, the figures, the
notebook runner, the README/docs generator and the reproduction report."""
