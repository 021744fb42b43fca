"""The subcommands that fedserver/cli.py wires: run.py (`fedserver run`), remote.py
(`status --server`, `health`), report.py, certs.py (`fedserver certs`)."""
