"""The coordinator: lifecycle.py (Coordinator: global model, round lifecycle, one
protocol), api.py (CoordinatorAPI: the only names its transports use; queries.py holds
the transport queries it adds), offers.py (what a poll is answered), submissions.py,
publishing.py, federated_eval.py and central_eval.py (evaluation by clients and by the
Task), wakeups.py, progress.py, and assembly.py (settings -> Coordinator, for run and
simulate). No gRPC."""
