"""Sharding over torchrun: the rank helpers every sharded step uses, and the launcher that starts the ranks."""
