"""attention-verify: does my attention match the real model, and if not, where is it wrong?

Five pipelines, one subpackage each, every module read in the order it runs:

    fixtures/  a checkpoint's layer -> fixtures/<name>/ (format, extraction, the sources it reads)
    verify/    implementations vs each family's transformers attention: scenarios -> references -> runs -> comparison
               -> diagnosis -> report (the main job, `make verify`)
    bugs/      one catalog of attention bugs on one textbook pipeline: the diagnosis's suspects, the mutation
               suite and the tests' broken implementations all come from it
    e2e/       a whole real model with the implementation in every layer, against transformers
    bench/     time, peak memory and memory traffic on Llama-3.2-1B's shapes

`common.py` holds what they share; `cli.py` is the one command line (`attention-verify`, `python -m harness`).
"""
