"""Registry publish/pull throughput next to a plain s3fs put/get of the same files, in the same run.

The adapter has the shapes of a Llama-3-8B LoRA, r=16 on all seven linear layers, fp32 as PEFT saves it:
32 layers x 16 x (q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up 2x(4096+14336),
down 14336+4096 = 81,920) = 41,943,040 parameters x 4 bytes = 167.8 MB of random safetensors.
A SeaweedFS is started for the run in its own temp dir on free 127.0.0.1 ports, and stopped at the end.

    .venv/bin/python bench/bench_registry.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import s3fs
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.registry import Registry  # noqa: E402
from infra.store import store_down, store_up  # noqa: E402

LAYERS = 32
RANK = 16
# (in_features, out_features) of Llama-3-8B's linear layers.
SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 1024),
    "self_attn.v_proj": (4096, 1024),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 14336),
    "mlp.up_proj": (4096, 14336),
    "mlp.down_proj": (14336, 4096),
}


def write_adapter(folder: Path) -> int:
    """Write an 8B-sized r=16 adapter folder; return its total size in bytes."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = rng.standard_normal((RANK, fan_in), dtype=np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.standard_normal((fan_out, RANK), dtype=np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": sorted(module.split(".")[1] for module in SHAPES),
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text("# bench adapter\n\nRandom weights with the shapes of an 8B r=16 LoRA.\n")
    return sum(path.stat().st_size for path in folder.iterdir())


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        work = Path(tmp)
        size = write_adapter(work / "adapter")
        info = store_up(work / "store", s3_port=0)
        try:
            fs = s3fs.S3FileSystem(**info.storage_options(), skip_instance_cache=True, use_listings_cache=False)
            registry = Registry(f"s3://{info.bucket}/bench", info.storage_options())
            seconds: dict[str, list[float]] = {"put": [], "publish": [], "verify": [], "get": [], "pull": []}
            for round_ in range(args.repeats):
                # Interleaved, so that load from other processes hits both sides alike.
                plain = f"{info.bucket}/plain/{round_}"
                runs = {
                    "put": lambda: fs.put(str(work / "adapter") + "/", plain + "/", recursive=True),
                    "publish": lambda: registry.publish("bench", work / "adapter", {"round": round_}),
                    "verify": lambda: registry.verify("bench", round_ + 1),
                    "get": lambda: fs.get(plain + "/", str(work / f"got-{round_}") + "/", recursive=True),
                    "pull": lambda: registry.pull("bench", round_ + 1, work / f"pulled-{round_}"),
                }
                for name, action in runs.items():
                    seconds[name].append(timed(action))
        finally:
            store_down(work / "store", grace_s=2)

    megabytes = size / 1e6
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"adapter: {megabytes:.1f} MB in 3 files; {args.repeats} rounds, median; load avg {os.getloadavg()[0]:.1f}")
    print(f"{'operation':<40}{'plain s3fs':>14}{'registry':>14}{'ratio':>8}")
    rows = (("upload (put / publish)", "put", "publish"), ("download (get / pull)", "get", "pull"))
    for label, plain_op, registry_op in rows:
        plain_rate, registry_rate = megabytes / median[plain_op], megabytes / median[registry_op]
        print(
            f"{label:<40}{plain_rate:>9.1f} MB/s{registry_rate:>9.1f} MB/s{registry_rate / plain_rate:>8.2f}"
        )
    print(f"{'  of which verify (re-hash on the store)':<40}{'':>14}{megabytes / median['verify']:>9.1f} MB/s")
    print("seconds per round: " + "; ".join(f"{name} {[round(v, 2) for v in runs]}" for name, runs in seconds.items()))


if __name__ == "__main__":
    main()
