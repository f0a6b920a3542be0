"""Rich consoles that stay readable whatever `$COLUMNS` says.

Rich takes its width from `$COLUMNS` as given: batch systems and CI runners that set it to 0
cropped every line to nothing (errors included), and a narrow value dropped the model's column
from result tables. The tables are laid out for 80 columns (README), so no console is narrower:
a line longer than a real terminal wraps there, whole, instead of being cut.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

MIN_WIDTH = 80


class ReadableConsole(Console):
    """A rich `Console` at least `MIN_WIDTH` columns wide."""

    @property
    def size(self) -> ConsoleDimensions:
        width, height = Console.size.fget(self)
        return ConsoleDimensions(max(width, MIN_WIDTH), height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)
