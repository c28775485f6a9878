"""The files a `PHDForCausalLM` folder carries for `trust_remote_code=True` (copied there by save_pretrained).

With them, and `auto_map` in config.json, `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
(and `AutoModel`, the base model) loads a PHD model in a process that never imported `phd.hf` (plain transformers
scripts, `lm_eval --model hf`).
They are two-line subclasses of the installed package's classes: the code itself stays in `phd`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FILES = ("configuration_phd.py", "modeling_phd.py")
AUTO_MAP = {
    "AutoConfig": "configuration_phd.PHDHFConfig",
    "AutoModelForCausalLM": "modeling_phd.PHDForCausalLM",
    "AutoModel": "modeling_phd.PHDModel",
}


def write_remote_code(folder: str | Path) -> None:
    """Copy the configuration / modeling files into a saved model folder."""
    for name in FILES:
        shutil.copyfile(Path(__file__).with_name(name), Path(folder) / name)
