"""The decline table: soft codes may be retried later, hard ones end the ladder."""

from __future__ import annotations

import pytest

from billing.declines import DEFAULT_CODES, is_soft


@pytest.mark.parametrize("code", ["05", "51", "91", "REFUSED"])
def test_documented_soft_codes(code: str) -> None:
    assert DEFAULT_CODES[code] == "soft"
    assert is_soft(code)


@pytest.mark.parametrize("code", ["54", "41", "43", "14", "57", "ALIAS", "AUTH", "AMOUNT"])
def test_documented_hard_codes(code: str) -> None:
    assert DEFAULT_CODES[code] == "hard"
    assert not is_soft(code)


def test_table_holds_only_soft_or_hard_with_upper_case_keys() -> None:
    assert set(DEFAULT_CODES.values()) == {"soft", "hard"}
    assert all(key == key.strip().upper() for key in DEFAULT_CODES)


def test_unknown_code_counts_as_soft() -> None:
    assert is_soft("ZZ-NEVER-SEEN")
    assert is_soft("")


def test_codes_compare_case_insensitively_and_ignore_blanks() -> None:
    assert is_soft("refused")
    assert not is_soft(" alias ")
    assert not is_soft("n7")


def test_overrides_win_in_any_case() -> None:
    assert not is_soft("05", {"05": "hard"})
    assert is_soft("54", {"54": "soft"})
    assert not is_soft("refused", {"Refused": "HARD"})
    assert is_soft("auth", {" AUTH ": "soft"})


def test_override_of_another_code_leaves_the_table_alone() -> None:
    assert not is_soft("54", {"05": "hard"})
    assert is_soft("51", {"05": "hard"})


def test_unknown_code_made_hard_by_override() -> None:
    assert not is_soft("X9", {"x9": "hard"})


def test_settings_overrides_feed_is_soft() -> None:
    from billing.settings import Settings

    settings = Settings(decline_codes={"51": "hard"})
    assert not is_soft("51", settings.decline_codes)
