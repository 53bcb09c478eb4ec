"""Greedy generation from a base model with and without a LoRA adapter (audit samples, ``loramill generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_with_adapter(base_model: Any, adapter_dir: Path, name: str = "default") -> Any:
    """Wrap ``base_model`` with the safetensors adapter at ``adapter_dir`` (PEFT's loader, eval mode)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=name, use_safetensors=True)
    return model.eval()


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """The assistant's greedy answer to one user ``prompt`` under the tokenizer's chat template."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def side_by_side(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64) -> list[dict[str, str]]:
    """For each prompt: the base model's answer (adapter disabled) and the adapter's."""
    samples = []
    for prompt in prompts:
        with model.disable_adapter():
            base = generate(model, tokenizer, prompt, max_new_tokens)
        samples.append({"prompt": prompt, "base": base, "adapter": generate(model, tokenizer, prompt, max_new_tokens)})
    return samples


@torch.no_grad()
def predict_labels(model: Any, tokenizer: Any, texts: list[str], max_length: int = 512) -> list[str]:
    """A sequence classifier's label for each text (the arg-max class, named by ``config.id2label``)."""
    inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    logits = model(**inputs.to(model.device)).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def classify_side_by_side(model: Any, tokenizer: Any, examples: list[tuple[str, str]],
                          max_length: int = 512) -> list[dict[str, str]]:
    """For each (text, true label): the base model's label (adapter disabled; its head is untrained) and the
    adapter's."""
    texts = [text for text, _ in examples]
    with model.disable_adapter():
        base = predict_labels(model, tokenizer, texts, max_length)
    adapter = predict_labels(model, tokenizer, texts, max_length)
    return [{"prompt": text, "expected": label, "base": b, "adapter": a}
            for (text, label), b, a in zip(examples, base, adapter)]
