"""`python -m harness COMMAND`: the same program as the `attention-verify` console script (harness/cli.py)."""


from harness.cli import entry

if __name__ == "__main__":
    entry()
