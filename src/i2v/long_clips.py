"""10 s clips as 5 s clips joined at a frame (`I2V_LONG_CLIPS=extend`), each at the length the models were
published for.

TI2V-5B was published for 121 frames and FLF2V-14B for 81; a 10 s clip in one sequence is twice that and
costs 3-4 times a 5 s one (attention grows with the square of the tokens). Extending renders the first
5 s, then the next 5 s from its last frame, and joins them on that frame (241 = 121 + 120 at 24 fps,
161 = 81 + 80 at 16 fps): each part at the published length, the whole for twice a 5 s clip. The cost is
at the seam: the second part sees one frame, not the first part's motion, so motion can change direction
there, and the seam frame goes through the VAE twice. An end image cannot be placed this way (it belongs
to the last frame of the whole clip), so a request with one runs in one sequence. docs/models.md has the
arithmetic.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from .backends import BackendSpec, Clip, ModelInputs
from .settings import LongClips
from .video import to_uint8

PART_SECONDS = 5  # the length the references publish for


def parts_for(spec: BackendSpec, inputs: ModelInputs, long_clips: LongClips) -> int:
    """How many runs make the clip: 1 (one sequence), or the number of 5 s parts when extending a clip
    longer than one part that has no end image."""
    if long_clips != "extend" or inputs.end_image is not None or spec.needs_end_frame:
        return 1
    part = spec.frames_for(PART_SECONDS)
    count, rest = divmod(inputs.model_frames - 1, part - 1)
    return count if rest == 0 and count > 1 else 1


def part_inputs(spec: BackendSpec, inputs: ModelInputs) -> ModelInputs:
    """The first part: the request's inputs at 5 s."""
    return replace(inputs, model_frames=spec.frames_for(PART_SECONDS))


def next_part(inputs: ModelInputs, previous: Clip) -> ModelInputs:
    """The part after `previous`: from its last frame, with the next seed (fresh noise, still reproducible)."""
    last = previous.frames[-1]
    image = Image.fromarray(last if last.dtype == np.uint8 else to_uint8(last))
    return replace(inputs, image=image, seed=(inputs.seed + 1) % 2**32)


def join(parts: list[Clip]) -> Clip:
    """The parts as one clip, each later part's first frame (its previous part's last) dropped, and with
    it that frame's share of the soundtrack."""
    first = parts[0]
    frames = np.concatenate([first.frames, *(p.frames[1:] for p in parts[1:])])
    audio = None
    if all(p.audio is not None for p in parts):
        rate = first.audio[1]  # type: ignore[index]
        seam = round(rate / first.fps)
        samples = [first.audio[0]] + [p.audio[0][:, seam:] for p in parts[1:]]  # type: ignore[index]
        audio = (np.concatenate(samples, axis=1), rate)
    return Clip(frames=frames, fps=first.fps, audio=audio)
