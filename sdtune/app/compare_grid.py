"""A comparison's grid image: one column per model under its name, one row per axis value beside it, drawn with
PIL's default font. The cells are pasted pixel for pixel (never resized), so the grid shows each cell's exact image;
a column is widened, not its cell shrunk, when its name is wider than the image."""

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, EMPTY = "white", "black", (220, 220, 220)  # EMPTY: a cell without an image (failed, stopped)
PADDING = 4  # pixels around every label and between the columns


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: a header band of column labels on top, a band of row labels on the left."""
    cell: tuple[int, int]  # (width, height) of every cell: one size for the whole comparison
    columns: int
    rows: int
    column_width: int  # the cell or the widest column label, whichever is wider, plus padding
    header: int  # height of the column labels' band
    margin: int  # width of the row labels' band

    @property
    def size(self) -> tuple[int, int]:
        return self.margin + self.columns * self.column_width, self.header + self.rows * (self.cell[1] + PADDING)

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell: centred in its column."""
        left = self.margin + column * self.column_width + (self.column_width - self.cell[0]) // 2
        top = self.header + row * (self.cell[1] + PADDING)
        return left, top, left + self.cell[0], top + self.cell[1]


def label_font(cell: tuple[int, int]) -> ImageFont.ImageFont:
    """PIL's default font at a size that stays readable beside 64 px cells and in proportion with 512 px ones."""
    return ImageFont.load_default(size=max(11, min(cell) // 20))


def text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def layout(cell: tuple[int, int], column_labels: list[str], row_labels: list[str], font) -> GridLayout:
    widths = [text_size(font, label)[0] for label in column_labels]
    height = max(text_size(font, label)[1] for label in column_labels + row_labels)
    margin = max(text_size(font, label)[0] for label in row_labels) + 2 * PADDING
    return GridLayout(cell, len(column_labels), len(row_labels), max(cell[0], *widths) + 2 * PADDING,
                      height + 2 * PADDING, margin)


def draw_grid(cells: list[list[Image.Image | str]], column_labels: list[str], row_labels: list[str],
              cell: tuple[int, int]) -> Image.Image:
    """`cells[row][column]` is an image, or the word shown in its place ("failed", "stopped", "" not yet made)."""
    font = label_font(cell)
    grid = layout(cell, column_labels, row_labels, font)
    canvas = Image.new("RGB", grid.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(column_labels):
        draw.text((grid.margin + (column + 0.5) * grid.column_width, grid.header / 2), label, INK, font, anchor="mm")
    for row, label in enumerate(row_labels):
        top = grid.box(row, 0)[1]
        draw.text((PADDING, top + cell[1] / 2), label, INK, font, anchor="lm")
        for column, content in enumerate(cells[row]):
            box = grid.box(row, column)
            if isinstance(content, Image.Image):
                canvas.paste(content.convert("RGB"), box[:2])
            else:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), EMPTY)
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), content, INK, font, anchor="mm")
    return canvas
