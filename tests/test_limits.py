"""The limits of issue 11 as plain bookkeeping, on a fake clock: the flood bucket, the failed-login
throttle, connection admission, the one-thread login deadlines, the slow-consumer rule and the
once-a-minute log of limits that bite."""

import threading
import time

import pytest

from activitynet import limits
from activitynet.limits import (Admission, Deadlines, LimitLog, LoginThrottle, Refused,
                                SlowConsumerRule, TokenBucket)
from harness import wait_until


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# --- TokenBucket ---------------------------------------------------------------------------------

def test_a_burst_passes_at_once_then_the_reader_is_told_to_wait_one_token_time_each():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)  # in debt by one token: wait until it is paid
    assert bucket.take() == pytest.approx(0.2)  # a reader that did not wait owes more
    clock.advance(0.2)
    assert bucket.take() == pytest.approx(0.1)


def test_a_reader_that_sleeps_what_it_is_told_gets_exactly_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=200, burst=1000, clock=clock)
    start = clock.now
    for _ in range(5000):
        clock.advance(bucket.take())
    # 1,000 at once, the other 4,000 at 200 a second: the default's 5,000-activity script
    assert clock.now - start == pytest.approx(4000 / 200)


def test_defaults_deliver_a_5000_activity_script_within_30_seconds():
    clock = Clock()
    bucket = TokenBucket(limits.DEFAULT_RATE, limits.DEFAULT_BURST, clock=clock)
    waited = 0.0
    for _ in range(5000):
        wait = bucket.take(limits.activity_cost(300))
        clock.advance(wait)
        waited += wait
    assert waited <= 25.0, "leave at least 5 s of the 30 s for delivery on a slow machine"


def test_an_idle_bucket_refills_only_up_to_its_burst():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    clock.advance(3600)
    assert [bucket.take() for _ in range(3)] == [0.0] * 3
    assert bucket.take() > 0


def test_rate_zero_turns_the_bucket_off():
    bucket = TokenBucket(rate=0, burst=0, clock=Clock())
    assert all(bucket.take(1000) == 0.0 for _ in range(10_000))
    assert bucket.paused == 0


def test_big_activities_cost_one_token_per_started_cost_unit():
    assert limits.activity_cost(1) == 1
    assert limits.activity_cost(1600) == 1
    assert limits.activity_cost(1601) == 2
    assert limits.activity_cost(1024 * 1024) == 656
    clock = Clock()
    bucket = TokenBucket(limits.DEFAULT_RATE, limits.DEFAULT_BURST, clock=clock)
    sent = 0
    while clock.now < 1000.0 + 60:  # a minute of 1 MiB activities as fast as the bucket allows
        clock.advance(bucket.take(limits.activity_cost(1024 * 1024)))
        sent += 1024 * 1024
    assert sent / 60 < 1_000_000, "one flooder alone must not outrun a reader taking 1 MB/s"


def test_negative_settings_are_refused():
    with pytest.raises(ValueError):
        TokenBucket(rate=-1)


# --- LoginThrottle -------------------------------------------------------------------------------

def test_five_failures_a_minute_are_free_then_the_delay_grows_to_a_cap():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    key = ("10.0.0.1", "alice")
    assert [throttle.failed(key) for _ in range(5)] == [0.0] * 5
    delays = [throttle.failed(key) for _ in range(6)]
    assert delays[0] > 0
    assert delays == sorted(delays) and delays[-1] == pytest.approx(2.0)
    assert max(delays) <= 2.0


def test_the_delay_is_per_username_and_per_address():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(8):
        throttle.failed(("10.0.0.1", "alice"))
    assert throttle.failed(("10.0.0.1", "bob")) == 0.0
    assert throttle.failed(("10.0.0.2", "alice")) == 0.0
    assert throttle.failed(("10.0.0.1", "alice")) > 0


def test_a_marking_script_checking_a_handful_of_failures_per_user_never_waits():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for user in range(1000):
        for _ in range(3):
            assert throttle.failed(("127.0.0.1", f"user{user}")) == 0.0
            clock.advance(0.001)


def test_failures_spread_over_time_are_forgiven():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    key = ("10.0.0.1", "alice")
    for _ in range(100):  # one failure every 12 s is exactly 5 a minute: never delayed
        assert throttle.failed(key) == 0.0
        clock.advance(12.0)


def test_a_success_forgets_the_failures():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    key = ("10.0.0.1", "alice")
    for _ in range(7):
        throttle.failed(key)
    throttle.succeeded(key)
    assert throttle.failed(key) == 0.0


