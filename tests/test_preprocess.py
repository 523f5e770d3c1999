"""Image preparation for segmentation: the channel-axis rule, stacks refused, dropped channels reported."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from phenoscope.core.axes import channels_first, guess_channel_axis
from phenoscope.segment.preprocess import network_input, to_yxc


def test_one_channel_axis_rule():
    assert guess_channel_axis((64, 64)) is None
    assert guess_channel_axis((3, 64, 64)) == 0 and guess_channel_axis((64, 64, 3)) == 2
    assert channels_first(np.zeros((64, 48, 2))).shape == (2, 64, 48)
    with pytest.raises(ValueError, match="expected a 2D image"):
        guess_channel_axis((2, 3, 64, 64))


def test_z_stack_is_refused_unless_the_channel_axis_is_given():
    stack = np.random.default_rng(0).random((12, 64, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"looks like a stack of 12 planes \(Z or time\)"):
        to_yxc(stack)
    assert to_yxc(stack, channel_axis=0, max_channels=12).shape == (64, 64, 12)


def test_dropped_channels_warn_but_alpha_does_not():
    rng = np.random.default_rng(0)
    five = rng.random((5, 64, 64)).astype(np.float32)
    with pytest.warns(UserWarning, match="image has 5 channels; the model uses the first 3"):
        assert network_input(five, None, 3, False).shape == (3, 64, 64)
    rgba = np.concatenate([rng.integers(0, 255, (64, 64, 3)), np.full((64, 64, 1), 255)], axis=-1).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert network_input(rgba, None, 3, False).shape == (3, 64, 64)
