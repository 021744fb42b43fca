"""No-train Flower apps for bench/compare_flower.py (run with .venv-flower's python)."""
