"""Shared test setup: tests import each other's helpers from this folder; torch stays quiet."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)
