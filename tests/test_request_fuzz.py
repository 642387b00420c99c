"""Hypothesis against the request model: any JSON-like input is either a valid request or a
ValidationError whose every error names a field; nothing else ever escapes."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from i2v.request import KlingRequest, field_errors

FIELDS = [
    "prompt",
    "start_image",
    "end_image",
    "mode",
    "duration",
    "negative_prompt",
    "seed",
    "audio",
    "aspect_ratio",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=3000),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
plausible = {
    "mode": st.sampled_from(["standard", "pro", "master", "", None]),
    "duration": st.sampled_from([5, 10, "5", 7, -1, 5.0, None]),
    "end_image": st.sampled_from([None, "https://x/a.png", ""]),
}
inputs = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    st.one_of(json_values, *plausible.values()),
    max_size=len(FIELDS),
)

EXAMPLES = int(os.environ.get("I2V_FUZZ_EXAMPLES", "2000"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(inputs)
def test_any_input_validates_or_names_its_fields(data: dict[str, object]) -> None:
    try:
        request = KlingRequest.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc)
        assert errors
        for field, rule in errors:
            assert field.split(".")[0] in KlingRequest.model_fields, field
            assert rule
        return
    assert request.mode in ("standard", "pro") and request.duration in (5, 10)
    assert request.end_image is None or request.mode == "pro"
    assert len(request.prompt) <= 2500 and len(request.negative_prompt) <= 2500
    assert request.num_frames in (121, 241)
