"""funnel-tracer: is the revenue funnel fresh right now?

The pipeline, one module or package per stage:

    inject/  -> send a synthetic lead, payment or approval carrying a W3C trace id
    watch    -> collectors (see ``collectors/``) look for it on each sink
    verdict  -> ok / late / lost / unknown / inject_failed per hop, honest about blind windows
    export/  -> OTLP spans, metrics, reports (table, JSON, JUnit)

``engine`` runs one probe through that pipeline; ``cli`` is the command line.
"""

__version__ = "0.1.0"
