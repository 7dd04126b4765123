"""The coordinator: scheduling, all-or-nothing gang reservation, rendezvous."""
