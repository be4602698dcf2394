"""Collectors: one module or package per sink, each a ``tracer.plugins.Collector``.

Each registers a ``SinkPlugin`` (its config model, hop model and collector) under the entry-point
group ``funnel_tracer.collectors`` in ``pyproject.toml``; ``docs/ARCHITECTURE.md`` says how to add one.
"""
