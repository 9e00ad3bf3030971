"""A call in a child process of its own (the benchmarks time every backend so): its result and its
exception come back, and a child that crashes in native code fails the call instead of hanging it."""

import os
import signal

import pytest

from canao.processes import call_in_child


def _add(a, b):
    return a + b


def _refuse(name):
    raise ValueError(f"{name}: refused")


def _crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_the_childs_result_and_exception_come_back():
    assert call_in_child("adding", _add, 2, 3) == 5
    with pytest.raises(ValueError, match="x: refused"):
        call_in_child("refusing", _refuse, "x")


def test_a_child_killed_by_a_signal_fails_the_call_naming_it():
    with pytest.raises(RuntimeError, match=r"timing llama.cpp: its child process died \(killed by signal SIGSEGV\)"):
        call_in_child("timing llama.cpp", _crash)
