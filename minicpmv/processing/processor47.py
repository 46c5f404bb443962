"""MiniCPM-V 4.7 processor: 4.6's (processing/processor46.py) except that videos are never
numbered: no `<image_id>k</image_id>` before a video, whatever use_image_id says (images still
are). The canvas positions are computed from its output (processing/canvas_rope.py)."""
from __future__ import annotations

from .processor46 import Processor46


class Processor47(Processor46):
    def _videos(self, videos, cfg, with_ids, *args):
        return super()._videos(videos, cfg, False, *args)
