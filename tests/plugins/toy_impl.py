"""Toy-contract implementations run in a worker process (test_loop.py)."""

import os


def copy_v(v):
    return v.clone()


def exits(v):
    os._exit(3)
