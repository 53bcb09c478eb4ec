"""Greedy generation from a base model with and without a LoRA adapter or adapter layers (audit samples,
``loramill generate``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


def load_with_adapter(base_model: Any, adapter_dir: Path, name: str = "default") -> Any:
    """Wrap ``base_model`` with the safetensors adapter at ``adapter_dir`` (PEFT's loader, eval mode), or hook in the
    adapter layers saved there (``lora.bottleneck``)."""
    from peft import PeftModel

    from lora import bottleneck

    if bottleneck.is_adapter_layers(adapter_dir):
        return bottleneck.load(base_model, adapter_dir, name)
    model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=name, use_safetensors=True)
    return model.eval()


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[Any]:
    """``model`` as its base for the duration: the active adapter layers switched off, or else the PEFT adapter
    disabled (``lora.serve.use_adapter`` keeps the LoRA adapters disabled while adapter layers are active; a second
    ``disable_adapter`` inside the first would enable them again when it ends)."""
    from lora import bottleneck

    layers = bottleneck.attached(model)
    with layers.off() if layers is not None and layers.active is not None else model.disable_adapter():
        yield model


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """The assistant's greedy answer to one user ``prompt`` under the tokenizer's chat template."""
    return greedy_answers(model, tokenizer, [prompt], max_new_tokens)[0]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Greedy answers to user ``prompts`` generated as one left-padded batch: on a CPU a decoding step costs about
    the same for six rows as for one, so a batch is several times faster than one prompt at a time, with the same
    answers. ``adapter_names`` routes each row through a PEFT adapter (``"__base__"``: none)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True) for prompt in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=False).to(model.device)
    routing = {} if adapter_names is None else {"adapter_names": adapter_names}
    output = model.generate(
        **inputs,
        **routing,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    start = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in output]


def side_by_side(model: Any, tokenizer: Any, prompts: Mapping[str, list[str]],
                 max_new_tokens: int = 64) -> dict[str, list[dict[str, str]]]:
    """For each adapter named in ``prompts`` and each of its prompts: the base model's answer (adapter disabled) and
    that adapter's. LoRA adapters answer in one batch, their rows and the base's together, through PEFT's
    mixed-adapter batches; DoRA adapters do not take part in those, and a model holding adapter layers routes no
    rows (``lora.bottleneck``): each such adapter answers in two batches of its own."""
    from lora import bottleneck
    from lora.serve import use_adapter

    mixed = [] if bottleneck.attached(model) is not None else \
        [name for name in prompts if not model.peft_config[name].use_dora]
    answers: dict[str, tuple[list[str], list[str]]] = {}
    rows = [(name, prompt) for name in mixed for prompt in prompts[name]]
    if rows:
        texts = [prompt for _, prompt in rows]
        both = greedy_answers(model, tokenizer, texts + texts, max_new_tokens,
                              ["__base__"] * len(rows) + [name for name, _ in rows])
        base, adapted = both[: len(rows)], both[len(rows):]
        for name in mixed:
            mine = [i for i, (owner, _) in enumerate(rows) if owner == name]
            answers[name] = [base[i] for i in mine], [adapted[i] for i in mine]
    for name in prompts.keys() - set(mixed):
        with use_adapter(model, name):
            with adapter_off(model):
                base_answers = greedy_answers(model, tokenizer, prompts[name], max_new_tokens)
            answers[name] = base_answers, greedy_answers(model, tokenizer, prompts[name], max_new_tokens)
    return {name: [{"prompt": prompt, "base": b, "adapter": a}
                   for prompt, b, a in zip(prompts[name], *answers[name], strict=True)] for name in prompts}


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
    with adapter_off(model):
        base = predict_labels(model, tokenizer, texts, max_length)
    adapter = predict_labels(model, tokenizer, texts, max_length)
    return [{"prompt": text, "expected": label, "base": b, "adapter": a}
            for (text, label), b, a in zip(examples, base, adapter)]
