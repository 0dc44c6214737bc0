"""``upcycle selftest``: does the engine work on this node? One fixed battery, minutes long.

Groups (one module each): ``environment`` (versions, which backend and why), ``training``
(tiny dense and MoE runs, bit-exact resume, a decay branch), ``parallel`` (TP=2 dense,
EP=2 MoE), ``conversion`` (dense -> 8 experts top-2, verified on the device, exported to
Hugging Face), ``throughput`` (0.1B dense and 8x0.1B MoE tokens/s and MFU). ``battery``
runs them in order, ``report`` keeps the results (one PASS/FAIL/SKIP line each, the
summary, ``selftest.json`` written atomically after every check).

    from megatron_upcycle.selftest.battery import run_selftest
    run_selftest("selftest-out", quick=True, device="cpu")
"""
