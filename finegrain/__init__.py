"""finegrain: transfer learning for fine-grained classification and retrieval on the assembled CNN."""
__version__ = "0.1.0"

from finegrain.models import create_embedder, create_model, load_model, save_model  # noqa: E402

__all__ = ["__version__", "create_embedder", "create_model", "load_model", "save_model"]
