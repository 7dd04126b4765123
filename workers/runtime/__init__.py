"""The trainer worker runtime: registration, the train_rank task, the supervised training child."""
