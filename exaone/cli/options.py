"""Options shared by several subcommands, declared once. Multi-word flags take both spellings:
the reference's snake_case (`--max_output_len`) and kebab-case (`--max-output-len`)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def flag(name: str, *extra: str) -> list[str]:
    """`--name` with its kebab-case twin when it has an underscore."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return [*names, *extra]


DeviceOpt = Annotated[
    Device, typer.Option(*flag("device"), help="Where to run: auto picks cuda when available.")
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(*flag("dtype"), help="Compute dtype; auto: float32 on the CPU, the checkpoint's on a GPU."),
]
JsonOpt = Annotated[bool, typer.Option(*flag("json"), help="Print machine-readable JSON on stdout.")]
