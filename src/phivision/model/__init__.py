"""Native Phi-3-Vision: config, model, image processor, processor and tiny checkpoints.

Importing this package registers ``model_type: phi3_v`` and the official processor class names with
transformers' Auto* classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` use these classes without ``trust_remote_code`` (the ``auto_map`` entries
a checkpoint carries are then only for readers that do not have phivision). ``import phivision`` alone does not
register anything: every module that loads a checkpoint through the Auto* classes imports this package first.

Four files here are the model's code and ship, unchanged, inside every checkpoint phivision writes
(:data:`MODEL_CODE_FILES`, named by :data:`AUTO_MAP`): they import only torch, numpy, PIL, transformers and each
other (relatively), so ``trust_remote_code=True`` loads a checkpoint where phivision is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

# From its module: some transformers 5.x releases export a torchvision-only placeholder at the top level.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .configuration_phi3_v import Phi3VConfig
from .image_processing_phi3_v import Phi3VImageProcessor
from .modeling_phi3_v import Phi3VForCausalLM
from .processing_phi3_v import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

# The model's code as it ships beside the weights, and the config.json `auto_map` that points at it.
MODEL_CODE_FILES = (
    "configuration_phi3_v.py",
    "modeling_phi3_v.py",
    "image_processing_phi3_v.py",
    "processing_phi3_v.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
}
# preprocessor_config.json names the processor classes too (as the official file does): AutoProcessor and
# AutoImageProcessor read it before config.json.
PROCESSOR_AUTO_MAP = {key: AUTO_MAP[key] for key in ("AutoProcessor", "AutoImageProcessor")}


def save_checkpoint(model: Any, processor: Any, directory: str | Path, **save_kwargs: Any) -> Path:
    """Write a checkpoint that loads with phivision or, without it, with ``trust_remote_code=True``.

    The weights and config (with :data:`AUTO_MAP`), the processor files, and this package's model code
    (:data:`MODEL_CODE_FILES`, copied byte for byte). ``save_kwargs`` go to ``model.save_pretrained``
    (e.g. ``max_shard_size``). Tiny checkpoints and exports are both written here, so they have one shape.
    """
    directory = Path(directory)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(directory, **save_kwargs)
    processor.save_pretrained(directory)
    add_processor_auto_map(directory)
    source = Path(__file__).parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(source / name, directory / name)
    return directory


def add_processor_auto_map(directory: Path) -> None:
    """Add :data:`PROCESSOR_AUTO_MAP` to ``directory/preprocessor_config.json``."""
    path = directory / "preprocessor_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = dict(PROCESSOR_AUTO_MAP)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = [
    "AUTO_MAP",
    "MODEL_CODE_FILES",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "save_checkpoint",
]
