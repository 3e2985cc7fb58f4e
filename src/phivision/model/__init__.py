"""Native Phi-3-Vision: config, model, image processor, processor and tiny checkpoints.

Importing this package registers ``model_type: phi3_v`` and the official processor class names with
transformers' Auto* classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` use these classes without ``trust_remote_code`` (the ``auto_map`` entries
of the official files, which point at hub code, are then ignored).
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

# From its module: some transformers 5.x releases export a torchvision-only placeholder at the top level.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from phivision.model.configuration_phi3_v import Phi3VConfig
from phivision.model.image_processing_phi3_v import Phi3VImageProcessor
from phivision.model.modeling_phi3_v import Phi3VForCausalLM
from phivision.model.processing_phi3_v import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor"]
