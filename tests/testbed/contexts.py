"""Reproducible synthetic build contexts for the end-to-end tests and the benchmarks.

Owns generating a directory tree from a seed (nested directories, files of mixed
sizes and modes, symlinks, empty directories) and describing a tree the way the
e2e test's busybox RUN step does, so both sides can be compared line by line.
Local file system only: no daemons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import stat
from pathlib import Path

# The reference context: about 5,000 files and 100 MiB.
DEFAULT_SEED = 20261128
DEFAULT_FILES = 5000
DEFAULT_BYTES = 100 * 1024 * 1024
FILE_MODES = (0o644, 0o600, 0o755, 0o700, 0o444, 0o640)
DIR_MODES = (0o755, 0o700, 0o750, 0o1777)


@dataclasses.dataclass(frozen=True)
class ContextStats:
    """What generate_context wrote."""

    files: int
    bytes: int
    symlinks: int
    empty_dirs: int


def generate_context(root: Path, *, seed: int, files: int, total_bytes: int) -> ContextStats:
    """A reproducible tree: nested dirs, files of mixed sizes and modes, symlinks
    (relative, absolute-looking, dangling), and empty directories."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    dirs = [root]
    for i in range(files // 25):
        parent = rng.choice(dirs)
        child = parent / f"d{i:03d}"
        child.mkdir()
        dirs.append(child)
    # A tenth of the bytes in (up to) ten large files, the rest spread over the small ones.
    large = min(10, files // 10)
    large_size = total_bytes // 10 // large if large else 0
    small_budget = total_bytes - large * large_size
    small_spread = int(2 * 0.95 * small_budget / max(1, files - large))
    written = 0
    paths: list[Path] = []
    for i in range(files):
        # 0.95: the draws stay below the budget, the last file takes the remainder.
        size = large_size if i < large else rng.randint(0, small_spread)
        if i == files - 1:
            size = max(0, total_bytes - written)
        path = rng.choice(dirs) / f"f{i:04d}.bin"
        path.write_bytes(rng.randbytes(size))
        written += size
        paths.append(path)
    for path in paths:
        path.chmod(rng.choice(FILE_MODES))
    symlinks = 0
    for i in range(50):
        link = rng.choice(dirs) / f"l{i:02d}"
        kind = i % 3
        if kind == 0:
            link.symlink_to(os.path.relpath(rng.choice(paths), link.parent))
        elif kind == 1:
            link.symlink_to(f"/{rng.choice(paths).relative_to(root)}")
        else:
            link.symlink_to(f"missing-{i}")
        symlinks += 1
    empty = 0
    for i in range(20):
        empty_dir = rng.choice(dirs) / f"empty{i:02d}"
        empty_dir.mkdir()
        if i % 4 == 0:
            (empty_dir / "nested").mkdir()
        empty += 1
    # Directory modes last: a 0700 dir is still writable for us, but set it after filling.
    for d in dirs[1:]:
        d.chmod(rng.choice(DIR_MODES))
    return ContextStats(files=files, bytes=written, symlinks=symlinks, empty_dirs=empty)


def expected_manifest(root: Path) -> tuple[set[str], set[str], set[str]]:
    """What the RUN step must report: `type|mode|path`, `sha256  path`, `path|target`."""
    stats: set[str] = set()
    sums: set[str] = set()
    links: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "./" + str(path.relative_to(root))
            st = path.lstat()
            perms = format(stat.S_IMODE(st.st_mode), "o")
            if stat.S_ISLNK(st.st_mode):
                stats.add(f"symbolic link|777|{rel}")
                links.add(f"{rel}|{os.readlink(path)}")
            elif stat.S_ISDIR(st.st_mode):
                stats.add(f"directory|{perms}|{rel}")
            else:
                kind = "regular file" if st.st_size else "regular empty file"
                stats.add(f"{kind}|{perms}|{rel}")
                sums.add(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    return stats, sums, links
