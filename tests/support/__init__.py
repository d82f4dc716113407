"""What tests, benchmarks and examples build on; not shipped (the package has no test code).

* ``builders``        tiny seeded models, PEFT adapters and the demo adapter (no downloads;
                      needs the ``[test]`` extra: transformers, peft, tokenizers)
* ``server_process``  a stock ``vllm serve`` subprocess: start, wait for /health, stop

Benchmarks and examples import these from the repository root (``PYTHONPATH=$PWD`` or the
path bootstrap at their top).
"""
