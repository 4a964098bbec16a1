"""The ground floor: results I/O (atomic writes, environment record), where each results file lives, cache keys,
locks, the one error type, and the repository's paths."""
