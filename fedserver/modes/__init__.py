"""Round modes: how rounds run (synchronous FedAvg / FedSGD, buffered async), one module each,
chosen by `--mode` through registry.py. Between protocols/ (which they pick) and coordinator/
(which runs them)."""
