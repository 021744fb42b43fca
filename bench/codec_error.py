"""Lossy encodings on a large model's delta: error, bytes, speed and the encoder's memory.

bench.compression measures accuracy on digits (4,810 parameters), which says nothing about how
a large model's update degrades. Here each encoding encodes R rounds of a P-value delta shaped
like a trained network's (normal values whose magnitude changes every 1,024 values over three
decades, as layers differ, plus rare 50x outliers; seeded), through fedclient's own
`ErrorFeedback.encode` (int4 and top-k carry what they round away into the next round), in a
process of its own per encoding, and reports:

- bytes of one update and their ratio to fp32;
- the relative L2 error of round 1's update, ||decoded - delta|| / ||delta||;
- the relative error of what R rounds delivered, ||sum decoded - sum delta|| / ||sum delta||
  (with error feedback that is the residual still held by the client: delayed, not lost);
- the encoder's speed (GB of float32 delta per second, the median round) and its peak memory
  above the delta itself, in models (the payloads of the rounds held included).

fp32 is the baseline measured in the same run (its encode is a view: error 0, 1 model of
bytes). Errors are computed piece by piece from the decoder the coordinator uses, so they add
no model-sized buffer to the peak.

    python -m bench.codec_error                          # P = 600M, 3 rounds (~5 min)
    python -m bench.codec_error --params 10000000 --encodings int4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import write_json
from fedcore.codec_base import SLAB, Piece
from fedcore.codecs import ErrorFeedback, get_codec

ENCODINGS = ("fp32", "fp16", "int8", "int4", "topk", "topk:0.01")
RESULTS = Path(__file__).resolve().parent / "results"
LAYER = 1024  # values per magnitude step


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def fill_delta(out: np.ndarray, seed: int) -> None:
    """A seeded delta into `out`, a slab at a time (no second model-sized buffer)."""
    rng = np.random.default_rng(seed)
    for start in range(0, out.size, SLAB):
        part = out[start : start + SLAB]
        rng.standard_normal(part.size, dtype=np.float32, out=part)
        layers = -(-part.size // LAYER)
        scale = (10.0 ** rng.uniform(-4, -1, layers)).astype(np.float32)
        part *= np.repeat(scale, LAYER)[: part.size]
        outliers = rng.random(part.size, dtype=np.float32) < 1e-4
        part[outliers] *= np.float32(50)


def _sq(x: np.ndarray) -> float:
    """||x||², in float64, a slab at a time."""
    return sum(
        float(np.dot(p, p))
        for p in (x[i : i + SLAB].astype(np.float64) for i in range(0, x.size, SLAB))
    )


def _squared_error(delta: np.ndarray, pieces: Iterable[Piece]) -> float:
    """||decoded - delta||², piece by piece; sparse (top-k) pieces carry only the positions
    sent, and elsewhere the error is the delta itself."""
    error = unsent = 0.0
    sparse = False
    for piece in pieces:
        if piece.indices is None:
            sent = delta[piece.offset : piece.offset + piece.values.size].astype(np.float64)
        else:
            sent = delta[piece.indices].astype(np.float64)
            unsent -= float(np.dot(sent, sent))
            sparse = True
        diff = piece.values - sent
        error += float(np.dot(diff, diff))
    return error + (unsent + _sq(delta) if sparse else 0.0)


def measure(encoding: str, params: int, rounds: int) -> dict[str, Any]:
    """One encoding's figures, in this process (run it in a fresh one for the peak)."""
    codec = get_codec(encoding)
    feedback = ErrorFeedback()
    delta = np.empty(params, dtype=np.float32)
    total_error = None
    if not codec.error_feedback:  # filled now: calloc'd pages touched later would count
        total_error = np.empty(params, dtype=np.float32)
        total_error.fill(0.0)
    fill_delta(delta, 0)
    feedback.encode(codec, delta[:4096].copy())  # imports and first-call allocations
    feedback.residual = None
    before = _status("VmRSS")
    payload: np.ndarray | None = None
    update_bytes = 0
    seconds: list[float] = []
    first_error = first_norm = 0.0
    for r in range(rounds):
        fill_delta(delta, r)
        payload = None  # a client holds one update at a time
        started = time.perf_counter()
        payload = feedback.encode(codec, delta)
        seconds.append(time.perf_counter() - started)
        update_bytes = payload.size
        if r == 0:
            first_norm = _sq(delta)
            first_error = _squared_error(delta, codec.pieces(payload, params))
        if total_error is not None:  # codecs without error feedback: the error adds up
            for piece in codec.pieces(payload, params):
                part = total_error[piece.offset : piece.offset + piece.values.size]
                part += piece.values - delta[piece.offset : piece.offset + piece.values.size]
    peak = _status("VmHWM") - before
    # ||sum delta||: regenerate the rounds' deltas and add them (after the peak was read).
    summed = np.zeros(params, dtype=np.float32)
    for r in range(rounds):
        fill_delta(delta, r)
        summed += delta
    left = feedback.residual if feedback.residual is not None else total_error
    total_sq = _sq(left) if left is not None else 0.0
    model_bytes = 4 * params
    return {
        "encoding": encoding,
        "params": params,
        "rounds": rounds,
        "update_bytes": int(update_bytes),
        "bytes_vs_fp32": update_bytes / model_bytes,
        "round1_relative_error": (first_error / first_norm) ** 0.5,
        "cumulative_relative_error": (total_sq / _sq(summed)) ** 0.5,
        "encode_seconds": seconds,
        "encode_gb_per_s": model_bytes / statistics.median(seconds) / 1e9,
        "peak_above_delta_bytes": peak,
        "peak_above_delta_models": peak / model_bytes,
    }


def run_one(encoding: str, params: int, rounds: int) -> dict[str, Any]:
    """measure() in a fresh interpreter, so each encoding's peak is its own."""
    command = ["-m", "bench.codec_error", "--one", encoding, "--params", str(params)]
    out = subprocess.run(
        [sys.executable, *command, "--rounds", str(rounds)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{encoding} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.codec_error", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=600_000_000, help="values (600M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of error feedback (3)")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one encoding, JSON out
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.params, args.rounds)))
        return 0
    encodings = ["fp32", *(e for e in args.encodings if e != "fp32")]  # the baseline first
    print(
        f"{'encoding':>10} {'bytes/update':>14} {'vs fp32':>8} {'err r1':>8} "
        f"{f'err {args.rounds}r':>8} {'GB/s':>6} {'peak models':>11}",
        flush=True,
    )
    rows = []
    for encoding in encodings:
        row = run_one(encoding, args.params, args.rounds)
        rows.append(row)
        print(
            f"{encoding:>10} {row['update_bytes']:>14} {row['bytes_vs_fp32']:>8.3f} "
            f"{row['round1_relative_error']:>8.4f} {row['cumulative_relative_error']:>8.4f} "
            f"{row['encode_gb_per_s']:>6.2f} {row['peak_above_delta_models']:>11.2f}",
            flush=True,
        )
    write_json(
        args.out, "codec_error", {"params": args.params, "rounds": args.rounds, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
