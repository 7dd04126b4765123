"""The fleet: Celery wiring, the coordinator and the trainer worker runtime."""
