"""`finegrain convert`: the release's TF1 checkpoints, or torchvision/timm state dicts, to our format."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file

console = Console()


def convert(
    source: Path = typer.Argument(..., help="TF1 checkpoint: its prefix (model.ckpt-N), .index or .data-* file, "
                                  "or the folder holding its 'checkpoint' file; or a .pth/.safetensors state "
                                  "dict with --from."),
    arch: str = typer.Option(..., "--arch", help="The registered variant the checkpoint was made as."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    source_kind: str = typer.Option("release", "--from", help="release (TF1 checkpoint), torchvision or timm."),
    drop_background: bool = typer.Option(False, "--drop-background", help="1001-class release head -> 1000 classes."),
    ema: bool = typer.Option(False, "--ema", help="Take ExponentialMovingAverage weights where the checkpoint has them."),
) -> None:
    """Convert pretrained weights into one safetensors file whose metadata rebuilds the model."""
    from finegrain.models import save_model

    if out.suffix != ".safetensors":
        raise FinegrainError(f"--out {out} must end in .safetensors.")
    if source_kind == "release":
        from finegrain.convert.release import convert_release, drop_background as strip
        from finegrain.convert.tf_bundle import resolve_prefix

        if source.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise FinegrainError(f"{source} looks like a PyTorch state dict, not a TF1 checkpoint. Add --from "
                                 "torchvision or --from timm (or pass the TF checkpoint's prefix).")
        prefix = resolve_prefix(source)  # the folder, the prefix, its .index or a .data-* file
        model = convert_release(prefix, arch, use_ema=ema)
        if drop_background:
            model = strip(model)
        source, checksum_of = prefix, Path(f"{prefix}.index")
    elif source_kind in ("torchvision", "timm"):
        from finegrain.convert.state_dict import convert_state_dict

        model = convert_state_dict(source, arch)
        checksum_of = source
    else:
        raise FinegrainError(f"--from {source_kind!r} is not known. Use release, torchvision or timm.")
    save_model(model, out, source=source.name, source_kind=source_kind, source_sha256=sha256_file(checksum_of))
    params = sum(p.numel() for p in model.parameters())
    console.print(f"[green]wrote[/green] {out}: {arch} {model.overrides}, {params / 1e6:.2f}M parameters, "
                  f"preprocessing {model.preprocessing}")
