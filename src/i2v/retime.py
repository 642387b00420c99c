"""Frame-rate conversion for models that do not render at 24 fps (the Wan 14B models render 16).

The model renders the clip's duration at its own rate (5 s at 16 fps: 81 frames, first and last frame
at 0 s and 5 s), and FFmpeg's `minterpolate` filter, run through PyAV's filter graph, synthesises the
24 fps frames between them by motion-compensated interpolation (bidirectional motion estimation,
overlapped-block compensation). Two of every three output frames are new pictures, not blends, so motion
stays smooth rather than ghosting; across a scene cut the nearer frame is repeated instead. It costs CPU
time: see docs/models.md.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

# mci: motion-compensated interpolation; aobmc: adaptive overlapped blocks; bidir: estimate both ways;
# vsbmc: variable-size blocks; scd=fdiff: scene-change detection by frame difference (above the filter's
# scd_threshold, 10 by default). A model can render a cut (Wan's negative prompts ask it not to); at one,
# each frame between the two sides is a copy of the nearer input frame, never a warp of one scene into
# the other.
MINTERPOLATE = "mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1:scd=fdiff"


def retime(
    frames: np.ndarray,
    src_fps: int,
    dst_fps: int,
    num_frames: int,
    checkpoint: Callable[[], None] | None = None,
) -> np.ndarray:
    """Resample RGB uint8 frames (T, H, W, 3) from `src_fps` to `dst_fps`, returning exactly `num_frames`.

    Output frame i shows time i / dst_fps, so the first frame is kept as it is (the start image) and,
    when the durations match, the last output frame falls on the last input frame (the end image).
    `checkpoint` runs before each input frame, so a cancel stops the (CPU-heavy) interpolation.
    """
    if src_fps == dst_fps:
        return _exact(list(frames), num_frames)
    height, width = frames.shape[1:3]
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=Fraction(1, src_fps))
    # minterpolate works on planar YUV; 4:4:4 keeps full colour until the final encode.
    to_yuv = graph.add("format", "yuv444p")
    interpolate = graph.add("minterpolate", f"fps={dst_fps}:{MINTERPOLATE}")
    to_rgb = graph.add("format", "rgb24")
    sink = graph.add("buffersink")
    source.link_to(to_yuv)
    to_yuv.link_to(interpolate)
    interpolate.link_to(to_rgb)
    to_rgb.link_to(sink)
    graph.configure()

    out: list[np.ndarray] = []
    # The filter emits frames only between two inputs; a repeat of the last frame one step later lets it
    # reach the last input's own time (5 s exactly for a 5 s clip).
    for index, rgb in enumerate([*frames, frames[-1]]):
        if checkpoint is not None:
            checkpoint()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = index, Fraction(1, src_fps)
        graph.push(frame)
        out.extend(_drain(graph))
    graph.push(None)
    out.extend(_drain(graph))
    return _exact(out, num_frames)


def _drain(graph: av.filter.Graph) -> list[np.ndarray]:
    frames = []
    while True:
        try:
            frames.append(graph.pull().to_ndarray(format="rgb24"))
        except (av.error.BlockingIOError, av.error.EOFError):
            return frames


def _exact(frames: list[np.ndarray], num_frames: int) -> np.ndarray:
    # The filter may end one frame short or long of the clip's frame count; hold or drop the last one.
    if not frames:
        raise RuntimeError("frame-rate conversion produced no frames")
    frames = frames[:num_frames] + [frames[-1]] * max(0, num_frames - len(frames))
    return np.stack(frames)
