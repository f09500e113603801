"""The rules of fal's parameter table that more than one place uses: rounding sides to multiples of 16 and the
wording of a number's problems (the node checks, the runner's checks, the pre-flight and the fal server)."""
from __future__ import annotations

import math

import pytest

from comfyui_krea.sampling.parameters import (
    MAX_PROMPT_CHARS,
    nearest_multiple,
    number_problem,
    range_problem,
    round_down_side,
)


@pytest.mark.parametrize("side, expected", [(1, 16), (7, 16), (8, 16), (23, 16), (24, 32), (25, 32), (40, 48),
                                            (1000, 1008), (1016, 1024), (1023, 1024)])
def test_nearest_multiple_rounds_halves_up_and_never_below_16(side, expected):
    got = nearest_multiple(side)
    assert got == expected and type(got) is int  # a pixel size, never a float


@pytest.mark.parametrize("side, expected", [(1, 16), (15, 16), (16, 16), (31, 16), (32, 32), (1000, 992),
                                            (14142, 14128)])
def test_round_down_side_takes_the_multiple_below_as_fal_does(side, expected):
    got = round_down_side(side)
    assert got == expected and type(got) is int


def test_range_problems_are_worded_as_comfyui_words_its_own():
    assert range_problem("steps", 0, 1, 50) == "steps: 0 is smaller than the minimum 1"
    assert range_problem("steps", 51, 1, 50) == "steps: 51 is bigger than the maximum 50"
    assert range_problem("steps", 1, 1, 50) is None and range_problem("steps", 50, 1, 50) is None
    assert range_problem("x", -1e9, None, None) is None


@pytest.mark.parametrize("value, whole, message", [
    (True, False, "n: True is not a number"),
    ("3", False, "n: '3' is not a number"),
    (math.nan, False, "n: nan is not a finite number"),
    (math.inf, True, "n: inf is not a finite number"),
    (2.5, True, "n: 2.5 is not an integer (write it without a decimal point)"),
    (2.0, True, "n: 2.0 is not an integer (write it without a decimal point)"),
    (0, True, "n: 0 is smaller than the minimum 1"),
    (0.5, False, "n: 0.5 is smaller than the minimum 1"),
    (11, True, "n: 11 is bigger than the maximum 10"),
    (3, True, None),
    (2.5, False, None),
])
def test_number_problems(value, whole, message):
    assert number_problem("n", value, 1, 10, whole=whole) == message


def test_the_prompt_limit_is_ten_times_what_t5_reads():
    assert MAX_PROMPT_CHARS == 20_000  # T5 reads 512 tokens, about 2,000 characters
