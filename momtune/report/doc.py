"""The document being built: its blocks in order and the PNGs written for them (the section
modules fill one; render.py turns its blocks into Markdown and HTML)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .fmt import ShapeLabels
from .render import Block, Figure


@dataclass
class Doc:
    """Blocks in order, plus the PNGs written for them."""

    outdir: Path
    labels: ShapeLabels
    blocks: list[Block] = field(default_factory=list)
    pngs: list[str] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def figure(self, name: str, alt: str, caption: str, draw: Callable[[Path], None]) -> None:
        draw(self.outdir / name)
        self.pngs.append(name)
        self.add(Figure(name, alt, caption))
