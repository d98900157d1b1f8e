"""The reset rule follows each stream's own frame period (no ROS needed)."""

from tdnet_ros.reset_rule import ResetRule, ResetSettings

SIZE = (480, 640)


def feed(rule: ResetRule, periods_s: list[float], start_ns: int = 10**12) -> list[str | None]:
    stamp, reasons = start_ns, [rule.check(start_ns, SIZE, "cam")]
    for period in periods_s:
        stamp += int(period * 1e9)
        reasons.append(rule.check(stamp, SIZE, "cam"))
    return reasons


def test_a_2_hz_topic_keeps_its_cache():
    rule = ResetRule()
    assert feed(rule, [0.5] * 20) == [None] * 21  # 0.5 s apart: under 5 periods (2.5 s)
    assert rule.jump_limit_s() == 2.5 and rule.counts["time_jump"] == 0


def test_a_30_hz_camera_that_pauses_resets_at_the_floor():
    rule = ResetRule()
    reasons = feed(rule, [1 / 30] * 10 + [0.4, 1 / 30, 1 / 30, 0.6])
    assert reasons[:13] == [None] * 13  # 0.4 s: below the 0.5 s floor, although 12 periods
    assert reasons[13] is None and reasons[14].startswith("timestamp jumped forward by 0.600 s")
    assert rule.counts["time_jump"] == 1


def test_until_the_rate_is_known_the_floor_applies_and_the_ceiling_always_holds():
    rule = ResetRule(ResetSettings(max_jump_s=10.0))
    # A 0.2 Hz topic: its first two gaps reset (rate unknown), then it keeps its cache ...
    reasons = feed(rule, [5.0] * 5 + [11.0])
    assert [r is not None for r in reasons[:6]] == [False, True, True, False, False, False]
    # ... until a gap above the ceiling.
    assert "jumped forward by 11.000 s" in reasons[6] and rule.counts["time_jump"] == 3


def test_backwards_size_and_frame_id_always_reset():
    rule = ResetRule()
    feed(rule, [0.1] * 3)
    last = 10**12 + int(0.3e9)
    assert rule.check(last - 10**9, SIZE, "cam").startswith("timestamp jumped backwards by 1.000 s")
    assert rule.check(last, (600, 800), "cam") == "image size changed from 640x480 to 800x600"
    assert rule.check(last + 10**8, (600, 800), "other") == "frame_id changed from 'cam' to 'other'"
    assert rule.counts == {"time_jump": 0, "backwards": 1, "size": 1, "frame_id": 1}


def test_forget_starts_a_new_sequence():
    rule = ResetRule()
    feed(rule, [0.1] * 3)
    rule.forget()
    assert rule.check(0, SIZE, "cam") is None  # a first frame again
