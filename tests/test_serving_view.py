"""The serving view, read the way a model server reads it: boto3 and PEFT only, in a process that never imports
loramill, against the real SeaweedFS (its bucket has Object Lock, and versions are written with retention)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from infra.registry import Registry, Retention
from lora.config import load_config
from lora.model import weights_sha256
from pipelines import use
from tests.conftest import TINY_ID, save_random_lora

PROMPTS = ["How do I restore a deleted file?", "What is a tort?"]
MAX_NEW_TOKENS = 8
VIEW_FILES = ["adapter_config.json", "adapter_model.safetensors"]

# What a serving client does with the view (Ray Serve LLM downloads `<dynamic_lora_loading_path>/<name>/`; vLLM's
# filesystem resolver reads `<dir>/<name>/`): list the adapter folders, download one, load it with PEFT on the
# base, and answer greedily under the chat template, as `loramill generate` does.
READER = '''
import json, os, sys, tempfile
from pathlib import Path

import boto3, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
request = json.loads(sys.argv[1])
s3 = boto3.client("s3", region_name="us-east-1")  # endpoint and keys from AWS_* in the environment
bucket, view = request["bucket"], request["view"]
listed = s3.list_objects_v2(Bucket=bucket, Prefix=view + "/", Delimiter="/")
found = {"folders": sorted(p["Prefix"][len(view) + 1:].rstrip("/") for p in listed.get("CommonPrefixes", []))}
tokenizer = AutoTokenizer.from_pretrained(request["base"])
for name in request["adapters"]:
    folder = Path(tempfile.mkdtemp()) / name
    folder.mkdir()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{view}/{name}/")["Contents"]]
    for key in keys:
        s3.download_file(bucket, key, str(folder / key.rsplit("/", 1)[1]))
    base = AutoModelForCausalLM.from_pretrained(request["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    answers = []
    for prompt in request["prompts"]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    found[name] = {"files": sorted(k.rsplit("/", 1)[1] for k in keys), "answers": answers}
found["loramill_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("lora", "infra", "pipelines"))
print(json.dumps(found))
'''


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA adapters on the tiny model, saved by PEFT, with random non-zero B (an untrained B is zero) and
    different r and alpha, as two versions of one domain may have."""
    return [save_random_lora(tiny_model_dir, tmp_path_factory.mktemp(f"adapter-{seed}"), seed, r=r, lora_alpha=alpha,
                             target_modules="all-linear")
            for seed, (r, alpha) in enumerate([(4, 8), (8, 32)])]


def read_view(s3_store, registry: Registry, base: Path, adapters: list[str]) -> dict:
    """Run READER in a fresh interpreter on the view of `registry`; its JSON answer."""
    bucket, _, prefix = registry.url.removeprefix("s3://").partition("/")
    request = {"bucket": bucket, "view": f"{prefix}/serve", "base": str(base), "adapters": adapters,
               "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS}
    env = os.environ | {"AWS_ENDPOINT_URL_S3": s3_store.endpoint_url, "AWS_ACCESS_KEY_ID": s3_store.access_key,
                        "AWS_SECRET_ACCESS_KEY": s3_store.secret, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", READER, json.dumps(request)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peft_only_client_reads_the_view_and_answers_like_loramill_generate(
    s3_store, registry_url, tiny_model_dir, tiny_config_file, two_adapters, tmp_path
):
    options = s3_store.storage_options()
    registry = Registry(registry_url, options, retention=Retention(mode="governance", days=1))
    base = {"id": TINY_ID, "revision": None, "weights_sha256": weights_sha256(tiny_model_dir)}
    for folder in two_adapters:
        registry.publish("medical", folder, {"base_model": base, "metrics": {"eval_loss": 1.0}})
    registry.promote("medical", 1, "prod")
    config = tiny_config_file(publish={"registry": registry_url, "storage_options": options}, quant={"mode": "none"})
    answers = use.generate(load_config(config), [("medical", "v1"), ("medical", "v2")], PROMPTS,
                           max_new_tokens=MAX_NEW_TOKENS, cache_root=tmp_path / "cache")
    by_version = {v: [row[f"medical_v{v}"] for row in answers.rows] for v in (1, 2)}
    assert by_version[1] != by_version[2], "both versions answer alike: the comparison below would prove nothing"

    seen = read_view(s3_store, registry, tiny_model_dir,
                     ["medical.v1", "medical.v2", "medical.latest", "medical.prod"])
    assert seen["loramill_modules"] == []
    assert seen["folders"] == ["medical.latest", "medical.prod", "medical.v1", "medical.v2"]
    for name, version in [("medical.v1", 1), ("medical.v2", 2), ("medical.latest", 2), ("medical.prod", 1)]:
        assert seen[name]["files"] == VIEW_FILES, name
        assert seen[name]["answers"] == by_version[version], name

    # Moving the alias switches its view in place, on a bucket where every version object is under Object Lock.
    registry.promote("medical", 2, "prod")
    assert read_view(s3_store, registry, tiny_model_dir, ["medical.prod"])["medical.prod"]["answers"] == by_version[2]

    # The version folders hold exactly what their manifests list.
    client = boto3.client("s3", endpoint_url=s3_store.endpoint_url, aws_access_key_id=s3_store.access_key,
                          aws_secret_access_key=s3_store.secret, region_name="us-east-1")
    bucket, _, prefix = registry_url.removeprefix("s3://").partition("/")
    for version in (1, 2):
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/medical/v{version}/")["Contents"]
        names = sorted(entry["Key"].rsplit("/", 1)[1] for entry in listed)
        assert names == sorted([*registry.manifest("medical", version).files, "manifest.json"])
