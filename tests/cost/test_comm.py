"""Alpha-beta collectives, placement and profile files (toy links of conftest.py)."""

import json

import numpy as np
import pytest

from emulator.cost.comm import (CommEntry, CommProfile, ProfileError, all_to_all_bytes,
                                placement_of)
from emulator.cost.profile_io import load_profile, save_profile
from emulator.errors import UserError


def test_ring_all_reduce_from_hardware(hw):
    prof = CommProfile.from_hardware(hw, max_group_size=8)
    # Ring over 4 ranks, 1 MB: 2 * 3 * 1 us + 2 * 3/4 * 1e6 B / 1e10 B/s = 6 us + 150 us.
    assert prof.time_s("all_reduce", 4, "intra", 1e6) == pytest.approx(1.56e-4, rel=1e-12)
    # Across nodes: 6 * 10 us + 1.5 * 1e6 / 1e9.
    assert prof.time_s("all_reduce", 4, "inter", 1e6) == pytest.approx(1.56e-3, rel=1e-12)
    # all_gather of a 1 MB output: 3 * 1 us + 3/4 * 1e6 / 1e10.
    assert prof.time_s("all_gather", 4, "intra", 1e6) == pytest.approx(7.8e-5, rel=1e-12)
    assert prof.time_s("send_recv", 2, "inter", 1e6) == pytest.approx(1e-5 + 1e-3, rel=1e-12)
    # A group of one and an empty message cost nothing.
    assert prof.time_s("all_reduce", 1, "intra", 1e6) == 0.0
    assert prof.time_s("all_reduce", 4, "intra", 0) == 0.0


def test_all_to_all_priced_by_busiest_rank(hw):
    send = np.array([[100, 10, 20],
                     [5, 100, 5],
                     [30, 0, 100]])
    # Sent to others: 30, 10, 30; received from others: 35, 10, 25 -> rank 0 receives 35.
    assert all_to_all_bytes(send) == 35
    prof = CommProfile.from_hardware(hw, max_group_size=4)
    assert prof.time_s("all_to_all", 3, "intra", all_to_all_bytes(send)) == pytest.approx(
        1e-6 + 35 / 1e10, rel=1e-12)
    with pytest.raises(ValueError, match="square"):
        all_to_all_bytes(np.zeros((2, 3)))


def test_placement_by_node_boundaries():
    assert placement_of([0, 1], gpus_per_node=2) == "intra"
    assert placement_of([1, 2], gpus_per_node=2) == "inter"
    assert placement_of([4, 5, 6, 7], gpus_per_node=4) == "intra"
    assert placement_of([0, 4], gpus_per_node=4) == "inter"


def _profile() -> CommProfile:
    return CommProfile(name="host", entries=[
        CommEntry(op="all_reduce", group_size=2, placement="intra", alpha_s=1e-5,
                  beta_s_per_byte=1e-9),
        CommEntry(op="all_reduce", group_size=8, placement="intra", alpha_s=5e-5,
                  beta_s_per_byte=2e-9, gamma_s_per_byte=1e-10),
    ])


def test_lookup_exact_then_nearest_size():
    prof = _profile()
    assert prof.lookup("all_reduce", 2, "intra").group_size == 2
    assert prof.lookup("all_reduce", 3, "intra").group_size == 2
    assert prof.lookup("all_reduce", 5, "intra").group_size == 8  # tie: the larger group
    assert prof.lookup("all_reduce", 64, "intra").group_size == 8
    # Between measured message sizes: the alpha-beta(-gamma) line.
    assert prof.time_s("all_reduce", 8, "intra", 1000) == pytest.approx(5e-5 + 1000 * 2.1e-9)
    with pytest.raises(ProfileError, match="no 'all_reduce' entries for placement 'inter'"):
        prof.lookup("all_reduce", 2, "inter")


def test_profile_json_round_trip(tmp_path, hw):
    for prof in (_profile(), CommProfile.from_hardware(hw, max_group_size=4)):
        path = tmp_path / "profile.json"
        save_profile(prof, path)
        assert json.loads(path.read_text())["schema_version"] == 1
        assert load_profile(path) == prof


def test_profile_rejects_duplicates_and_bad_send_recv():
    entry = dict(op="all_reduce", group_size=2, placement="intra", alpha_s=0,
                 beta_s_per_byte=0)
    with pytest.raises(ValueError, match="duplicate entry"):
        CommProfile(name="x", entries=[entry, entry])
    with pytest.raises(ValueError, match="group_size 2"):
        CommEntry(op="send_recv", group_size=4, placement="intra", alpha_s=0, beta_s_per_byte=0)


@pytest.mark.parametrize("content, message", [
    ('{"schema_version": 1, "name": "h", "entries": [{"op": "all_reduce", "group_size": 2, '
     '"placement": "intra", "alpha_s": -1, "beta_s_per_byte": 0}]}',
     r"field 'entries\[0\].alpha_s'"),
    ('{"schema_version": 1, "name": "h", "entries": [{"op": "broadcast", "group_size": 2, '
     '"placement": "intra", "alpha_s": 0, "beta_s_per_byte": 0}]}',
     r"field 'entries\[0\].op'"),
    ('{"schema_version": 2, "name": "h", "entries": []}', "field 'schema_version': version 2 is not supported"),
    ('{"name": "h", "entries": []}', "field 'schema_version' is missing"),
    ("not json", "not a readable JSON"),
    ("[1, 2]", "is a JSON object"),
])
def test_load_profile_errors_name_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_load_missing_profile(tmp_path):
    with pytest.raises(ProfileError, match="not found; run `emulator calibrate`"):
        load_profile(tmp_path / "none.json")
