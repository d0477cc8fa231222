"""Secrets are compared in one place, in constant time, and a missing one never matches."""

from activitynet.credentials import same_secret


def test_equal_secrets_match_and_different_ones_do_not():
    assert same_secret("gen1d2n13rbuivfksr8bmlplrk", "gen1d2n13rbuivfksr8bmlplrk")
    assert not same_secret("gen1d2n13rbuivfksr8bmlplrk", "gen1d2n13rbuivfksr8bmlplrl")
    assert not same_secret("abc", "abcd")  # a prefix is not the secret
    assert not same_secret("", "a")
    assert same_secret("", "")


def test_any_unicode_compares_including_a_lone_surrogate_from_json():
    assert same_secret("pässwörd✓", "pässwörd✓")
    assert not same_secret("pässwörd", "passwort")
    assert same_secret("\ud800", "\ud800")  # json.loads('"\\ud800"') is a legal secret
    assert not same_secret("\ud800", "\ud801")


def test_a_missing_secret_never_matches():
    assert not same_secret(None, "abc")
    assert not same_secret("abc", None)
    assert not same_secret(None, None)
