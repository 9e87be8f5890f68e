"""The model card's loss curve: train and validation loss by step, drawn with PIL (matplotlib is not a dependency)."""

from pathlib import Path

from PIL import Image, ImageDraw

PLOT_FILE = "loss_curve.png"
SIZE = (640, 400)
MARGIN = {"left": 70, "right": 20, "top": 20, "bottom": 45}
TRAIN_COLOUR, VALIDATION_COLOUR, AXIS_COLOUR = (70, 110, 200), (230, 120, 30), (60, 60, 60)
TICKS = 5


class Axes:
    """Maps (step, loss) to pixels in the plotting area."""

    def __init__(self, steps: list[int], losses: list[float]):
        self.steps = (min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1)
        low, high = min(losses), max(losses)
        pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0  # a flat curve still gets a visible range
        self.losses = (low - pad, high + pad)
        self.left, self.top = MARGIN["left"], MARGIN["top"]
        self.right, self.bottom = SIZE[0] - MARGIN["right"], SIZE[1] - MARGIN["bottom"]

    def point(self, step: float, loss: float) -> tuple[float, float]:
        x = self.left + (step - self.steps[0]) / (self.steps[1] - self.steps[0]) * (self.right - self.left)
        y = self.bottom - (loss - self.losses[0]) / (self.losses[1] - self.losses[0]) * (self.bottom - self.top)
        return x, y


def draw_loss_curve(points, path: Path) -> Path:
    """Plot LossPoints (step, train_loss or None, validation_loss), ringing the lowest validation loss."""
    train = [(p.step, p.train_loss) for p in points if p.train_loss is not None]
    validation = [(p.step, p.validation_loss) for p in points]
    axes = Axes([step for step, _ in validation], [loss for _, loss in train + validation])
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw_frame(draw, axes)
    for series, colour in ((train, TRAIN_COLOUR), (validation, VALIDATION_COLOUR)):
        pixels = [axes.point(step, loss) for step, loss in series]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    best = min(points, key=lambda p: p.validation_loss)
    x, y = axes.point(best.step, best.validation_loss)
    draw.ellipse((x - 6, y - 6, x + 6, y + 6), outline=VALIDATION_COLOUR, width=2)
    draw_legend(draw, axes)
    image.save(path)
    return path


def draw_frame(draw: ImageDraw.ImageDraw, axes: Axes) -> None:
    """The axes' box, loss ticks on the left, step ticks below."""
    draw.rectangle((axes.left, axes.top, axes.right, axes.bottom), outline=AXIS_COLOUR)
    for index in range(TICKS):
        loss = axes.losses[0] + (axes.losses[1] - axes.losses[0]) * index / (TICKS - 1)
        step = round(axes.steps[0] + (axes.steps[1] - axes.steps[0]) * index / (TICKS - 1))
        _, y = axes.point(axes.steps[0], loss)
        x, _ = axes.point(step, axes.losses[0])
        draw.line((axes.left - 4, y, axes.left, y), fill=AXIS_COLOUR)
        draw.text((axes.left - 6, y), f"{loss:.4g}", fill=AXIS_COLOUR, anchor="rm")
        draw.line((x, axes.bottom, x, axes.bottom + 4), fill=AXIS_COLOUR)
        draw.text((x, axes.bottom + 6), str(step), fill=AXIS_COLOUR, anchor="mt")
    draw.text(((axes.left + axes.right) / 2, SIZE[1] - 6), "optimizer step", fill=AXIS_COLOUR, anchor="mb")


def draw_legend(draw: ImageDraw.ImageDraw, axes: Axes) -> None:
    for row, (label, colour) in enumerate((("train loss", TRAIN_COLOUR), ("validation loss", VALIDATION_COLOUR))):
        y = axes.top + 12 + row * 16
        draw.line((axes.right - 130, y, axes.right - 110, y), fill=colour, width=2)
        draw.text((axes.right - 104, y), label, fill=AXIS_COLOUR, anchor="lm")


def loss_curve_section(history, output_dir) -> str:
    """The model card's lines on the curve: the plot (written beside README.md) and the lowest validation loss."""
    if not history.points:
        return ""
    draw_loss_curve(history.points, Path(output_dir) / PLOT_FILE)
    best = history.lowest()
    return (f"\n![train and validation loss]({PLOT_FILE})\n\n"
            f"Lowest validation loss: {best.validation_loss:.4f} at step {best.step} "
            f"(of {len(history.points)} validations; every step's figures are in `loss_history.jsonl`).\n")
