"""The token grid of one video (or image) sequence."""
from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_int

TEXT_POSITIONS = ("head", "tail")


@dataclass(frozen=True)
class VideoLayout:
    """Where each token of a DiT sequence sits.

    The sequence is ``[text] + video`` (``text_position="head"``) or
    ``video + [text]`` (``"tail"``); the video part is in frame-major raster
    order ``(frame, row, column)``.

    Args:
        frames: number of latent frames after patching (``F >= 1``; 1 is an image).
        height: latent rows per frame after patching (``>= 1``).
        width: latent columns per frame after patching (``>= 1``).
        text_len: number of text tokens joined to the video tokens (``>= 0``).
        text_position: ``"head"`` or ``"tail"``.
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: str = "head"

    def __post_init__(self) -> None:
        for field in ("frames", "height", "width"):
            check_int(f"VideoLayout.{field}", getattr(self, field))
        check_int("VideoLayout.text_len", self.text_len, minimum=0)
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(
                f"VideoLayout.text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}"
            )

    @property
    def frame_len(self) -> int:
        """Tokens per frame: ``height * width``."""
        return self.height * self.width

    @property
    def video_len(self) -> int:
        """Video tokens: ``frames * height * width``."""
        return self.frames * self.frame_len

    @property
    def seq_len(self) -> int:
        """Whole sequence length: video plus text tokens."""
        return self.video_len + self.text_len
