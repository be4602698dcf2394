"""The export stage: OTLP spans and metrics, and reports (table, JSON, JUnit)."""
