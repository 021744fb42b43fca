"""Partial updates: which of the model's floating tensors an update carries.

A `Selection` is an ordered subset of the model's float tensors (manifest order). An update that
carries a selection is the float32 vector of just those tensors; `to_full` maps its decoded
pieces back to offsets in the model's whole float vector, so the coordinator folds partial and
full updates into the same accumulator (with per-tensor weights, see fedserver/updates/receiver.py).

The coordinator names a round's trained tensors with `--train-tensors` (shell-style patterns,
comma-separated; groups separated by ';' rotate round by round). Clients may keep personal
tensors (FedPer) out of what they send; their update is then a subset of the round's selection.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedcore.codecs import Piece
from fedcore.limits import excerpts
from fedcore.tensors import Manifest, ManifestError


@dataclass(frozen=True)
class Selection:
    floats: Manifest  # the model's floating tensors, in manifest order
    indices: tuple[int, ...]  # positions in floats.tensors, increasing

    @classmethod
    def everything(cls, floats: Manifest) -> Selection:
        return cls(floats, tuple(range(len(floats.tensors))))

    @classmethod
    def of_names(cls, floats: Manifest, names: Iterable[str]) -> Selection:
        wanted = set(names)
        position = {t.name: i for i, t in enumerate(floats.tensors)}
        unknown = sorted(wanted - position.keys())
        if unknown:
            raise ManifestError(f"not floating tensors of the model: {unknown[:5]}")
        return cls(floats, tuple(sorted(position[n] for n in wanted)))

    @classmethod
    def matching(cls, floats: Manifest, patterns: str) -> Selection:
        """Tensors matching any comma-separated shell pattern ("2.*,0.bias"); each must match."""
        chosen: set[str] = set()
        for pattern in (p.strip() for p in patterns.split(",")):
            if not pattern:
                continue
            hits = [t.name for t in floats.tensors if fnmatch.fnmatchcase(t.name, pattern)]
            if not hits:
                names = ", ".join(t.name for t in floats.tensors[:8])
                raise ManifestError(
                    f"pattern {pattern!r} matches no floating tensor (tensors: {names} ...)"
                )
            chosen.update(hits)
        return cls.of_names(floats, chosen)

    @property
    def is_everything(self) -> bool:
        return len(self.indices) == len(self.floats.tensors)

    @cached_property
    def manifest(self) -> Manifest:
        return Manifest(tuple(self.floats.tensors[i] for i in self.indices))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.manifest.tensors)

    @cached_property
    def num_values(self) -> int:
        return sum(t.numel for t in self.manifest.tensors)

    @cached_property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(offset in the update vector, offset in the full float vector, length), merged."""
        starts = np.cumsum([0] + [t.numel for t in self.floats.tensors])
        out: list[list[int]] = []
        pos = 0
        for i in self.indices:
            full, n = int(starts[i]), int(starts[i + 1] - starts[i])
            if out and out[-1][1] + out[-1][2] == full:
                out[-1][2] += n
            elif n:
                out.append([pos, full, n])
            pos += n
        return tuple((a, b, c) for a, b, c in out)

    def extract(self, full: np.ndarray) -> np.ndarray:
        """The selected values of a full float vector (a copy when partial)."""
        if self.is_everything:
            return full
        return np.concatenate([full[b : b + n] for _, b, n in self.segments] or [full[:0]])

    def to_full(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        """Pieces at update-vector offsets -> pieces at full-vector offsets (split as needed)."""
        if self.is_everything:
            yield from pieces
            return
        # Only the segments a piece overlaps are visited (bisect on their update offsets), and
        # sparse positions (strictly increasing) are split by binary search: linear in the
        # piece, not pieces x segments.
        segments = self.segments
        starts = [sub for sub, _, _ in segments]
        for piece in pieces:
            if piece.indices is not None:  # sparse (top-k): map each position
                if not piece.indices.size:
                    continue
                first = max(bisect.bisect_right(starts, int(piece.indices[0])) - 1, 0)
                last = bisect.bisect_right(starts, int(piece.indices[-1]))
                for sub, full, n in segments[first:last]:
                    a, b = np.searchsorted(piece.indices, (sub, sub + n))
                    if a < b:
                        idx = piece.indices[a:b] - sub + full
                        yield Piece(int(idx[0]), piece.values[a:b], idx)
                continue
            lo, hi = piece.offset, piece.offset + piece.values.size
            first = max(bisect.bisect_right(starts, lo) - 1, 0)
            for sub, full, n in segments[first:]:
                if sub >= hi:
                    break
                a, b = max(lo, sub), min(hi, sub + n)
                if a < b:
                    yield Piece(full + a - sub, piece.values[a - lo : b - lo])

    def subset(self, names: Iterable[str]) -> Selection:
        """The part of this selection named by `names` (an update that leaves tensors out)."""
        names = list(names)
        if not names:
            raise ManifestError("an update must carry at least one tensor")
        own = set(self.names)
        outside = [n for n in names if n not in own]
        if outside:
            raise ManifestError(
                f"update carries tensors not trained this round: {excerpts(outside)}"
            )
        picked = Selection.of_names(self.floats, names)
        if list(picked.names) != names:
            raise ManifestError("update tensors are not in the model's order")
        return picked

    def without(self, other: Selection) -> Selection:
        drop = set(other.indices)
        return Selection(self.floats, tuple(i for i in self.indices if i not in drop))

    def union(self, other: Selection) -> Selection:
        return Selection(self.floats, tuple(sorted(set(self.indices) | set(other.indices))))


def round_selection(floats: Manifest, spec: str, round_number: int) -> Selection:
    """The tensors trained in `round_number`: `spec` groups separated by ';' rotate from round 1."""
    groups = [g for g in (s.strip() for s in spec.split(";")) if g]
    if not groups:
        return Selection.everything(floats)
    return Selection.matching(floats, groups[(round_number - 1) % len(groups)])


def check_spec(floats: Manifest, spec: str) -> None:
    """Raise ManifestError unless every group of `spec` selects something (startup check)."""
    groups = [g for g in (s.strip() for s in spec.split(";")) if g]
    for r in range(1, len(groups) + 1):
        round_selection(floats, spec, r)
