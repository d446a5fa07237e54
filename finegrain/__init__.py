"""finegrain: transfer learning for fine-grained classification and retrieval on the assembled CNN."""
import os

__version__ = "0.1.0"
# albumentations otherwise asks PyPI for a newer version at import; finegrain runs offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from finegrain.models import create_embedder, create_model, load_model, save_model  # noqa: E402

__all__ = ["__version__", "create_embedder", "create_model", "load_model", "save_model"]
