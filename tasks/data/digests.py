"""The digests of every record ingest kept, to drop a repeat anywhere in the corpus, held on disk.

A Python set of 16-byte digests costs about 110 bytes a record: 3.3 GB of ingest's memory at 10 GB of web text,
growing with the corpus. Here they are sorted runs in files, read memory-mapped: the page cache holds what the
lookups touch (the kernel may drop it), and the process's own memory stays the same whatever the corpus size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Digests kept in memory before they become a run on disk (16 MB); also the size of a merge's steps.
IN_MEMORY = 1 << 20

Run = tuple[np.ndarray, np.ndarray]  # a digest's first 8 bytes (sorted) and its last 8, as two uint64 arrays


class DigestSet:
    """16-byte digests in sorted runs: a few in files (each at least half the size of the one before) and the
    newest in memory. A lookup searches every run; a new run is merged into the previous one while they are of a
    size, so there are about log2(n / IN_MEMORY) runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: list[Run] = []
        self.recent: Run = (np.empty(0, np.uint64), np.empty(0, np.uint64))
        self.written = 0  # run files made, for their names

    def add_new(self, digests: bytes) -> np.ndarray:
        """Add digests (16 bytes each, no two alike); returns which of them the set already held."""
        pairs = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
        order = np.argsort(pairs[:, 0], kind="stable")  # sorted lookups read the runs' pages in order
        hi, lo = pairs[order, 0], pairs[order, 1]
        held = np.zeros(len(hi), dtype=bool)
        for run in [*self.runs, self.recent]:
            held |= _members(run, hi, lo)
        self.recent = _merged(self.recent, (hi[~held], lo[~held]))
        if len(self.recent[0]) >= IN_MEMORY:
            self._spill()
        repeated = np.empty_like(held)
        repeated[order] = held
        return repeated

    def _spill(self) -> None:
        """The in-memory run becomes a file; runs of a size are merged into one."""
        self.runs.append(self._write([self.recent]))
        self.recent = (np.empty(0, np.uint64), np.empty(0, np.uint64))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            older, newer = self.runs.pop(-2), self.runs.pop()
            self.runs.append(self._write(_merge_steps(older, newer)))
            for run in (older, newer):
                for array in run:
                    Path(array.filename).unlink()

    def _write(self, steps) -> Run:
        """Write sorted steps (in-memory runs, in order) as a run file pair; returns it memory-mapped."""
        paths = [self.folder / f"{self.written:05d}.{part}" for part in ("hi", "lo")]
        self.written += 1
        with paths[0].open("wb") as his, paths[1].open("wb") as los:
            for hi, lo in steps:
                hi.tofile(his)
                lo.tofile(los)
        return tuple(np.memmap(path, dtype=np.uint64, mode="r") for path in paths)  # type: ignore[return-value]


def _members(run: Run, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Which (hi, lo) pairs the run holds."""
    run_hi, run_lo = run
    found = np.zeros(len(hi), dtype=bool)
    if not len(run_hi):
        return found
    left, right = np.searchsorted(run_hi, hi, "left"), np.searchsorted(run_hi, hi, "right")
    single = np.flatnonzero(right - left == 1)
    found[single] = run_lo[left[single]] == lo[single]
    for i in np.flatnonzero(right - left > 1):  # first halves alike: about once in 2**64 / len(run) lookups
        found[i] = bool(np.any(run_lo[left[i] : right[i]] == lo[i]))
    return found


def _merged(a: Run, b: Run) -> Run:
    """Two sorted runs (in memory) as one."""
    at = np.searchsorted(a[0], b[0], "right") + np.arange(len(b[0]))
    from_a = np.ones(len(a[0]) + len(b[0]), dtype=bool)
    from_a[at] = False
    merged = []
    for part_a, part_b in zip(a, b, strict=True):
        out = np.empty(len(from_a), dtype=np.uint64)
        out[at], out[from_a] = part_b, part_a
        merged.append(out)
    return merged[0], merged[1]


def _merge_steps(a: Run, b: Run):
    """Two sorted runs (files) merged in steps of about IN_MEMORY digests each: the merged run in order."""
    i = j = 0
    while i < len(a[0]) or j < len(b[0]):
        # Up to the smaller of the two runs' next step ends: all below it are in this step, all above in later ones.
        ends = [run[0][min(k + IN_MEMORY, len(run[0])) - 1] for run, k in ((a, i), (b, j)) if k < len(run[0])]
        pivot = min(ends)
        i_end, j_end = (int(np.searchsorted(run[0], pivot, "right")) for run in (a, b))
        yield _merged((a[0][i:i_end], a[1][i:i_end]), (b[0][j:j_end], b[1][j:j_end]))
        i, j = max(i, i_end), max(j, j_end)
