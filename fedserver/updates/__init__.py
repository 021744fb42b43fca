"""An update's way in: receiver.py (receive, verify, spill), accumulator.py (the float32
running sum), spool.py (every update as a disk-backed row, for robust strategies),
uploads.py (streams in flight, refusals by reason), messages.py (what a submit
carries and gets back). No gRPC."""
