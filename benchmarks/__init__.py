"""Benchmarks of the plugin: scripts, their recorded results, and what they share.

Each folder holds one benchmark's scripts and results; ``RESULTS.md`` summarises them.
``common`` holds the provenance and output helpers every script uses, and
``saelens_jumprelu`` the adapter through which SAELens' coders are evaluated. Run a
script from the repository root as a module, e.g. ``python -m benchmarks.toy.run --help``.
"""
