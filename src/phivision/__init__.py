"""phivision: fine-tune Phi-3-Vision to read product photos.

Importing the package registers the native Phi-3-Vision classes (``model_type: phi3_v``) with transformers.
"""

import phivision.model  # noqa: F401  (registers phi3_v with transformers' Auto* classes)
