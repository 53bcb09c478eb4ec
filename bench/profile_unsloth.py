"""Unsloth's long-row step (as ../shared/gpu/unsloth_anchor.py runs it) under bench/step_profile.py, so its kernel
time by kind and its memory at the peak can be read next to loramill's (bench_speed.py --profile).

    PYTHONPATH=/tmp/usite:bench python3 bench/profile_unsloth.py /tmp/ckpt/llama-1b qlora OUT_DIR
    PYTHONPATH=/tmp/usite:bench python3 bench/profile_unsloth.py /tmp/ckpt/llama-1b qlora phases  # memory by phase
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import unsloth  # noqa: E402,F401  (must come before transformers)
import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
from step_profile import MemoryPhases, StepProfile  # noqa: E402
from unsloth_anchor import ensure_tokenizer  # noqa: E402


def main(path: str, mode: str, out: Path, bs: int = 4, seq: int = 2048, r: int = 16, steps: int = 4) -> None:
    ensure_tokenizer(path)
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=mode == "qlora", local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=r, lora_alpha=2 * r, lora_dropout=0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size

    def step() -> None:
        x = torch.randint(0, vocab, (bs, seq), device="cuda")
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if out.name == "phases":  # memory at the step's phases only, as bench_speed.py --memory-phases reports
        phases = MemoryPhases(model, optimizer)
        for _ in range(4):
            step()
        print(f"unsloth {Path(path).name} {mode}: {phases.line()}", flush=True)
        return
    for _ in range(3):
        step()
    with StepProfile(out / f"unsloth-{Path(path).name}-{mode}") as profile:
        for _ in range(steps):
            step()
        profile.steps = steps


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
