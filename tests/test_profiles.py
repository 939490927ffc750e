"""Client profiles: the registry's intended settings, parsing a mix, exact assignment."""

from __future__ import annotations

from collections import Counter

import pytest

from client.profiles import PROFILES, assign_profiles, parse_profile_mix


def test_hospital_and_iot_profiles_have_their_intended_settings():
    """Hospital: 4x data, 2 epochs, batch 32; IoT hub: 1x data, 1 epoch, batch 16."""
    hospital, iot = PROFILES["hospital"], PROFILES["iot"]

    assert (hospital.data_weight, hospital.local_epochs, hospital.batch_size) == (4.0, 2, 32)
    assert (iot.data_weight, iot.local_epochs, iot.batch_size) == (1.0, 1, 16)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hospital=0.3,iot=0.7", {"hospital": 0.3, "iot": 0.7}),
        (" Hospital = 0.25 , IOT=0.75 ", {"hospital": 0.25, "iot": 0.75}),
        ("hospital", {"hospital": 1.0}),
        ("iot=1", {"iot": 1.0}),
        ("hospital=0.1,iot=0.2,", None),
    ],
)
def test_parse_profile_mix(spec, expected):
    """Valid mixes parse to fractions summing to 1; a trailing comma is an empty entry and is refused."""
    if expected is None:
        with pytest.raises(ValueError, match="empty entry"):
            parse_profile_mix(spec)
        return

    mix = parse_profile_mix(spec)

    assert mix == pytest.approx(expected)
    assert list(mix) == list(expected)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty profile mix"),
        ("clinic=1", "'clinic'"),
        ("hospital=0.3,iot=0.6", "sum to 0.9"),
        ("hospital=abc", "'abc'"),
        ("hospital=0,iot=1", "'hospital=0'"),
        ("hospital=1.5", "'hospital=1.5'"),
        ("hospital=nan", "'hospital=nan'"),
        ("hospital,iot=0.5", "'hospital' needs a fraction"),
        ("iot=0.5,iot=0.5", "'iot' given twice"),
    ],
)
def test_bad_profile_mix_names_the_bad_part_in_one_line(spec, named):
    """Each malformed mix raises ValueError whose single line quotes the offending part."""
    with pytest.raises(ValueError) as error:
        parse_profile_mix(spec)

    assert named in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("num_clients", "mix", "expected"),
    [
        (10, {"hospital": 0.3, "iot": 0.7}, {"hospital": 3, "iot": 7}),
        (10, {"hospital": 0.2, "iot": 0.8}, {"hospital": 2, "iot": 8}),
        # 7 x 0.5 = 3.5 each: the one leftover client goes to the profile listed first.
        (7, {"hospital": 0.5, "iot": 0.5}, {"hospital": 4, "iot": 3}),
        (7, {"iot": 0.5, "hospital": 0.5}, {"hospital": 3, "iot": 4}),
        # 6 x 0.35 = 2.1 and 6 x 0.65 = 3.9: floors 2 + 3, the leftover goes to the larger remainder (0.9).
        (6, {"hospital": 0.35, "iot": 0.65}, {"hospital": 2, "iot": 4}),
        (3, {"hospital": 0.1, "iot": 0.9}, {"iot": 3}),
        (5, {"hospital": 1.0}, {"hospital": 5}),
    ],
)
def test_assign_profiles_gives_largest_remainder_counts(num_clients, mix, expected):
    """Counts are the largest-remainder rounding of num_clients x fraction, worked out by hand."""
    profiles = assign_profiles(num_clients, mix, seed=0)

    assert len(profiles) == num_clients
    assert Counter(profile.name for profile in profiles) == Counter(expected)


def test_assign_profiles_is_a_seeded_shuffle():
    """The same seed gives the same order; some other seed gives another order of the same counts."""
    mix = {"hospital": 0.3, "iot": 0.7}

    first = [p.name for p in assign_profiles(10, mix, seed=4)]
    again = [p.name for p in assign_profiles(10, mix, seed=4)]
    others = [[p.name for p in assign_profiles(10, mix, seed=seed)] for seed in range(5, 10)]

    assert first == again
    assert any(order != first for order in others)
    assert all(Counter(order) == Counter(first) for order in others)


@pytest.mark.parametrize(
    ("num_clients", "mix", "message"),
    [(0, {"iot": 1.0}, "num_clients"), (3, {}, "empty profile mix"), (3, {"clinic": 1.0}, "'clinic'")],
)
def test_assign_profiles_rejects_bad_arguments(num_clients, mix, message):
    """Nonsense arguments raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        assign_profiles(num_clients, mix, seed=0)
