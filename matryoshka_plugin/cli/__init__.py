"""The console scripts, one module each, all run through ``runner.run``.

| script | module |
|---|---|
| ``matryoshka-demo`` | ``cli.demo`` |
| ``sparsify-matryoshka`` | ``cli.sparsify`` |
| ``matryoshka-eval`` | ``cli.eval`` |
| ``matryoshka-export`` | ``cli.export`` |
| ``circuit-tracer-matryoshka`` | ``cli.circuit_tracer`` |
| ``matryoshka-clt`` | ``cli.clt`` |
| ``matryoshka-global`` | ``cli.global_graph`` |
"""
