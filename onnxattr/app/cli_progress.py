"""The command line's progress bar, and echoing lines while it is drawn.

The bar is drawn on stderr only when stderr is a terminal (no bar and no label in a log or a
pipe). Every line the commands print while it runs goes through `echo`, which clears the bar
first and draws it again after, so each line starts at the beginning of its own line.
"""

import sys
import time

import click

WIDTH = 30  # characters of the bar itself
_drawn = []  # the bar on screen (at most one)


def echo(text, err=False):
    """click.echo on a line of its own, the bar on screen (if any) cleared first, then drawn
    again below it."""
    for bar in _drawn:
        bar.clear()
    click.echo(text, err=err)
    for bar in _drawn:
        bar.draw()


class ProgressBar:
    """`with ProgressBar(total, label) as bar: bar.update(steps)`: a bar with the share done
    and the time left, on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total, label):
        self.total, self.label, self.done = max(1, total), label, 0
        self.file = sys.stderr
        self.shown = self.file.isatty()
        self.start = time.monotonic()

    def __enter__(self):
        if self.shown:
            _drawn.append(self)
            self.draw()
        return self

    def __exit__(self, *exc):
        if self in _drawn:
            _drawn.remove(self)
            self.clear()

    def update(self, steps):
        self.done = min(self.total, self.done + steps)
        if self.shown:
            self.draw()

    def draw(self):
        share = self.done / self.total
        filled = int(share * WIDTH)
        elapsed = time.monotonic() - self.start
        left = f"  {_minutes(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
        self.file.write(f"\r{self.label}  [{'#' * filled}{' ' * (WIDTH - filled)}]  "
                        f"{share:4.0%}{left}\033[K")
        self.file.flush()

    def clear(self):
        self.file.write("\r\033[K")
        self.file.flush()


def _minutes(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"
