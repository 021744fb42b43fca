"""What a coordinator keeps and shows: store.py (the state dir: lock, checkpoints),
history.py (state.db), metrics.py (its Prometheus registry)."""
