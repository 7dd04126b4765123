"""Vocabulary shared by the producer and the fleet: settings, models, keys, store, errors."""
