"""SIGTERM handled as Ctrl-C, the path both a pretrain run and a study take when stopped."""

import os
import signal
import threading

import pytest

from training.signals import last_signal, sigterm_as_sigint


def test_sigterm_becomes_a_keyboard_interrupt_and_is_recorded():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_sigint() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
    assert received == [signal.SIGTERM] and last_signal(received) == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_ctrl_c_is_a_keyboard_interrupt_even_when_inherited_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a process started in the background
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_sigint() as received:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    pass
        assert received == [] and last_signal(received) == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_signals_are_left_alone():
    seen = {}

    def body():
        with sigterm_as_sigint() as received:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["received"] = received

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "received": []}