def test_memory_stays_bounded_and_old_entries_expire():
    clock = Clock()
    throttle = LoginThrottle(max_keys=100, clock=clock)
    for n in range(10_000):  # an attacker trying a new username every time
        throttle.failed(("10.0.0.1", f"user{n}"))
    assert len(throttle) == 100
    clock.advance(LoginThrottle.WINDOW + 1)  # a single failure drains within the window
    assert len(throttle) == 0


def test_the_throttle_is_safe_from_many_reader_threads():
    throttle = LoginThrottle()
    key = ("10.0.0.1", "alice")
    threads = [threading.Thread(target=lambda: [throttle.failed(key) for _ in range(500)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level, _updated = throttle._levels[key]
    assert level == pytest.approx(throttle.ceiling, abs=0.5)  # 4,000 failures: at the ceiling
    assert throttle.failed(key) == pytest.approx(2.0)


def test_an_attacker_who_gives_up_is_forgiven_within_minutes():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    key = ("10.0.0.1", "alice")
    for _ in range(100_000):
        throttle.failed(key)
    clock.advance(throttle.ceiling / 5 * 60)  # drains at 5 a minute
    assert len(throttle) == 0
    assert throttle.failed(key) == 0.0


# --- Admission -----------------------------------------------------------------------------------

def test_pending_connections_per_address_are_capped_and_others_still_admitted():
    admission = Admission(max_connections=100, max_pending_per_address=3)
    tickets = [admission.admit("10.0.0.1") for _ in range(3)]
    with pytest.raises(Refused, match=r"too many connections from 10\.0\.0\.1 .*limit 3"):
        admission.admit("10.0.0.1")
    admission.admit("10.0.0.2")  # another address is not affected
    tickets[0].settle()  # logged in: no longer pending, so one more may come
    admission.admit("10.0.0.1")
    assert admission.pending("10.0.0.1") == 3 and admission.open == 5


def test_the_connection_limit_refuses_newcomers_but_never_a_link_we_dial():
    admission = Admission(max_connections=2, max_pending_per_address=10)
    first = admission.admit("10.0.0.1")
    admission.admit("10.0.0.2")
    with pytest.raises(Refused, match="limit of 2 connections"):
        admission.admit("10.0.0.3")
    admission.admit("10.0.0.9", dialled=True)  # ours: counted, never refused
    assert admission.open == 3
    first.release()
    first.release()  # idempotent: a close racing another close counts once
    with pytest.raises(Refused):
        admission.admit("10.0.0.3")  # still 2 open: the dialled link holds the freed place
    assert admission.open == 2


def test_one_thousand_clients_from_one_address_connect_at_once_under_the_defaults():
    admission = Admission(limits.default_max_connections(20_000))
    tickets = [admission.admit("127.0.0.1") for _ in range(1000)]
    for ticket in tickets:
        ticket.settle()
    assert admission.pending() == 0 and admission.open == 1000


def test_releases_forget_addresses_so_the_table_stays_bounded():
    admission = Admission(max_connections=10, max_pending_per_address=10)
    for n in range(10_000):
        ticket = admission.admit(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        if n % 2:
            ticket.settle()
        ticket.release()
        ticket.settle()  # a login after the close changes nothing
    assert admission.open == 0 and admission._pending == {}


def test_default_max_connections_leaves_a_reserve_of_descriptors():
    assert limits.default_max_connections(20_000) == 20_000 - limits.FD_RESERVE
    assert limits.default_max_connections(50) == 1


# --- Deadlines -----------------------------------------------------------------------------------

def test_due_returns_only_uncancelled_items_whose_time_has_come():
    deadlines = Deadlines(expire=None)
    deadlines.add("a", 10.0, "A")
    deadlines.add("b", 20.0, "B")
    deadlines.add("c", 5.0, "C")
    deadlines.cancel("a")
    assert deadlines.due(9.0) == ["C"]
    assert deadlines.due(30.0) == ["B"]
    assert deadlines.due(100.0) == [] and len(deadlines) == 0


def test_adding_a_key_again_replaces_its_deadline():
    deadlines = Deadlines(expire=None)
    deadlines.add("a", 10.0, "first")
    deadlines.add("a", 30.0, "second")
    assert deadlines.due(20.0) == []
    assert deadlines.due(30.0) == ["second"]


def test_cancelled_entries_do_not_pile_up():
    deadlines = Deadlines(expire=None)
    for n in range(100_000):  # every connection logs in long before its deadline
        deadlines.add(n, 1000.0 + n, n)
        deadlines.cancel(n)
    assert len(deadlines) == 0 and len(deadlines._heap) <= 1024 + 1


def test_one_thread_ends_each_overdue_item_on_time_and_spares_the_cancelled():
    expired = []
    deadlines = Deadlines(expire=expired.append)
    deadlines.start()
    try:
        now = time.monotonic()
        for n in range(2000):
            deadlines.add(n, now + 0.2, n)
        for n in range(0, 2000, 2):
            deadlines.cancel(n)
        deadlines.add("late", now + 60, "late")
        deadlines.add("early", now + 0.1, "early")  # earlier than all: wakes the thread
        wait_until(lambda: len(expired) == 1001, message="1,000 overdue items and 'early' expired")
        assert expired[0] == "early" and sorted(expired[1:]) == list(range(1, 2000, 2))
        assert len(deadlines) == 1  # "late" is still waiting
    finally:
        deadlines.close()
    assert expired.count("late") == 0


def test_a_failing_expire_call_does_not_end_the_others(caplog):
    seen = []

    def expire(item):
        if item == "bad":
            raise RuntimeError("boom")
        seen.append(item)

    deadlines = Deadlines(expire=expire)
    deadlines.start()
    try:
        now = time.monotonic()
        deadlines.add(1, now + 0.05, "bad")
        deadlines.add(2, now + 0.1, "good")
        wait_until(lambda: seen == ["good"], message="the item after a failing one")
    finally:
        deadlines.close()
    assert "ending 'bad' at its deadline failed" in caplog.text
    caplog.clear()  # logged on purpose: not a server crash


# --- SlowConsumerRule ----------------------------------------------------------------------------

MB = 1_000_000


LIMIT = 16 * MB


def test_a_reader_under_the_limit_is_not_watched():
    rule = SlowConsumerRule()
    assert rule.judge(LIMIT, queued=16 * MB, drained=0, now=0.0, watch=None) == (None, None)


def test_a_reader_that_stopped_reading_is_cut_after_one_window():
    rule = SlowConsumerRule(window=5.0)
    reason, watch = rule.judge(LIMIT, 17 * MB, drained=100, now=0.0, watch=None)
    assert reason is None and watch == (0.0, 100)
    reason, watch = rule.judge(LIMIT, 18 * MB, drained=100, now=4.9, watch=watch)
    assert reason is None  # not a whole window yet
    reason, _ = rule.judge(LIMIT, 19 * MB, drained=100, now=5.0, watch=watch)
    assert "reading only 0.00 MB/s" in reason


def test_a_reader_drowned_by_a_burst_but_reading_1_mb_per_second_stays():
    rule = SlowConsumerRule(window=5.0)
    queued, drained, watch = 17 * MB, 0, None
    for second in range(30):  # 1.5 MB/s arrives, 1 MB/s is read: the outbox grows, slowly
        reason, watch = rule.judge(LIMIT, queued, drained, float(second), watch)
        assert reason is None
        queued += MB // 2
        drained += MB
    assert queued < LIMIT * rule.hard_factor


def test_the_hard_limit_cuts_whatever_the_reading_rate():
    rule = SlowConsumerRule(hard_factor=4)
    reason, _ = rule.judge(LIMIT, 64 * MB + 1, drained=10**12, now=0.0, watch=(0.0, 0))
    assert "hard limit" in reason


def test_back_under_the_limit_the_watch_ends():
    rule = SlowConsumerRule()
    _, watch = rule.judge(LIMIT, 17 * MB, 0, 0.0, None)
    assert rule.judge(LIMIT, 1 * MB, 0, 1.0, watch) == (None, None)


# --- LimitLog ------------------------------------------------------------------------------------

def test_a_limit_biting_is_logged_once_a_minute_per_address_with_the_quiet_count():
    clock = Clock()
    log = LimitLog(interval=60, clock=clock)
    assert log.bite("10.0.0.1") == 0
    assert [log.bite("10.0.0.1") for _ in range(99)] == [None] * 99
    assert log.bite("10.0.0.2") == 0
    clock.advance(60)
    assert log.bite("10.0.0.1") == 99


def test_the_limit_log_forgets_the_oldest_addresses():
    log = LimitLog(max_keys=10, clock=Clock())
    for n in range(1000):
        log.bite(n)
    assert len(log._seen) == 10
