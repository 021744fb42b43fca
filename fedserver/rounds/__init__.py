"""The pure round machines: when a round opens, who is selected, when it closes.

synchronous.py (RoundMachine and the round refusals), buffered.py (--mode async:
buffers of K), staleness.py (staleness weights), eval_campaign.py (federated
evaluation campaigns). No I/O, no gRPC: injected clock and RNG."""
