#!/usr/bin/env bash
# On a GPU node (../shared/gpu/README.md): an 8B-shape 4-bit run of 4 steps, then its publish timed twice
# (bench/bench_publish.py). Device call: carry [".gpu-bundle", ".gpu-tokenizer", SNAPSHOT] and run
# `bash SNAPSHOT/bench/gpu_publish.sh`; the table comes back as $OUT/publish_h200.md.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository snapshot on the node; the bundle and tokenizer beside it
bash ../.gpu-bundle/install.sh >/dev/null
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PATH=/tmp/site:$PATH
export LORAMILL_TEST_TOKENIZER_DIR=$PWD/../.gpu-tokenizer
printf '#!/usr/bin/env python3\nfrom pipelines.cli import main\nmain()\n' > /tmp/site/loramill && chmod +x /tmp/site/loramill
mkdir -p /tmp/site/loramill-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: loramill\nVersion: 0.1.0\n' > /tmp/site/loramill-0.1.0.dist-info/METADATA
[ -d /tmp/ckpt/llama-8b ] || python3 bench/random_checkpoint.py llama-8b --tokenizer $LORAMILL_TEST_TOKENIZER_DIR
O="model.id=/tmp/ckpt/llama-8b quant.mode=nf4 cluster.use_gpu=true cluster.cpus_per_worker=8 lora.r=16 lora.alpha=32 train.max_steps=4 train.warmup_steps=0 train.eval_every=2 train.checkpoint_every=2 train.max_eval_examples=32 train.gradient_checkpointing=true publish.registry=file:///tmp/registry cluster.output_dir=/tmp/o cluster.storage_url=/tmp/r"
t0=$(date +%s)
loramill train configs/default.yaml -d medical $O > $OUT/train.log 2>&1
echo "train $(( $(date +%s) - t0 )) s"
python3 bench/bench_publish.py configs/default.yaml --run medical=$(ls -d /tmp/o/medical/*/ | head -1) --repeat 2 --out $OUT/publish_h200.md $O > $OUT/publish.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
