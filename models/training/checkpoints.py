"""How a training stage writes its output: a Hugging Face directory that every later stage and every
user loads as a plain model (weights, tokenizer, the base's generation and posttrain configs)."""

from __future__ import annotations

import shutil
from pathlib import Path

from models.modeling.lora import ADAPTER_DIR, has_adapters, merged_state_dict, save_adapter


def save_hf_dir(tokenizer, base_dir: str | None):
    """A save_model callback: weights + tokenizer + the base's generation/prompt configs. A model
    with LoRA adapters is written merged (a plain model with the base's parameter names), and its
    adapter alone goes to `out/adapter/` (models/modeling/lora.py)."""

    def save(module, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out, state_dict=merged_state_dict(module), safe_serialization=True)
        if has_adapters(module):
            save_adapter(module, out / ADAPTER_DIR, base_dir)
        tokenizer.save_pretrained(out)
        if base_dir:
            for name in ("generation_config.json", "posttrain.json"):
                src = Path(base_dir) / name
                if src.exists():
                    shutil.copy2(src, out / name)

    return save
