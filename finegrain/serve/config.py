"""What `finegrain serve` is started with, checked before anything loads (no heavy import here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finegrain.errors import FinegrainError


@dataclass(frozen=True)
class UploadLimits:
    """max_bytes: the image file; max_pixels: width x height as the header declares it."""

    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise FinegrainError(f"Upload limits must be positive (max bytes {self.max_bytes}, max pixels "
                                 f"{self.max_pixels}). Pass e.g. --max-upload-mb 20 --max-pixels 50000000.")


@dataclass(frozen=True)
class ServeConfig:
    """What `finegrain serve` was started with; see its --help for each."""

    index: Path
    classifier: Path | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    token: str | None = None
    limits: UploadLimits = field(default_factory=UploadLimits)
    reload_interval: float = 1.0
    device: str | None = None
    threads: int | None = None  # torch's intra-op threads; None: torch's default (one per core)

    def __post_init__(self) -> None:
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise FinegrainError(f"--threads {self.threads} is outside [1, 1024]. Use e.g. the number of cores.")
        if not 1 <= self.max_batch <= 1024:
            raise FinegrainError(f"--max-batch {self.max_batch} is outside [1, 1024]. Use e.g. 32 (1: batching off).")
        if not 0 <= self.max_wait_ms <= 1000:
            raise FinegrainError(f"--max-wait-ms {self.max_wait_ms} is outside [0, 1000]. Use e.g. 5.")
        if self.token is not None and len(self.token) < 16:
            raise FinegrainError("--token is shorter than 16 characters, which is guessable. Use e.g. the output of "
                                 "`python -c 'import secrets; print(secrets.token_urlsafe())'`.")
