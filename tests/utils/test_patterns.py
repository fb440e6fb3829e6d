"""check_match_pattern: the parse-time guard against regexes that backtrack catastrophically."""

import re

import pytest
from pydantic import BaseModel, ValidationError

from compressor.utils.patterns import MatchPattern, check_match_pattern
from compressor.utils.quote import quote


@pytest.mark.parametrize(
    "pattern",
    [
        "re:^(([a-z_.0-9])+)+X$",  # the case
        "re:(a*)*",
        "re:(?:x{2,3})+",
        "re:(\\d+\\.)+mlp",  # harmless, but refused by the same rule (the error says why)
        "re:(a|ab)*X",  # repeated alternation
        "re:(?=(a+)+)b",  # inside a lookahead too
    ],
)
def test_nested_repeats_and_repeated_alternations_are_refused(pattern):
    with pytest.raises(ValueError, match="catastrophic backtracking"):
        check_match_pattern(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        "Linear",
        "model.layers.0.mlp.down_proj",
        "(((not a regex: no re: prefix)+)+",
        "re:.*lm_head",
        "re:.*(q|k|v)_proj$",  # single-character branches compile to a character set
        "re:.*(gate|up)_proj$",  # an alternation that is not repeated
        "re:(model\\.)?layers\\.\\d+\\..*",  # an optional group repeats at most once
        "re:.*.*.*X",  # adjacent repeats: polynomial at worst
    ],
)
def test_plain_names_and_flat_regexes_are_accepted(pattern):
    assert check_match_pattern(pattern) == pattern


def test_a_regex_that_does_not_compile_is_refused_with_the_reason():
    with pytest.raises(
        ValueError, match="'re:\\(\\(' is not a valid regular expression: missing \\)"
    ):
        check_match_pattern("re:((")


def test_the_pydantic_type_names_the_pattern_and_quotes_at_most_a_bounded_part():
    class Fields(BaseModel):
        ignore: list[MatchPattern]

    long = "re:(" + "a" * 10_000 + "+)+"
    with pytest.raises(ValidationError) as err:
        Fields(ignore=["lm_head", long])
    (problem,) = err.value.errors()
    assert problem["loc"] == ("ignore", 1)
    assert len(problem["msg"]) < 600
    assert re.match("^re:", Fields(ignore=["re:.*x"]).ignore[0])


def test_quote_is_bounded_without_building_the_whole_repr():
    shared = ["x" * 50] * 10
    for _ in range(12):  # 10**12 elements once expanded: a full repr would never finish
        shared = [shared] * 10
    text = quote(shared)
    assert len(text) <= 200 and text.startswith("[[[")
    assert quote("short") == "'short'"
