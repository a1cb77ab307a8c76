"""hf_secure: private inference for Hugging Face transformers models.

Importing the package registers the ``secure-*`` pipelines and the MPC-friendly model type
(``hf_secure_approx_bert``, its activations and its attention) with transformers.
"""

__version__ = "0.1.0"

from .convert import convert_permute  # noqa: E402
from .errors import HfSecureError  # noqa: E402
from .keys import KeyStore  # noqa: E402
from .modeling import SecureModel, SecureModelForCausalLM  # noqa: E402
from .modeling.approximate import register_approximations  # noqa: E402
from .pipelines import register_pipelines  # noqa: E402

register_approximations()
register_pipelines()

__all__ = ["HfSecureError", "KeyStore", "SecureModel", "SecureModelForCausalLM", "convert_permute", "__version__"]
